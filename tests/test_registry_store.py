"""Store contract tests: every registry store must pass them.

Stores: "sqlite"; "consul-fake", ConsulStore against tests/consul_fake.py (an in-process
imitation of Consul's HTTP API, so CI covers the code); "consul", ConsulStore against a
real agent at CONSUL_HTTP_ADDR, skipped when that is not set. Each Consul test uses a
fresh random KV prefix and deletes it afterwards.

To add a store, extend `STORES` and `_backing`/`_open`; a store that needs an external
service skips with a reason when it is not configured.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import consul  # type: ignore[import-untyped]
import pytest
from consul_fake import FakeConsul
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spillgate._proto import common_pb2, registry_pb2
from spillgate.registry import (
    NotFound,
    PreconditionFailed,
    RevisionMismatch,
    SQLiteStore,
    Store,
    StoreError,
    ValidationError,
)
from spillgate.registry.consul_store import DEFAULT_HISTORY_REVISIONS, ConsulStore
from spillgate.registry.store import (
    MODEL,
    REGION,
    VERSION,
    Key,
    apply_changes,
    state_from_snapshot,
)
from spillgate.registry.validate import admission_endpoints

STORES = ["sqlite", "consul-fake", "consul"]
NOW = datetime(2025, 6, 1, tzinfo=UTC)
CONSUL_SKIP = (
    "CONSUL_HTTP_ADDR not set: the real-Consul contract run needs an agent "
    "(e.g. `consul agent -dev`, then CONSUL_HTTP_ADDR=127.0.0.1:8500); see README 'Consul store'"
)


@dataclass(frozen=True)
class Backing:
    """Where one test's store lives: a directory (sqlite) or an agent and KV prefix."""

    name: str
    directory: Path
    consul_addr: str = ""
    prefix: str = ""


@pytest.fixture(scope="session")
def consul_fake() -> Iterator[FakeConsul]:
    with FakeConsul() as fake:
        yield fake


def _consul_client(addr: str) -> consul.Consul:
    parsed = urllib.parse.urlparse(addr if "//" in addr else "//" + addr)
    return consul.Consul(host=parsed.hostname, port=parsed.port, scheme=parsed.scheme or "http")


@contextlib.contextmanager
def _backing(name: str, directory: Path, fake: FakeConsul) -> Iterator[Backing]:
    """A fresh backing location for store `name`, removed afterwards (skips "consul" unset)."""
    if name == "sqlite":
        yield Backing(name, directory)
        return
    if name == "consul-fake":
        addr = fake.addr
    else:
        addr = os.environ.get("CONSUL_HTTP_ADDR", "")
        if not addr:
            pytest.skip(CONSUL_SKIP)
    prefix = f"spillgate-test/{uuid.uuid4().hex}/"
    try:
        yield Backing(name, directory, addr, prefix)
    finally:
        client = _consul_client(addr)
        try:
            client.kv.delete(prefix, recurse=True)
        finally:
            client.http.session.close()


def _open(backing: Backing, **kwargs: int) -> Store:
    if backing.name == "sqlite":
        return SQLiteStore(backing.directory / "registry.db", clock=lambda: NOW, **kwargs)
    if backing.name in ("consul-fake", "consul"):
        history = kwargs.get("history_revisions", DEFAULT_HISTORY_REVISIONS)
        return ConsulStore(
            backing.consul_addr, prefix=backing.prefix, clock=lambda: NOW, history_revisions=history
        )
    raise AssertionError(f"unknown store {backing.name}")


StoreFactory = Callable[..., Store]


@pytest.fixture(params=STORES)
def store_name(request: pytest.FixtureRequest) -> str:
    """The kind of store under test (one of STORES)."""
    name: str = request.param
    return name


@pytest.fixture
def open_store(store_name: str, tmp_path: Path, consul_fake: FakeConsul) -> Iterator[StoreFactory]:
    """Opens stores of one kind on one backing location; closes them all at the end."""
    opened: list[Store] = []
    with _backing(store_name, tmp_path, consul_fake) as backing:

        def factory(**kwargs: int) -> Store:
            store = _open(backing, **kwargs)
            opened.append(store)
            return store

        try:
            yield factory
        finally:
            for store in opened:
                store.close()


