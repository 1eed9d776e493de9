"""RegistryService against a real registry process on port 0 (no in-process fakes)."""

from __future__ import annotations

import contextlib
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from spillgate._proto import common_pb2, registry_pb2, registry_pb2_grpc
from tests.conftest import ServiceProcess, eventually, start_service

REGION = registry_pb2.ENTITY_KIND_REGION
MODEL = registry_pb2.ENTITY_KIND_MODEL
REPLICA = registry_pb2.ENTITY_KIND_REPLICA
NOT_READY = common_pb2.REPLICA_STATE_NOT_READY
READY = common_pb2.REPLICA_STATE_READY
DIGEST = "sha256:" + "ab" * 32
_READY_LINE = re.compile(r"spillgate registry ready grpc=(\S+) revision=(\d+)")


class Registry(ServiceProcess):
    @property
    def address(self) -> str:
        return self.ready[0]

    def stub(self) -> Iterator[registry_pb2_grpc.RegistryServiceStub]:
        with grpc.insecure_channel(self.address) as channel:
            yield registry_pb2_grpc.RegistryServiceStub(channel)


def start_registry(db: Path, timeout: float = 20.0) -> Registry:
    """Start `python -m spillgate.registry.app` on a free port; wait for its ready line."""
    args = ["spillgate.registry.app", "--db", str(db), "--port", "0"]
    sp = start_service(args, _READY_LINE, timeout)
    return Registry(sp.proc, sp.ready, sp.output, sp.pump)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry") / "registry.db")
    yield reg
    assert reg.stop() == 0, "".join(reg.output)


@pytest.fixture
def stub(registry: Registry) -> Iterator[registry_pb2_grpc.RegistryServiceStub]:
    yield from registry.stub()


# --- builders ---------------------------------------------------------------------------


def region(id: str, zone: str = "us") -> registry_pb2.Entity:
    return registry_pb2.Entity(region=registry_pb2.Region(id=id, residency_zone=zone))


def model(id: str, tokens: int = 0) -> registry_pb2.Entity:
    return registry_pb2.Entity(
        model=registry_pb2.Model(id=id, kind=common_pb2.MODEL_KIND_LLM, max_context_tokens=tokens)
    )


def replica(id: str, region: str) -> registry_pb2.Replica:
    return registry_pb2.Replica(
        id=id, region=region, endpoint="127.0.0.1:1", state=common_pb2.REPLICA_STATE_READY
    )


def key(kind: registry_pb2.EntityKind.ValueType, id: str) -> registry_pb2.EntityKey:
    return registry_pb2.EntityKey(kind=kind, id=id)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _code(err: grpc.RpcError) -> grpc.StatusCode:
    return err.code()


def _details(err: grpc.RpcError) -> str:
    return str(err.details())


# --- CRUD and CAS -----------------------------------------------------------------------


def test_put_get_list_delete_round_trip(stub: registry_pb2_grpc.RegistryServiceStub) -> None:
    r1 = stub.Put(registry_pb2.PutRequest(entity=region("crud-a"))).revision
    r2 = stub.Put(registry_pb2.PutRequest(entity=region("crud-b", zone="eu"))).revision
    assert r2 == r1 + 1
    # An identical put is a no-op that keeps the revision.
    assert stub.Put(registry_pb2.PutRequest(entity=region("crud-a"))).revision == r2
    got = stub.Get(registry_pb2.GetRequest(key=key(REGION, "crud-b")))
    assert got.entity == region("crud-b", zone="eu") and got.revision == r2
    listed = stub.List(registry_pb2.ListRequest(kind=REGION, region="crud-a"))
    assert [e.region.id for e in listed.entities] == ["crud-a"]
    deleted = stub.Delete(registry_pb2.DeleteRequest(key=key(REGION, "crud-b")))
    assert deleted.found and deleted.revision == r2 + 1
    again = stub.Delete(registry_pb2.DeleteRequest(key=key(REGION, "crud-b")))
    assert not again.found and again.revision == r2 + 1
    err = rpc_error(lambda: stub.Get(registry_pb2.GetRequest(key=key(REGION, "crud-b"))))
    assert _code(err) == grpc.StatusCode.NOT_FOUND


