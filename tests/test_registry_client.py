"""RegistryClient against real registry processes on port 0 (and one scripted fake server
for protocol violations a real registry never commits).

Convergence is awaited with `wait_for_revision` (event-driven) or polled with a deadline;
nothing sleeps to wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import math
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spillgate._proto import common_pb2, registry_pb2, registry_pb2_grpc
from spillgate.registry import ClientConfig, RegistryClient, SQLiteStore
from spillgate.registry.client import _read_cache
from tests.conftest import start_service
from tests.test_registry_service import _READY_LINE, Registry, start_registry

T = TypeVar("T")
REGION = registry_pb2.ENTITY_KIND_REGION
MODEL = registry_pb2.ENTITY_KIND_MODEL
VERSION = registry_pb2.ENTITY_KIND_VERSION
if TYPE_CHECKING:  # the async stub class exists only in the type stubs
    Stub = registry_pb2_grpc.RegistryServiceAsyncStub

# Fast enough that every test converges in well under a second on a 2-core machine.
FAST = ClientConfig(
    reconnect_initial_ms=10,
    reconnect_max_ms=200,
    progress_interval_ms=50,
    idle_timeout_ms=2_000,
    cache_interval_ms=0,
)


# --- helpers ----------------------------------------------------------------------------


async def poll(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.01) -> T:
    """Async `eventually`: await until `check()` is truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def region(id: str, zone: str = "us") -> registry_pb2.Entity:
    return registry_pb2.Entity(region=registry_pb2.Region(id=id, residency_zone=zone))


def model(id: str, tokens: int = 0) -> registry_pb2.Entity:
    return registry_pb2.Entity(
        model=registry_pb2.Model(id=id, kind=common_pb2.MODEL_KIND_LLM, max_context_tokens=tokens)
    )


def version(model_id: str, label: str) -> registry_pb2.Entity:
    # One digest per (model, version): re-putting it is a no-op, never an immutability error.
    digest = "sha256:" + hashlib.sha256(f"{model_id}@{label}".encode()).hexdigest()
    return registry_pb2.Entity(
        version=registry_pb2.Version(model=model_id, version=label, artifact_digest=digest)
    )


def key(kind: registry_pb2.EntityKind.ValueType, id: str) -> registry_pb2.EntityKey:
    return registry_pb2.EntityKey(kind=kind, id=id)


@contextlib.asynccontextmanager
async def aio_stub(address: str) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield registry_pb2_grpc.RegistryServiceStub(channel)


async def server_snapshot(stub: Stub) -> registry_pb2.Snapshot:
    return (await stub.GetSnapshot(registry_pb2.GetSnapshotRequest())).snapshot


async def assert_converged(client: RegistryClient, stub: Stub) -> registry_pb2.Snapshot:
    """The client reaches the server's latest revision and holds exactly its state."""
    expected = await server_snapshot(stub)
    await client.wait_for_revision(expected.revision, timeout=10)
    assert client.revision == expected.revision
    assert client.snapshot() == expected
    return expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry_on(db: Path, port: int) -> Registry:
    """Start a registry on a fixed port (to restart one where its clients point)."""
    args = ["spillgate.registry.app", "--db", str(db), "--port", str(port)]
    sp = start_service(args, _READY_LINE, 20.0)
    return Registry(sp.proc, sp.ready, sp.output, sp.pump)


def client_tasks() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if t.get_name().startswith(("registry-watch", "registry-cache")) and not t.done()
    ]


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry") / "registry.db"


@pytest.fixture(scope="module")
def registry(registry_db: Path) -> Iterator[Registry]:
    reg = start_registry(registry_db)
    yield reg
    assert reg.stop() == 0, "".join(reg.output)


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Callable[[], Registry]]:
    """Starts (and restarts) one registry on one db file and one port; stops it at the end."""
    db, port = tmp_path / "registry.db", free_port()
    running: list[Registry] = []

    def start() -> Registry:
        reg = start_registry_on(db, port)
        running.append(reg)
        return reg

    yield start
    for reg in running:
        reg.stop()


# --- following the registry -------------------------------------------------------------