@pytest.fixture
def store(open_store: StoreFactory) -> Store:
    return open_store()


# --- builders ---------------------------------------------------------------------------

DIGEST = "sha256:" + "ab" * 32


def region(id: str = "us", zone: str = "us", name: str = "") -> registry_pb2.Entity:
    return registry_pb2.Entity(
        region=registry_pb2.Region(id=id, residency_zone=zone, display_name=name)
    )


def _admissions(endpoints: list[str], one: str = "") -> registry_pb2.Entity:
    entity = region()
    entity.region.admission_endpoints.extend(endpoints)
    entity.region.admission_endpoint = one
    return entity


def test_admission_endpoints_list_every_instance() -> None:
    assert admission_endpoints(region().region) == ()
    single = region().region
    single.admission_endpoint = "a:1"
    assert admission_endpoints(single) == ("a:1",)
    several = _admissions(["a:1", "a:2"], one="a:2").region
    assert admission_endpoints(several) == ("a:1", "a:2")


def model(id: str = "llama", fallback: str = "", tokens: int = 8192) -> registry_pb2.Entity:
    return registry_pb2.Entity(
        model=registry_pb2.Model(
            id=id,
            kind=common_pb2.MODEL_KIND_LLM,
            fallback_model=fallback,
            max_context_tokens=tokens,
        )
    )


def version(m: str = "llama", v: str = "v1", digest: str = DIGEST) -> registry_pb2.Entity:
    return registry_pb2.Entity(
        version=registry_pb2.Version(model=m, version=v, artifact_digest=digest)
    )


def placement(
    m: str = "llama", v: str = "v1", r: str = "us", pool: str = "default", max_replicas: int = 2
) -> registry_pb2.Entity:
    return registry_pb2.Entity(
        placement=registry_pb2.Placement(
            model=m, version=v, region=r, pool=pool, min_replicas=1, max_replicas=max_replicas
        )
    )


def alias(name: str = "chat", **weights: int) -> registry_pb2.Entity:
    targets = [
        registry_pb2.AliasTarget(model="llama", version=v, weight=w) for v, w in weights.items()
    ]
    return registry_pb2.Entity(
        alias=registry_pb2.Alias(
            name=name, default_targets=registry_pb2.AliasTargets(targets=targets)
        )
    )


def put(entity: registry_pb2.Entity) -> registry_pb2.Mutation:
    return registry_pb2.Mutation(put=entity)


def delete(kind: int, id: str) -> registry_pb2.Mutation:
    return registry_pb2.Mutation(delete=registry_pb2.EntityKey(kind=kind, id=id))  # type: ignore[arg-type]


def base(store: Store) -> int:
    """Region us, model llama, version llama@v1 in one apply."""
    revision, _ = store.apply([put(version()), put(model()), put(region())])
    return revision


def canonical(snapshot: registry_pb2.Snapshot) -> bytes:
    return snapshot.SerializeToString(deterministic=True)


# --- revisions and CAS ------------------------------------------------------------------


def test_empty_store_is_at_revision_zero(store: Store) -> None:
    assert store.revision() == 0
    assert store.snapshot() == registry_pb2.Snapshot(revision=0)
    assert store.changes_since(0) == []


def test_each_apply_bumps_the_revision_by_one(store: Store) -> None:
    assert base(store) == 1  # three entities, one revision
    rev, changes = store.apply([put(placement())])
    assert rev == 2 and [c.kind for c in changes] == [registry_pb2.CHANGE_KIND_PUT]
    rev, changes = store.apply([put(placement(max_replicas=5))])
    assert rev == 3 and changes[0].previous.placement.max_replicas == 2
    rev, changes = store.apply([delete(registry_pb2.ENTITY_KIND_PLACEMENT, "llama@v1/us/default")])
    assert rev == 4 and changes[0].kind == registry_pb2.CHANGE_KIND_DELETE
    assert changes[0].entity.placement.max_replicas == 5
    assert store.revision() == 4
    snap = store.snapshot()
    assert snap.revision == 4 and not snap.placements
    assert [r.id for r in snap.regions] == ["us"]