def test_apply_dry_run_does_not_commit(stub: registry_pb2_grpc.RegistryServiceStub) -> None:
    before = stub.GetSnapshot(registry_pb2.GetSnapshotRequest()).snapshot.revision
    mutations = [
        registry_pb2.Mutation(put=region("dry-a")),
        registry_pb2.Mutation(put=model("dry-m")),
    ]
    dry = stub.Apply(registry_pb2.ApplyRequest(mutations=mutations, dry_run=True))
    assert not dry.committed and dry.revision == before and len(dry.changes) == 2
    err = rpc_error(lambda: stub.Get(registry_pb2.GetRequest(key=key(REGION, "dry-a"))))
    assert _code(err) == grpc.StatusCode.NOT_FOUND
    real = stub.Apply(registry_pb2.ApplyRequest(mutations=mutations, expected_revision=before))
    assert real.committed and real.revision == before + 1


def test_stale_expected_revision_is_aborted_with_current_revision(
    stub: registry_pb2_grpc.RegistryServiceStub,
) -> None:
    current = stub.Put(registry_pb2.PutRequest(entity=region("cas-a"))).revision
    err = rpc_error(
        lambda: stub.Put(
            registry_pb2.PutRequest(entity=region("cas-b"), expected_revision=current - 1)
        )
    )
    assert _code(err) == grpc.StatusCode.ABORTED
    assert f"revision {current}" in _details(err)
    status = rpc_status.from_call(err)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "REVISION_MISMATCH"
    assert info.metadata["current_revision"] == str(current)