async def test_initial_snapshot_then_follows_puts_applies_and_deletes(registry: Registry) -> None:
    async with aio_stub(registry.address) as stub:
        await stub.Put(registry_pb2.PutRequest(entity=region("follow-a")))
        seen: list[int] = []
        async with RegistryClient(registry.address, config=FAST) as client:
            remove = client.add_listener(seen.append)
            await client.wait_ready(timeout=10)
            first = await assert_converged(client, stub)
            assert client.connected and client.stats.snapshots == 1

            await stub.Put(registry_pb2.PutRequest(entity=model("follow-m", tokens=8)))
            await assert_converged(client, stub)
            applied = await stub.Apply(
                registry_pb2.ApplyRequest(
                    mutations=[
                        registry_pb2.Mutation(put=region("follow-b", zone="eu")),
                        registry_pb2.Mutation(put=version("follow-m", "v1")),
                        registry_pb2.Mutation(delete=key(REGION, "follow-a")),
                    ]
                )
            )
            assert applied.committed
            await assert_converged(client, stub)
            # The registry stamps create_time: the client holds the stored entity, not ours.
            held = client.get((VERSION, "follow-m@v1"))
            assert held is not None and held.version.HasField("create_time")
            await stub.Delete(registry_pb2.DeleteRequest(key=key(VERSION, "follow-m@v1")))
            last = await assert_converged(client, stub)

            assert [e.region.id for e in client.entities(REGION)] == [r.id for r in last.regions]
            assert "follow-b" in [e.region.id for e in client.entities(REGION)]
            assert seen == list(range(first.revision, last.revision + 1))
            assert client.stats.protocol_errors == 0 and client.stats.snapshots == 1
            assert client.staleness_s() < 5
            remove()
        assert not client.connected and not client_tasks()


async def test_state_view_is_immutable_and_consistent(registry: Registry) -> None:
    async with (
        aio_stub(registry.address) as stub,
        RegistryClient(registry.address, config=FAST) as client,
    ):
        await client.wait_ready(timeout=10)
        before, before_revision = client.state, client.revision
        frozen = dict(before)
        rev = (await stub.Put(registry_pb2.PutRequest(entity=region("view-a")))).revision
        await client.wait_for_revision(rev, timeout=10)
        # A view taken earlier still shows its own revision's state.
        assert dict(before) == frozen and before_revision < rev
        assert (REGION, "view-a") in client.state and (REGION, "view-a") not in before
        with pytest.raises(TypeError):
            client.state[(REGION, "x")] = region("x")  # type: ignore[index]


async def test_kinds_filter_holds_only_those_kinds_at_the_registry_revision(
    registry: Registry,
) -> None:
    async with aio_stub(registry.address) as stub:
        await stub.Put(registry_pb2.PutRequest(entity=model("kinds-m0")))
        async with RegistryClient(registry.address, kinds=[REGION], config=FAST) as client:
            await client.wait_ready(timeout=10)
            assert client.entities(MODEL) == []  # filtered out of the initial snapshot too
            await stub.Put(registry_pb2.PutRequest(entity=region("kinds-r")))
            rev = (await stub.Put(registry_pb2.PutRequest(entity=model("kinds-m1")))).revision
            # The model-only revision reaches the client as progress: revision follows.
            await client.wait_for_revision(rev, timeout=10)
            expected = await server_snapshot(stub)
            assert expected.revision == rev == client.revision
            held = client.snapshot()
            assert held.regions == expected.regions
            assert not held.models and not held.versions
            assert {k for k, _ in client.state} == {REGION}
            assert client.stats.protocol_errors == 0


async def test_wait_timeouts_say_what_is_missing(registry: Registry) -> None:
    async with RegistryClient(registry.address, config=FAST) as client:
        await client.wait_ready(timeout=10)
        with pytest.raises(TimeoutError, match=rf"at revision {client.revision}, not 1000000"):
            await client.wait_for_revision(10**6, timeout=0.05)
    dead = f"127.0.0.1:{free_port()}"
    async with RegistryClient(dead, config=FAST) as client:
        assert client.staleness_s() == math.inf and not client.ready
        with pytest.raises(TimeoutError, match=f"no registry state from {dead}"):
            await client.wait_ready(timeout=0.1)
        assert client.stats.stream_failures >= 1
    assert not client_tasks()


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="idle_timeout_ms"):
        ClientConfig(progress_interval_ms=1_000, idle_timeout_ms=500)
    with pytest.raises(ValueError, match="reconnect_max_ms"):
        ClientConfig(reconnect_initial_ms=100, reconnect_max_ms=10)
    with pytest.raises(ValueError, match="jitter"):
        ClientConfig(reconnect_jitter=1.0)
    with pytest.raises(ValueError, match="unknown entity kind"):
        RegistryClient("127.0.0.1:1", kinds=[registry_pb2.ENTITY_KIND_UNSPECIFIED])