def test_noop_apply_keeps_the_revision(store: Store) -> None:
    base(store)
    assert store.apply([put(region()), delete(REGION, "absent")]) == (1, [])
    assert store.apply([]) == (1, [])


def test_get(store: Store) -> None:
    base(store)
    assert store.get((VERSION, "llama@v1")).version.artifact_digest == DIGEST
    with pytest.raises(NotFound):
        store.get((MODEL, "absent"))


def test_cas_mismatch_names_current_revision_and_changes_nothing(store: Store) -> None:
    base(store)
    before = canonical(store.snapshot())
    with pytest.raises(RevisionMismatch) as info:
        store.apply([put(region("eu", "eu"))], expected_revision=0)
    assert info.value.current_revision == 1
    assert "revision 1" in str(info.value)
    assert canonical(store.snapshot()) == before
    assert store.apply([put(region("eu", "eu"))], expected_revision=1)[0] == 2


def test_apply_is_all_or_nothing(store: Store) -> None:
    base(store)
    before = canonical(store.snapshot())
    bad = version(v="v2", digest="sha256:nothex")
    with pytest.raises(ValidationError):
        store.apply([put(region("eu", "eu")), put(bad)])
    with pytest.raises(PreconditionFailed):
        store.apply([put(region("eu", "eu")), put(placement(r="apac"))])
    assert store.revision() == 1
    assert canonical(store.snapshot()) == before
    assert store.changes_since(1) == []


def test_create_time_is_set_by_the_store(store: Store) -> None:
    base(store)
    assert store.get((VERSION, "llama@v1")).version.create_time.ToDatetime(UTC) == NOW


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entity", "field"),
    [
        (region(id=""), "region.id"),
        (region(id="US"), "region.id"),
        (region(zone=""), "region.residency_zone"),
        (_admissions(["a:1", "a:1"]), "region.admission_endpoints"),
        (_admissions(["a:1", ""]), "region.admission_endpoints"),
        (_admissions(["a:1", "a:2"], one="a:3"), "region.admission_endpoint"),
        (model(id=""), "model.id"),
        (registry_pb2.Entity(model=registry_pb2.Model(id="m")), "model.kind"),
        (version(v=""), "version.version"),
        (version(digest="sha256:" + "AB" * 32), "version.artifact_digest"),
        (version(digest="md5:" + "ab" * 32), "version.artifact_digest"),
        (version(digest="sha256:" + "ab" * 31), "version.artifact_digest"),
        (alias(v1=60, v2=30), "alias.default_targets"),
        (alias(), "alias.default_targets"),
        (placement(pool=""), "placement.pool"),
        (placement(max_replicas=0), "placement.max_replicas"),
        (registry_pb2.Entity(), "entity"),
    ],
)
def test_malformed_entities_are_rejected_naming_the_field(
    store: Store, entity: registry_pb2.Entity, field: str
) -> None:
    base(store)
    with pytest.raises(ValidationError) as info:
        store.apply([put(entity)])
    assert info.value.field == field
    assert field in str(info.value)
    assert store.revision() == 1


def test_alias_weights_per_region_must_sum_to_100(store: Store) -> None:
    base(store)
    entity = alias(v1=100)
    entity.alias.region_targets["us"].targets.add(model="llama", version="v1", weight=99)
    with pytest.raises(ValidationError, match=r"alias.region_targets\[us\].*got 99"):
        store.apply([put(entity)])
    entity.alias.region_targets["us"].targets[0].weight = 100
    assert store.apply([put(entity)])[0] == 2


def test_malformed_mutations_are_rejected(store: Store) -> None:
    with pytest.raises(ValidationError, match="mutations"):
        store.apply([registry_pb2.Mutation()])
    with pytest.raises(ValidationError, match=r"delete\.kind"):
        store.apply([delete(0, "us")])
    with pytest.raises(ValidationError, match=r"delete\.id"):
        store.apply([delete(REGION, "")])