def test_concurrent_cas_increments_lose_no_update(registry: Registry) -> None:
    with grpc.insecure_channel(registry.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        stub.Put(registry_pb2.PutRequest(entity=model("counter", tokens=0)))

        def increment(times: int) -> None:
            done = 0
            while done < times:
                got = stub.Get(registry_pb2.GetRequest(key=key(MODEL, "counter")))
                entity = got.entity
                entity.model.max_context_tokens += 1
                try:
                    stub.Put(registry_pb2.PutRequest(entity=entity, expected_revision=got.revision))
                except grpc.RpcError as exc:
                    assert _code(exc) == grpc.StatusCode.ABORTED
                    continue
                done += 1

        threads = [threading.Thread(target=increment, args=(20,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        final = stub.Get(registry_pb2.GetRequest(key=key(MODEL, "counter")))
        assert final.entity.model.max_context_tokens == 40


@pytest.mark.parametrize(
    ("entity", "field_name"),
    [
        (registry_pb2.Entity(), "entity"),
        (region("Bad_Id"), "region.id"),
        (region("zoneless", zone=""), "region.residency_zone"),
        (registry_pb2.Entity(model=registry_pb2.Model(id="m")), "model.kind"),
        (
            registry_pb2.Entity(
                version=registry_pb2.Version(model="m", version="v1", artifact_digest="md5:x")
            ),
            "version.artifact_digest",
        ),
        (
            registry_pb2.Entity(
                alias=registry_pb2.Alias(
                    name="chat",
                    default_targets=registry_pb2.AliasTargets(
                        targets=[registry_pb2.AliasTarget(model="m", version="v1", weight=90)]
                    ),
                )
            ),
            "alias.default_targets",
        ),
        (
            registry_pb2.Entity(
                placement=registry_pb2.Placement(
                    model="m", version="v1", region="us", pool="p", min_replicas=3, max_replicas=1
                )
            ),
            "placement.max_replicas",
        ),
        (
            registry_pb2.Entity(replica=registry_pb2.Replica(id="r", region="us")),
            "replica.endpoint",
        ),
    ],
)
def test_validation_errors_are_invalid_argument_naming_the_field(
    stub: registry_pb2_grpc.RegistryServiceStub, entity: registry_pb2.Entity, field_name: str
) -> None:
    err = rpc_error(lambda: stub.Put(registry_pb2.PutRequest(entity=entity)))
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(err).startswith(f"{field_name}:"), _details(err)


def test_missing_reference_and_bad_keys(stub: registry_pb2_grpc.RegistryServiceStub) -> None:
    version = registry_pb2.Version(model="ghost", version="v1", artifact_digest=DIGEST)
    err = rpc_error(
        lambda: stub.Put(registry_pb2.PutRequest(entity=registry_pb2.Entity(version=version)))
    )
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert "model 'ghost'" in _details(err)
    err = rpc_error(lambda: stub.Get(registry_pb2.GetRequest(key=registry_pb2.EntityKey(id="x"))))
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "key.kind" in _details(err)
    err = rpc_error(lambda: stub.List(registry_pb2.ListRequest()))
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "kind" in _details(err)
    err = rpc_error(lambda: stub.GetSnapshot(registry_pb2.GetSnapshotRequest(revision=10**9)))
    assert _code(err) == grpc.StatusCode.OUT_OF_RANGE


# --- watch ------------------------------------------------------------------------------


def _next_change(events: Iterator[registry_pb2.WatchResponse]) -> registry_pb2.WatchEvent:
    """The next event that carries changes (progress events skipped)."""
    for response in events:
        if response.event.WhichOneof("event") == "changes":
            return response.event
    raise AssertionError("watch ended")


def test_watch_from_zero_starts_with_snapshot_then_ordered_changes(
    stub: registry_pb2_grpc.RegistryServiceStub,
) -> None:
    stub.Put(registry_pb2.PutRequest(entity=region("watch-0")))
    call = stub.Watch(registry_pb2.WatchRequest(progress_interval_ms=100), timeout=15)
    first = next(call).event
    assert first.WhichOneof("event") == "snapshot"
    assert "watch-0" in [r.id for r in first.snapshot.regions]
    revisions = [
        stub.Put(registry_pb2.PutRequest(entity=region(f"watch-{i}"))).revision for i in range(1, 6)
    ]
    seen = [_next_change(call) for _ in revisions]
    call.cancel()
    assert [e.revision for e in seen] == revisions
    assert revisions[0] == first.revision + 1
    assert [e.changes.changes[0].entity.region.id for e in seen] == [
        f"watch-{i}" for i in range(1, 6)
    ]


def test_watch_resume_after_dropped_stream_has_no_gap_or_duplicate(
    stub: registry_pb2_grpc.RegistryServiceStub,
) -> None:
    call = stub.Watch(registry_pb2.WatchRequest(progress_interval_ms=100), timeout=15)
    last = next(call).event.revision
    stub.Put(registry_pb2.PutRequest(entity=region("resume-0")))
    last = _next_change(call).revision
    call.cancel()
    missed = [
        stub.Put(registry_pb2.PutRequest(entity=region(f"resume-{i}"))).revision
        for i in range(1, 5)
    ]
    resumed = stub.Watch(
        registry_pb2.WatchRequest(from_revision=last, progress_interval_ms=100), timeout=15
    )
    first = next(resumed).event
    assert first.WhichOneof("event") == "changes", "a retained revision must not resnapshot"
    seen = [first] + [_next_change(resumed) for _ in missed[1:]]
    resumed.cancel()
    assert [e.revision for e in seen] == missed == list(range(last + 1, last + 5))


def test_every_snapshot_and_event_carries_the_registry_id(
    stub: registry_pb2_grpc.RegistryServiceStub,
) -> None:
    registry_id = stub.GetSnapshot(registry_pb2.GetSnapshotRequest()).snapshot.registry_id
    assert len(registry_id) == 32
    call = stub.Watch(registry_pb2.WatchRequest(progress_interval_ms=50), timeout=15)
    first = next(call).event
    assert first.registry_id == first.snapshot.registry_id == registry_id
    stub.Put(registry_pb2.PutRequest(entity=region("id-a")))
    change = _next_change(call)
    progress = next(r.event for r in call if r.event.WhichOneof("event") is None)
    call.cancel()
    assert change.registry_id == progress.registry_id == registry_id


def test_resume_with_another_registrys_id_starts_with_a_snapshot(
    stub: registry_pb2_grpc.RegistryServiceStub,
) -> None:
    snapshot = stub.GetSnapshot(registry_pb2.GetSnapshotRequest()).snapshot
    last = stub.Put(registry_pb2.PutRequest(entity=region("foreign-0"))).revision
    stub.Put(registry_pb2.PutRequest(entity=region("foreign-1")))

    def first_event(registry_id: str) -> registry_pb2.WatchEvent:
        request = registry_pb2.WatchRequest(
            from_revision=last - 1, registry_id=registry_id, progress_interval_ms=100
        )
        call = stub.Watch(request, timeout=15)
        event = next(call).event
        call.cancel()
        return event

    # The registry's own id (and no id, as older clients send) resume from the history...
    for own in (snapshot.registry_id, ""):
        resumed = first_event(own)
        assert resumed.WhichOneof("event") == "changes" and resumed.revision == last
    # ...a revision of another registry says nothing about this one: full state instead.
    reset = first_event("0" * 32)
    assert reset.WhichOneof("event") == "snapshot"
    assert reset.revision == last + 1 and reset.snapshot.registry_id == snapshot.registry_id
    assert {"foreign-0", "foreign-1"} <= {r.id for r in reset.snapshot.regions}


# --- leases -----------------------------------------------------------------------------


def test_missed_lease_marks_not_ready_then_removes(
    stub: registry_pb2_grpc.RegistryServiceStub,
) -> None:
    stub.Put(registry_pb2.PutRequest(entity=region("lease-r")))
    call = stub.Watch(
        registry_pb2.WatchRequest(kinds=[REPLICA], progress_interval_ms=100), timeout=15
    )
    next(call)  # snapshot
    registered = stub.RegisterReplica(
        registry_pb2.RegisterReplicaRequest(replica=replica("lease-0", "lease-r"), lease_ms=300)
    )
    assert registered.lease_ms == 300 and registered.replica.HasField("lease_expires_at")
    events = [_next_change(call) for _ in range(3)]
    call.cancel()
    kinds = [(e.changes.changes[0].kind, e.changes.changes[0].entity.replica.state) for e in events]
    assert kinds == [
        (registry_pb2.CHANGE_KIND_PUT, READY),
        (registry_pb2.CHANGE_KIND_PUT, NOT_READY),
        (registry_pb2.CHANGE_KIND_DELETE, NOT_READY),
    ]
    assert [e.revision for e in events] == [registered.revision + i for i in range(3)]
    err = rpc_error(lambda: stub.Heartbeat(registry_pb2.HeartbeatRequest(replica="lease-0")))
    assert _code(err) == grpc.StatusCode.NOT_FOUND


def test_heartbeats_keep_replica_ready(stub: registry_pb2_grpc.RegistryServiceStub) -> None:
    stub.Put(registry_pb2.PutRequest(entity=region("beat-r")))
    for name in ("beat-kept", "beat-lost"):
        stub.RegisterReplica(
            registry_pb2.RegisterReplicaRequest(replica=replica(name, "beat-r"), lease_ms=300)
        )

    def lost_is_gone() -> bool:
        # Heartbeat pacing (not a convergence wait): well within the 300 ms lease.
        time.sleep(0.05)
        stub.Heartbeat(registry_pb2.HeartbeatRequest(replica="beat-kept", lease_ms=300))
        listed = stub.List(registry_pb2.ListRequest(kind=REPLICA, region="beat-r"))
        return [e.replica.id for e in listed.entities] == ["beat-kept"]

    eventually(lost_is_gone, timeout=10, interval=0)
    kept = stub.Get(registry_pb2.GetRequest(key=key(REPLICA, "beat-kept"))).entity
    assert kept.replica.state == READY


# --- durability -------------------------------------------------------------------------


def test_sigkill_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    reg = start_registry(db)
    acked: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        with grpc.insecure_channel(reg.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            i = 0
            while not stop.is_set():
                name = f"kill-{i}"
                try:
                    stub.Put(registry_pb2.PutRequest(entity=region(name)), timeout=5)
                except grpc.RpcError:
                    return
                acked.append(name)
                i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        eventually(lambda: len(acked) >= 50, timeout=15)
        reg.proc.send_signal(signal.SIGKILL)
        thread.join(timeout=15)
    finally:
        stop.set()
        reg.stop(signal.SIGKILL)
    assert not thread.is_alive()
    restarted = start_registry(db)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            listed = stub.List(registry_pb2.ListRequest(kind=REGION))
    finally:
        assert restarted.stop() == 0
    present = {e.region.id for e in listed.entities}
    assert set(acked) <= present, sorted(set(acked) - present)
    assert listed.revision >= len(acked)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