# --- outages ----------------------------------------------------------------------------


def offline_write(db: Path, *mutations: registry_pb2.Mutation, history: int = 10_000) -> int:
    """Commit to the registry's file while no registry serves it (as another writer would)."""
    store = SQLiteStore(db, history_revisions=history)
    try:
        return store.apply(list(mutations))[0]
    finally:
        store.close()


async def test_registry_killed_keeps_state_then_resumes_from_history(
    restartable: Callable[[], Registry], tmp_path: Path
) -> None:
    reg = restartable()
    async with aio_stub(reg.address) as stub, RegistryClient(reg.address, config=FAST) as client:
        await stub.Put(registry_pb2.PutRequest(entity=region("kill-a")))
        before = await assert_converged(client, stub)
        snapshots = client.stats.snapshots

        reg.stop(signal.SIGKILL)
        await poll(lambda: not client.connected)
        # Stale but served: nothing else arrives (progress would keep staleness ~50 ms).
        await poll(lambda: client.staleness_s() > 0.3)
        assert client.snapshot() == before and client.ready

        rev = offline_write(
            tmp_path / "registry.db",
            registry_pb2.Mutation(put=region("kill-b", zone="eu")),
            registry_pb2.Mutation(put=model("kill-m")),
        )
        assert rev == before.revision + 1
        assert client.revision == before.revision

        restartable()
        await assert_converged(client, stub)
        assert client.connected and client.staleness_s() < 1
        # Resumed from the retained history: no fresh snapshot was needed.
        assert client.stats.snapshots == snapshots
        assert client.stats.protocol_errors == 0


async def test_resume_outside_retained_history_takes_a_fresh_snapshot(
    restartable: Callable[[], Registry], tmp_path: Path
) -> None:
    reg = restartable()
    async with aio_stub(reg.address) as stub, RegistryClient(reg.address, config=FAST) as client:
        await stub.Put(registry_pb2.PutRequest(entity=region("hist-a")))
        await stub.Put(registry_pb2.PutRequest(entity=region("hist-b")))
        await assert_converged(client, stub)
        snapshots = client.stats.snapshots
        reg.stop(signal.SIGKILL)
        await poll(lambda: not client.connected)
        # Three revisions written with a one-revision history: the client's is gone.
        db = tmp_path / "registry.db"
        offline_write(db, registry_pb2.Mutation(put=region("hist-c")), history=1)
        offline_write(db, registry_pb2.Mutation(delete=key(REGION, "hist-a")), history=1)
        offline_write(db, registry_pb2.Mutation(put=model("hist-m")), history=1)
        restartable()
        expected = await assert_converged(client, stub)
        assert client.stats.snapshots == snapshots + 1
        assert (REGION, "hist-a") not in client.state
        assert expected.revision == client.revision


async def test_cache_lets_a_client_start_while_the_registry_is_down(
    restartable: Callable[[], Registry], tmp_path: Path
) -> None:
    cache = tmp_path / "cache" / "registry.snapshot"
    config = ClientConfig(
        reconnect_initial_ms=10,
        reconnect_max_ms=100,
        progress_interval_ms=50,
        idle_timeout_ms=2_000,
        cache_path=cache,
        cache_interval_ms=0,
    )
    reg = restartable()
    async with aio_stub(reg.address) as stub:
        async with RegistryClient(reg.address, config=config) as first:
            await stub.Put(registry_pb2.PutRequest(entity=region("cache-a")))
            await stub.Put(registry_pb2.PutRequest(entity=model("cache-m")))
            expected = await assert_converged(first, stub)
            # Persisted while running (not only on close): a SIGKILLed process has it too.
            await poll(
                lambda: (
                    (c := _read_cache(cache)) is not None
                    and c.snapshot.revision == expected.revision
                )
            )
            reg.stop(signal.SIGKILL)
        assert not list(cache.parent.glob("*.tmp")), "temporary files left behind"

        # A restarted process, an hour later by its wall clock, with the registry down.
        def hour_later() -> float:
            return time.time() + 3600

        async with RegistryClient(
            reg.address, config=config, wall_clock=hour_later, rng=random.Random(1)
        ) as second:
            await second.wait_ready(timeout=5)
            assert second.snapshot() == expected
            assert second.from_cache and not second.connected
            assert second.staleness_s() >= 3600
            assert second.stats.cache_loads == 1

            restartable()
            rev = (await stub.Put(registry_pb2.PutRequest(entity=region("cache-b")))).revision
            await second.wait_for_revision(rev, timeout=10)
            await assert_converged(second, stub)
            assert not second.from_cache and second.staleness_s() < 1

        # A client watching fewer kinds may use the cache; one needing more may not.
        narrow = ClientConfig(cache_path=tmp_path / "narrow", cache_interval_ms=0)
        dead = f"127.0.0.1:{free_port()}"
        async with RegistryClient(reg.address, kinds=[REGION], config=narrow) as regions_only:
            await assert_converged_kinds(regions_only, stub)
        async with RegistryClient(dead, kinds=[REGION, MODEL], config=narrow) as wider:
            with pytest.raises(TimeoutError):
                await wider.wait_ready(timeout=0.1)
            assert wider.stats.cache_loads == 0
        async with RegistryClient(dead, kinds=[REGION], config=narrow) as same:
            await same.wait_ready(timeout=1)
            assert same.from_cache and {k for k, _ in same.state} == {REGION}