@pytest.mark.parametrize(
    ("entity", "missing"),
    [
        (placement(r="eu"), "region 'eu'"),
        (placement(v="v9"), "version 'llama@v9'"),
        (version(m="mistral"), "model 'mistral'"),
        (model("small", fallback="tiny"), "model 'tiny'"),
        (alias(v1=50, v2=50), "version 'llama@v2'"),
        (
            registry_pb2.Entity(replica=registry_pb2.Replica(id="r0", region="eu", endpoint="h:1")),
            "region 'eu'",
        ),
    ],
)
def test_unknown_references_name_what_is_missing(
    store: Store, entity: registry_pb2.Entity, missing: str
) -> None:
    base(store)
    with pytest.raises(PreconditionFailed, match=f"unknown {missing}"):
        store.apply([put(entity)])
    assert store.revision() == 1


def test_deleting_a_referenced_entity_fails(store: Store) -> None:
    base(store)
    store.apply([put(placement())])
    with pytest.raises(PreconditionFailed, match="unknown version 'llama@v1'"):
        store.apply([delete(VERSION, "llama@v1")])
    # Deleting the referrer first in the same batch is fine.
    rev, changes = store.apply(
        [
            delete(registry_pb2.ENTITY_KIND_PLACEMENT, "llama@v1/us/default"),
            delete(VERSION, "llama@v1"),
        ]
    )
    assert rev == 3 and len(changes) == 2


def test_alias_name_must_not_collide_with_a_model(store: Store) -> None:
    base(store)
    with pytest.raises(ValidationError, match="collides"):
        store.apply([put(alias("llama", v1=100))])


def test_versions_are_immutable(store: Store) -> None:
    base(store)
    with pytest.raises(PreconditionFailed, match="immutable"):
        store.apply([put(version(digest="sha256:" + "cd" * 32))])
    # An identical re-put (create_time aside) is a no-op that keeps the revision.
    assert store.apply([put(version())]) == (1, [])
    with pytest.raises(PreconditionFailed, match="immutable"):
        store.apply([put(version(v="v2")), put(version(v="v2", digest="sha256:" + "cd" * 32))])
    assert store.revision() == 1


# --- history and durability -------------------------------------------------------------


def test_changes_since_is_ordered_and_gap_free(store: Store) -> None:
    base(store)
    store.apply([put(region("eu", "eu")), put(placement())])
    store.apply([put(placement(r="eu"))])
    events = store.changes_since(0)
    assert events is not None
    assert [e.revision for e in events] == [1, 2, 3]
    assert [len(e.changes.changes) for e in events] == [3, 2, 1]
    assert events[1].changes.changes[1].entity.placement.region == "us"
    tail = store.changes_since(2)
    assert tail is not None and [e.revision for e in tail] == [3]
    assert store.changes_since(3) == []
    assert store.changes_since(4) is None  # ahead of the store


def test_changes_since_past_retention_is_none(open_store: StoreFactory) -> None:
    store = open_store(history_revisions=3)
    base(store)
    for i in range(5):
        store.apply([put(region(f"r{i}", "us"))])
    assert store.revision() == 6
    assert store.changes_since(2) is None
    events = store.changes_since(3)
    assert events is not None and [e.revision for e in events] == [4, 5, 6]


def test_reopening_gives_the_same_state(open_store: StoreFactory) -> None:
    store = open_store()
    base(store)
    store.apply([put(placement())])
    before = canonical(store.snapshot())
    store.close()
    reopened = open_store()
    assert reopened.revision() == 2
    assert canonical(reopened.snapshot()) == before
    events = reopened.changes_since(0)
    assert events is not None and [e.revision for e in events] == [1, 2]
    assert reopened.apply([put(region("eu", "eu"))])[0] == 3


def test_registry_id_is_fixed_at_creation_and_unique_per_store(
    open_store: StoreFactory, store_name: str, tmp_path: Path, consul_fake: FakeConsul
) -> None:
    store = open_store()
    registry_id = store.registry_id()
    assert len(registry_id) == 32 and int(registry_id, 16) >= 0
    base(store)
    store.close()
    reopened = open_store()
    assert reopened.registry_id() == registry_id
    assert open_store().registry_id() == registry_id  # a second handle agrees
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    with _backing(store_name, other_dir, consul_fake) as other:
        fresh = _open(other)
        try:
            assert fresh.registry_id() != registry_id
            # Same revisions, different registries: only the id tells them apart.
            base(fresh)
            assert fresh.revision() == reopened.revision()
        finally:
            fresh.close()


