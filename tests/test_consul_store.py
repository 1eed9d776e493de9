"""ConsulStore beyond the shared contract: multi-txn applies, crash recovery, blocking waits,
an unreachable agent, the app's `--store consul`; and the fake's own Consul semantics.

All against tests/consul_fake.py (a fake, not Consul); the shared contract suite in
test_registry_store.py also runs against a real agent when CONSUL_HTTP_ADDR is set.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing

import consul  # type: ignore[import-untyped]
import grpc
import pytest
from conftest import start_service
from consul_fake import FakeConsul

from spillgate._proto import registry_pb2
from spillgate.registry.consul_store import ConsulStore
from spillgate.registry.errors import to_rpc_error
from spillgate.registry.store import REGION, StoreUnavailable, ValidationError


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeConsul]:
    with FakeConsul() as f:
        yield f


@pytest.fixture
def client(fake: FakeConsul) -> Iterator[consul.Consul]:
    host, port = fake.addr.split(":")
    c = consul.Consul(host=host, port=int(port))
    yield c
    c.http.session.close()


@pytest.fixture
def prefix(client: consul.Consul) -> Iterator[str]:
    p = f"t/{uuid.uuid4().hex}/"
    yield p
    client.kv.delete(p, recurse=True)


def _regions(n: int, start: int = 0) -> list[registry_pb2.Mutation]:
    return [
        registry_pb2.Mutation(
            put=registry_pb2.Entity(region=registry_pb2.Region(id=f"r{i}", residency_zone="z"))
        )
        for i in range(start, start + n)
    ]


def _meta(client: consul.Consul, prefix: str) -> dict[str, int]:
    _, entry = client.kv.get(prefix + "state/meta")
    result: dict[str, int] = json.loads(entry["Value"])
    return result


def _entity_keys(client: consul.Consul, prefix: str) -> list[str]:
    _, keys = client.kv.get(prefix + "state/entities/", keys=True)
    return sorted(keys or [])


# --- the store --------------------------------------------------------------------------


def test_a_batch_larger_than_one_txn_commits_at_one_revision(
    fake: FakeConsul, client: consul.Consul, prefix: str
) -> None:
    with (
        closing(ConsulStore(fake.addr, prefix=prefix)) as a,
        closing(ConsulStore(fake.addr, prefix=prefix)) as b,
    ):
        assert b.revision() == 0
        revision, changes = a.apply(_regions(150))  # 150 entity writes > 64 ops
        assert revision == 1 and len(changes) == 150
        assert _meta(client, prefix) == {"revision": 1, "materialized": 1}
        assert len(_entity_keys(client, prefix)) == 150
        assert len(b.snapshot().regions) == 150
        events = b.changes_since(0)
        assert events is not None and [len(e.changes.changes) for e in events] == [150]


def test_a_writer_dying_after_its_commit_loses_nothing(
    fake: FakeConsul, client: consul.Consul, prefix: str
) -> None:
    with closing(_CrashAfterCommit(fake.addr, prefix=prefix)) as crashing:
        assert crashing.apply(_regions(100))[0] == 1
    # Committed but not materialized: meta says so and no entity key was written.
    assert _meta(client, prefix) == {"revision": 1, "materialized": 0}
    assert _entity_keys(client, prefix) == []
    with closing(ConsulStore(fake.addr, prefix=prefix)) as reader:
        # Readers replay the change record over the (partial) entity keys.
        assert reader.revision() == 1 and len(reader.snapshot().regions) == 100
        # The next writer finishes the dead writer's step 2 before it commits.
        assert reader.apply(_regions(1, start=100))[0] == 2
    assert _meta(client, prefix) == {"revision": 2, "materialized": 2}
    assert len(_entity_keys(client, prefix)) == 101
    with closing(ConsulStore(fake.addr, prefix=prefix)) as fresh:
        assert len(fresh.snapshot().regions) == 101


def test_a_late_step_two_cannot_overwrite_a_newer_revision(
    fake: FakeConsul, client: consul.Consul, prefix: str
) -> None:
    with closing(_CrashAfterCommit(fake.addr, prefix=prefix)) as slow:
        slow.apply(_regions(100))
        stale_writes = slow._entity_writes(  # what the slow writer would still write
            (slow.changes_since(0) or [])[0].changes.changes
        )
        with closing(ConsulStore(fake.addr, prefix=prefix)) as other:
            renamed = _regions(1)[0]
            renamed.put.region.display_name = "newer"
            assert other.apply([renamed])[0] == 2
        # The slow writer wakes up and runs its step 2 with its old view of state/meta.
        ConsulStore._materialize(slow, 1, stale_writes)
    assert _meta(client, prefix) == {"revision": 2, "materialized": 2}
    with closing(ConsulStore(fake.addr, prefix=prefix)) as fresh:
        assert fresh.get((REGION, "r0")).region.display_name == "newer"


def test_history_is_pruned_in_the_commit_txn(
    fake: FakeConsul, client: consul.Consul, prefix: str
) -> None:
    with closing(ConsulStore(fake.addr, prefix=prefix, history_revisions=2)) as store:
        for i in range(5):
            store.apply(_regions(1, start=i))
        _, keys = client.kv.get(prefix + "changes/", keys=True)
        assert [k.rsplit("/", 1)[1] for k in keys] == [f"{4:020d}", f"{5:020d}"]
        assert store.changes_since(2) is None
        assert [e.revision for e in store.changes_since(3) or []] == [4, 5]


def test_a_batch_too_large_for_a_txn_is_refused(fake: FakeConsul, prefix: str) -> None:
    with closing(ConsulStore(fake.addr, prefix=prefix)) as store:
        big = _regions(1)
        big[0].put.region.display_name = "x" * 400_000
        with pytest.raises(ValidationError, match="split the batch"):
            store.apply(big)
        assert store.revision() == 0


def test_wait_for_revision_is_a_blocking_query(fake: FakeConsul, prefix: str) -> None:
    with (
        closing(ConsulStore(fake.addr, prefix=prefix)) as waiter,
        closing(ConsulStore(fake.addr, prefix=prefix)) as writer,
    ):
        assert waiter.wait_for_revision(0, timeout=0.05) == 0  # runs out, nothing changed
        thread = threading.Thread(target=writer.apply, args=(_regions(1),))
        thread.start()
        try:
            assert waiter.wait_for_revision(0, timeout=10) == 1
        finally:
            thread.join()


def test_an_unreachable_agent_is_unavailable() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(StoreUnavailable, match="unreachable") as info:
        ConsulStore(addr, timeout=2)
    assert to_rpc_error(info.value).code == grpc.StatusCode.UNAVAILABLE
    assert addr not in to_rpc_error(info.value).message


def test_registry_serves_on_consul(fake: FakeConsul, client: consul.Consul, prefix: str) -> None:
    with closing(ConsulStore(fake.addr, prefix=prefix)) as store:
        store.apply(_regions(2))
    args = ["spillgate.registry.app", "--store", "consul", "--consul-addr", fake.addr]
    args += ["--consul-prefix", prefix, "--port", "0"]
    proc = start_service(args, re.compile(r"spillgate registry ready grpc=(\S+) revision=(\d+)"))
    try:
        assert proc.ready[1] == "1"
    finally:
        assert proc.stop() == 0


# --- the fake's Consul semantics ----------------------------------------------------------


def test_fake_kv_cas_and_indexes(client: consul.Consul, prefix: str) -> None:
    key = prefix + "k"
    assert client.kv.put(key, b"a", cas=0) is True
    assert client.kv.put(key, b"b", cas=0) is False  # cas=0: create only
    index, entry = client.kv.get(key)
    assert entry["Value"] == b"a" and int(index) == entry["ModifyIndex"]
    assert entry["CreateIndex"] == entry["ModifyIndex"]
    assert client.kv.put(key, b"b", cas=entry["ModifyIndex"] + 1) is False
    assert client.kv.put(key, b"b", cas=entry["ModifyIndex"]) is True
    _, updated = client.kv.get(key)
    assert updated["CreateIndex"] == entry["CreateIndex"] < updated["ModifyIndex"]
    assert client.kv.delete(key, cas=0) is False
    assert client.kv.delete(key, cas=updated["ModifyIndex"]) is True
    assert client.kv.get(key)[1] is None


def test_fake_txn_is_all_or_nothing_with_consul_errors(client: consul.Consul, prefix: str) -> None:
    ok = client.txn.put([{"KV": {"Verb": "set", "Key": prefix + "a", "Value": "eA=="}}])
    modify = ok["Results"][0]["KV"]["ModifyIndex"]
    assert ok["Results"][0]["KV"]["Value"] is None  # values only for get verbs
    ops = [
        {"KV": {"Verb": "set", "Key": prefix + "b", "Value": "eQ=="}},
        {"KV": {"Verb": "check-index", "Key": prefix + "a", "Index": modify + 1}},
        {"KV": {"Verb": "get", "Key": prefix + "missing"}},
    ]
    with pytest.raises(consul.ConsulException, match="409") as info:
        client.txn.put(ops)
    body = json.loads(str(info.value)[4:])
    assert body["Errors"] == [
        {"OpIndex": 1, "What": f"current modify index {modify} != {modify + 1}"},
        {"OpIndex": 2, "What": f'key "{prefix}missing" doesn\'t exist'},
    ]
    assert client.kv.get(prefix + "b")[1] is None
    too_many = [{"KV": {"Verb": "get-tree", "Key": prefix}}] * 65
    with pytest.raises(consul.ConsulException, match=r"413.*too many operations \(65 > 64\)"):
        client.txn.put(too_many)


def test_fake_blocking_query_returns_on_change(client: consul.Consul, prefix: str) -> None:
    client.kv.put(prefix + "w", b"1")
    index, _ = client.kv.get(prefix + "w")
    same, _ = client.kv.get(prefix + "w", index=index, wait="50ms")
    assert same == index  # the wait ran out
    writer = consul.Consul(host=client.http.host, port=client.http.port)
    thread = threading.Thread(target=writer.kv.put, args=(prefix + "w", b"2"))
    thread.start()
    try:
        new, entry = client.kv.get(prefix + "w", index=index, wait="10s")
    finally:
        thread.join()
        writer.http.session.close()
    assert int(new) > int(index) and entry["Value"] == b"2"


class _CrashAfterCommit(ConsulStore):
    """A writer that dies right after its commit txn (step 1), before step 2."""

    def _materialize(self, revision: int, writes: list[dict[str, dict[str, object]]]) -> None:
        return None