async def test_a_recreated_registry_replaces_cached_state_instead_of_resuming_it(
    tmp_path: Path,
) -> None:
    """A cache of registry A, then registry B (a fresh db) on A's address, ahead of A.

    B's history covers A's revision, so only the registry id tells the client that B's
    changes do not apply on top of what it holds.
    """
    port, cache = free_port(), tmp_path / "cache"
    config = dataclasses.replace(FAST, cache_path=cache)
    a = start_registry_on(tmp_path / "a.db", port)
    try:
        async with aio_stub(a.address) as stub, RegistryClient(a.address, config=config) as client:
            await stub.Put(registry_pb2.PutRequest(entity=region("only-in-a")))
            await stub.Put(registry_pb2.PutRequest(entity=model("a-model")))
            held = await assert_converged(client, stub)
    finally:
        a.stop()
    assert (c := _read_cache(cache)) is not None and c.snapshot == held

    b = start_registry_on(tmp_path / "b.db", port)
    try:
        async with aio_stub(b.address) as stub:
            for i in range(held.revision + 2):
                await stub.Put(registry_pb2.PutRequest(entity=region(f"b-{i}", zone="eu")))
            async with RegistryClient(b.address, config=config) as client:
                assert client.from_cache and client.registry_id == held.registry_id
                expected = await assert_converged(client, stub)
                assert expected.registry_id != held.registry_id
                assert client.registry_id == expected.registry_id
                assert (REGION, "only-in-a") not in client.state
                assert client.stats.registry_changes == 1 and client.stats.protocol_errors == 0
                # The next resume is checked against B and works from its history.
                snapshots = client.stats.snapshots
                client._drop_stream()
                rev = (await stub.Put(registry_pb2.PutRequest(entity=model("b-m")))).revision
                await client.wait_for_revision(rev, timeout=10)
                await assert_converged(client, stub)
                assert client.stats.snapshots == snapshots
        assert (
            c := _read_cache(cache)
        ) is not None and c.snapshot.registry_id == client.registry_id
    finally:
        b.stop()


async def test_changes_from_another_registry_are_never_applied() -> None:
    def stamped(event: registry_pb2.WatchEvent, registry_id: str) -> registry_pb2.WatchEvent:
        event.registry_id = registry_id
        return event

    servicer = scripted_registry(
        [
            [stamped(snap(5, "a"), "reg-a"), stamped(put_region(6, "foreign"), "reg-b")],
            [stamped(put_region(6, "b"), "reg-a")],
        ]
    )
    async with scripted(servicer) as target, RegistryClient(target, config=FAST) as client:
        await client.wait_for_revision(6, timeout=10)
        assert [e.region.id for e in client.entities(REGION)] == ["a", "b"]
        assert client.stats.protocol_errors == 1
        assert [(r.from_revision, r.registry_id) for r in servicer.requests] == [
            (0, ""),
            (5, "reg-a"),
        ]


async def assert_converged_kinds(client: RegistryClient, stub: Stub) -> None:
    expected = await server_snapshot(stub)
    await client.wait_for_revision(expected.revision, timeout=10)
    assert client.snapshot().regions == expected.regions