def test_two_handles_on_one_store_see_each_others_writes(open_store: StoreFactory) -> None:
    a, b = open_store(), open_store()
    base(a)
    assert b.revision() == 1
    b.apply([put(region("eu", "eu"))], expected_revision=1)
    with pytest.raises(RevisionMismatch):
        a.apply([put(region("apac", "apac"))], expected_revision=1)
    assert canonical(a.snapshot()) == canonical(b.snapshot())


# --- property: snapshot at r + changes since r == final state ----------------------------

REGIONS = ["us", "eu", "apac"]
MODELS = ["llama", "mistral"]
VERSIONS = ["v1", "v2"]


def _mutations() -> st.SearchStrategy[registry_pb2.Mutation]:
    # Digests are a function of the key so re-puts are no-ops, never immutability errors.
    def digest(m: str, v: str) -> str:
        return "sha256:" + hashlib.sha256(f"{m}@{v}".encode()).hexdigest()

    puts = st.one_of(
        st.builds(region, st.sampled_from(REGIONS), st.just("us"), st.sampled_from(["", "x"])),
        st.builds(model, st.sampled_from(MODELS), st.just(""), st.integers(1, 3)),
        st.builds(
            lambda m, v: version(m, v, digest(m, v)),
            st.sampled_from(MODELS),
            st.sampled_from(VERSIONS),
        ),
        st.builds(
            lambda m, v, r, n: placement(m, v, r, max_replicas=n),
            st.sampled_from(MODELS),
            st.sampled_from(VERSIONS),
            st.sampled_from(REGIONS),
            st.integers(1, 3),
        ),
    ).map(put)
    deletes = st.one_of(
        st.builds(lambda r: delete(REGION, r), st.sampled_from(REGIONS)),
        st.builds(lambda m: delete(MODEL, m), st.sampled_from(MODELS)),
        st.builds(
            lambda m, v: delete(VERSION, f"{m}@{v}"),
            st.sampled_from(MODELS),
            st.sampled_from(VERSIONS),
        ),
    )
    return st.one_of(puts, puts, deletes)


@pytest.mark.parametrize("name", STORES)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(st.lists(_mutations(), min_size=1, max_size=4), max_size=25))
def test_snapshot_plus_changes_replays_to_the_final_state(
    name: str, consul_fake: FakeConsul, batches: list[list[registry_pb2.Mutation]]
) -> None:
    with (
        tempfile.TemporaryDirectory() as directory,
        _backing(name, Path(directory), consul_fake) as backing,
    ):
        store = _open(backing)
        try:
            _check_replay(store, batches)
        finally:
            store.close()


def _check_replay(store: Store, batches: list[list[registry_pb2.Mutation]]) -> None:
    snapshots = {0: store.snapshot()}
    for batch in batches:
        before = store.revision()
        try:
            revision, changes = store.apply(batch, expected_revision=before)
        except StoreError:
            assert store.revision() == before
            continue
        assert revision == (before + 1 if changes else before)
        snapshots[revision] = store.snapshot()
    final = store.snapshot()
    for revision, snapshot in snapshots.items():
        events = store.changes_since(revision)
        assert events is not None
        assert [e.revision for e in events] == list(range(revision + 1, final.revision + 1))
        state: dict[Key, registry_pb2.Entity] = state_from_snapshot(snapshot)
        for event in events:
            apply_changes(state, event.changes.changes)
        assert sorted(k for k in state) == sorted(state_from_snapshot(final))
        assert {k: canonical_entity(e) for k, e in state.items()} == {
            k: canonical_entity(e) for k, e in state_from_snapshot(final).items()
        }


def canonical_entity(entity: registry_pb2.Entity) -> bytes:
    return entity.SerializeToString(deterministic=True)
