"""The gateway's error table and model catalog edge cases (pure, in process)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from spillgate._proto import registry_pb2
from spillgate.gateway.errors import GatewayError, as_gateway_error
from spillgate.gateway.models import ModelCatalog
from spillgate.status import RpcError, bad_request, retry_info
from tests import fleet_helpers as fh


def _rpc_error(error: RpcError) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(*error.trailing_metadata())
    return grpc.aio.AioRpcError(error.code, grpc.aio.Metadata(), trailing, error.message)


def test_a_neighbours_shed_keeps_its_retry_info() -> None:
    shed = RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no capacity", (retry_info(750),))
    mapped = as_gateway_error(_rpc_error(shed))
    assert mapped.code == grpc.StatusCode.RESOURCE_EXHAUSTED and mapped.retry_after_ms == 750
    assert mapped.rpc_error().trailing_metadata()  # and passes it on


def test_a_dependencys_bad_request_keeps_its_field() -> None:
    bad = RpcError(
        grpc.StatusCode.INVALID_ARGUMENT, "priority: unknown", (bad_request("priority", "x"),)
    )
    mapped = as_gateway_error(_rpc_error(bad))
    assert (mapped.code, mapped.field) == (grpc.StatusCode.INVALID_ARGUMENT, "priority")


def test_a_dependency_down_is_unavailable_without_its_text() -> None:
    down = RpcError(grpc.StatusCode.INTERNAL, "stack trace at line 3")
    mapped = as_gateway_error(_rpc_error(down))
    assert mapped.code == grpc.StatusCode.UNAVAILABLE and "line 3" not in mapped.message


def test_no_registry_snapshot_yet_is_retryable_not_unknown() -> None:
    with pytest.raises(GatewayError) as err:
        ModelCatalog().limits("chat")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_an_alias_whose_targets_are_gone_does_not_break_the_listing() -> None:
    entities: list[registry_pb2.Entity] = [
        *fh.model("llm-small"),
        fh.alias("chat", "llm-small", "v1"),
        fh.alias("stale", "gone", "v1"),
    ]
    catalog = ModelCatalog(fh.state(entities))
    names = {m.model: m for m in catalog.listings("*")}
    assert names["stale"].alias and names["stale"].max_output_tokens == 0
    assert names["chat"].max_output_tokens == 512


def test_key_lookups_are_cached_briefly_and_revokes_here_apply_at_once(tmp_path: Path) -> None:
    from spillgate.gateway.keys import CachedLookups
    from spillgate.gateway.sqlite_keys import SQLiteKeyStore

    now = [0.0]
    store = SQLiteKeyStore(tmp_path / "keys.db")
    try:
        cached = CachedLookups(store, ttl_s=5.0, clock=lambda: now[0])
        issued = cached.create("acme")
        assert cached.lookup(issued.key) is not None
        store.revoke(issued.record.key_id)  # revoked by another process (the CLI)
        assert cached.lookup(issued.key) is not None  # still cached ...
        now[0] = 5.1
        assert cached.lookup(issued.key) is None  # ... for at most ttl_s
        other = cached.create("acme")
        assert cached.lookup(other.key) is not None
        cached.revoke(other.record.key_id)  # revoked through this process: at once
        assert cached.lookup(other.key) is None
    finally:
        store.close()


def test_envoys_circuit_breaker_on_the_mesh_is_resource_exhausted() -> None:
    refused = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(("x-envoy-overloaded", "true")),
        grpc.aio.Metadata(),
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    )
    mapped = as_gateway_error(refused)
    assert mapped.code == grpc.StatusCode.RESOURCE_EXHAUSTED and mapped.retry_after_ms > 0