async def test_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "bad"
    cache.write_bytes(b"spillgate-registry-cache 1\n{not json\n")
    config = ClientConfig(cache_path=cache)
    async with RegistryClient(f"127.0.0.1:{free_port()}", config=config) as client:
        with pytest.raises(TimeoutError):
            await client.wait_ready(timeout=0.05)
        assert client.stats.cache_loads == 0


# --- protocol violations (a scripted server: a real registry never sends these) ---------


class ScriptedRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """Answers the n-th Watch with the n-th script, then holds the stream open.

    Only Watch is implemented: the others keep the generated UNIMPLEMENTED answers (which
    the type stubs declare abstract, hence `scripted_registry`).
    """

    def __init__(self, scripts: list[list[registry_pb2.WatchEvent]]) -> None:
        self.scripts = scripts
        self.requests: list[registry_pb2.WatchRequest] = []

    async def Watch(
        self, request: registry_pb2.WatchRequest, context: Any
    ) -> AsyncIterator[registry_pb2.WatchResponse]:
        script = self.scripts[min(len(self.requests), len(self.scripts) - 1)]
        self.requests.append(request)
        for event in script:
            yield registry_pb2.WatchResponse(event=event)
        await asyncio.Event().wait()  # until the client cancels


def scripted_registry(scripts: list[list[registry_pb2.WatchEvent]]) -> ScriptedRegistry:
    return ScriptedRegistry(scripts)  # type: ignore[abstract]


def snap(revision: int, *regions: str) -> registry_pb2.WatchEvent:
    snapshot = registry_pb2.Snapshot(
        revision=revision,
        regions=[registry_pb2.Region(id=r, residency_zone="us") for r in regions],
    )
    return registry_pb2.WatchEvent(revision=revision, snapshot=snapshot)


def put_region(revision: int, id: str) -> registry_pb2.WatchEvent:
    change = registry_pb2.Change(kind=registry_pb2.CHANGE_KIND_PUT, entity=region(id))
    return registry_pb2.WatchEvent(
        revision=revision, changes=registry_pb2.ChangeSet(changes=[change])
    )


@contextlib.asynccontextmanager
async def scripted(servicer: ScriptedRegistry) -> AsyncIterator[str]:
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (put_region(7, "gap"), "a gap (revision 6 skipped)"),
        (put_region(5, "dup"), "a replayed revision"),
        (registry_pb2.WatchEvent(revision=9), "progress past the held revision, unfiltered"),
        (
            registry_pb2.WatchEvent(
                revision=6,
                changes=registry_pb2.ChangeSet(
                    changes=[registry_pb2.Change(kind=registry_pb2.CHANGE_KIND_PUT)]
                ),
            ),
            "no entity",
        ),
    ],
)
async def test_out_of_order_event_is_not_applied_and_the_stream_resumes(
    bad: registry_pb2.WatchEvent, why: str
) -> None:
    servicer = scripted_registry(
        [
            [snap(5, "a"), bad, put_region(6, "never")],
            [put_region(6, "b"), registry_pb2.WatchEvent(revision=6)],
        ]
    )
    async with scripted(servicer) as target, RegistryClient(target, config=FAST) as client:
        await client.wait_for_revision(6, timeout=10)
        await poll(lambda: client.stats.progress_events >= 1)
        assert [e.region.id for e in client.entities(REGION)] == ["a", "b"], why
        assert client.stats.protocol_errors == 1
        # Resumed from the revision held when the bad event came, not from scratch.
        assert [r.from_revision for r in servicer.requests] == [0, 5]
        assert client.revision == 6


async def test_changes_before_a_snapshot_are_rejected() -> None:
    servicer = scripted_registry([[put_region(1, "early")], [snap(3, "a")]])
    async with scripted(servicer) as target, RegistryClient(target, config=FAST) as client:
        await client.wait_ready(timeout=10)
        assert client.revision == 3 and [e.region.id for e in client.entities(REGION)] == ["a"]
        assert client.stats.protocol_errors == 1
        assert [r.from_revision for r in servicer.requests] == [0, 0]


async def test_silent_stream_is_dropped_after_idle_timeout() -> None:
    # The server never sends progress: the client must not trust the stream forever.
    servicer = scripted_registry([[snap(2, "a")], [put_region(3, "b")]])
    config = ClientConfig(reconnect_initial_ms=10, progress_interval_ms=20, idle_timeout_ms=100)
    async with scripted(servicer) as target, RegistryClient(target, config=config) as client:
        await client.wait_for_revision(3, timeout=10)
        assert [r.from_revision for r in servicer.requests][:2] == [0, 2]
        assert all(r.progress_interval_ms == 20 for r in servicer.requests)


# --- property: writes interleaved with reconnects -----------------------------------------

_REGIONS = ["p-r0", "p-r1", "p-r2"]
_MODELS = ["p-m0", "p-m1"]
_LABELS = ["v0", "v1"]

_put = st.one_of(
    st.tuples(st.just("region"), st.sampled_from(_REGIONS), st.sampled_from(["us", "eu"])),
    st.tuples(st.just("model"), st.sampled_from(_MODELS), st.integers(0, 2)),
    st.tuples(st.just("version"), st.sampled_from(_MODELS), st.sampled_from(_LABELS)),
)
_delete = st.one_of(
    st.tuples(st.just("delete"), st.just(REGION), st.sampled_from(_REGIONS)),
    st.tuples(st.just("delete"), st.just(MODEL), st.sampled_from(_MODELS)),
    st.tuples(
        st.just("delete"),
        st.just(VERSION),
        st.builds(lambda m, v: f"{m}@{v}", st.sampled_from(_MODELS), st.sampled_from(_LABELS)),
    ),
)
_mutation = st.one_of(_put, _delete)
_step = st.one_of(
    _mutation,
    st.tuples(st.just("apply"), st.lists(_mutation, min_size=1, max_size=3)),
    st.just(("drop",)),  # the client's stream breaks mid-flight
    st.just(("restart",)),  # the client process restarts from its cache
    # The stream breaks while another writer commits twice with a one-revision history:
    # the client's revision may fall out of the history (then it needs a fresh snapshot).
    st.just(("compact",)),
    st.just(("check",)),  # the client converges to the server here
)


def _mutation_of(op: tuple[Any, ...]) -> registry_pb2.Mutation:
    if op[0] == "region":
        return registry_pb2.Mutation(put=region(op[1], op[2]))
    if op[0] == "model":
        return registry_pb2.Mutation(put=model(op[1], op[2]))
    if op[0] == "version":
        return registry_pb2.Mutation(put=version(op[1], op[2]))
    return registry_pb2.Mutation(delete=key(op[1], op[2]))


async def _write(stub: Stub, mutations: list[registry_pb2.Mutation]) -> None:
    try:
        await stub.Apply(registry_pb2.ApplyRequest(mutations=mutations))
    except grpc.aio.AioRpcError as exc:
        # Generated steps may reference what is absent or delete what is referenced.
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()


_example = itertools.count()
_zones = itertools.count()


@settings(max_examples=25, deadline=None)
@given(steps=st.lists(_step, max_size=14))
async def test_any_interleaving_of_writes_and_reconnects_converges_to_the_server(
    registry: Registry, registry_db: Path, steps: list[tuple[Any, ...]]
) -> None:
    cache = registry_db.parent / f"property-cache-{next(_example)}"
    config = ClientConfig(
        reconnect_initial_ms=5,
        reconnect_max_ms=50,
        progress_interval_ms=30,
        idle_timeout_ms=2_000,
        cache_path=cache,
        cache_interval_ms=0,
    )
    client = RegistryClient(registry.address, config=config, rng=random.Random(0))
    await client.start()
    try:
        async with aio_stub(registry.address) as stub:
            await client.wait_ready(timeout=10)
            for step in steps:
                match step[0]:
                    case "apply":
                        await _write(stub, [_mutation_of(m) for m in step[1]])
                    case "drop":
                        client._drop_stream()
                    case "restart":
                        revision = client.revision
                        await client.close()
                        client = RegistryClient(registry.address, config=config)
                        await client.start()
                        # Starts from its cache at the revision it held, then resumes.
                        assert client.revision == revision and client.ready
                    case "compact":
                        client._drop_stream()
                        for _ in range(2):
                            await asyncio.to_thread(
                                offline_write,
                                registry_db,
                                registry_pb2.Mutation(put=region("p-compact", f"z{next(_zones)}")),
                                history=1,
                            )
                    case "check":
                        await assert_converged(client, stub)
                    case _:
                        await _write(stub, [_mutation_of(step)])
            await assert_converged(client, stub)
            assert client.stats.protocol_errors == 0
    finally:
        await client.close()
    assert not client_tasks()
