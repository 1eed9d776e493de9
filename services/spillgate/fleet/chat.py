"""`spillgate chat`: one streamed GatewayService.Chat call, then how it was routed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import grpc

from spillgate._proto import common_pb2, gateway_pb2, gateway_pb2_grpc

DEADLINE_S = 60.0


class ChatError(Exception):
    """The call failed; the message is for the user."""


def _key(body: Mapping[str, Any], explicit: str | None) -> str:
    if explicit:
        return explicit
    path = body.get("dev_key_file")
    if not path:
        raise ChatError("the fleet has no dev key (started with --no-gateway?); pass --key")
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ChatError(f"cannot read the dev key {path}: {exc.strerror}") from None


def route_line(route: gateway_pb2.RouteInfo) -> str:
    """`routed: ...` summary of a RouteInfo."""
    action = common_pb2.Action.Name(route.action).removeprefix("ACTION_").lower()
    parts = [
        f"region={route.region}",
        f"replica={route.replica}",
        f"model={route.model}@{route.version}",
        f"action={action}",
        f"reason={route.reason}",
        f"hops={route.hops}",
        f"queue={route.queue_ms:.0f}ms",
        f"ttft={route.ttft_ms:.0f}ms",
    ]
    if route.HasField("estimate"):
        e = route.estimate
        parts.append(f"estimate={e.total_ms:.0f}/{e.budget_ms:.0f}ms")
    return "routed: " + " ".join(parts)


def _retry_after(exc: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

    trailing: tuple[tuple[str, str | bytes], ...] = ()
    if isinstance(exc, grpc.Call):
        trailing = tuple(exc.trailing_metadata() or ())
    raw: object = None
    for item in trailing:
        if item[0] == "grpc-status-details-bin":
            raw = item[1]
    if not isinstance(raw, bytes):
        return ""
    for detail in status_pb2.Status.FromString(raw).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            ms = info.retry_delay.seconds * 1000 + info.retry_delay.nanos // 1_000_000
            return f" (retry after {ms} ms)"
    return ""


def _target(body: Mapping[str, Any], args: argparse.Namespace) -> tuple[str, str]:
    """(region, gRPC address) the user asked for: the region's ingress Envoy (its public
    endpoint) when the fleet runs one, else its gateway."""
    regions: Mapping[str, Any] = body.get("regions", {})
    region = args.region or next(iter(regions), "")
    if region not in regions:
        raise ChatError(f"unknown region {region!r} (regions: {', '.join(regions)})")
    ingress = (regions[region].get("ingress") or {}).get("grpc")
    if ingress:
        return region, str(ingress)
    gateway = (regions[region].get("gateway") or {}).get("grpc")
    if not gateway:
        raise ChatError(f"region {region!r} has no gateway (started with --no-gateway?)")
    return region, str(gateway)


def _request(body: Mapping[str, Any], args: argparse.Namespace) -> gateway_pb2.ChatRequest:
    budgets: Mapping[str, float] = body.get("budgets_ms", {})
    budget = args.budget_ms if args.budget_ms is not None else budgets.get(args.priority, 0)
    request = gateway_pb2.ChatRequest(
        model=args.model or body.get("model") or "chat",
        messages=[gateway_pb2.ChatMessage(role="user", content=args.prompt)],
        max_tokens=args.max_tokens,
        session_id=args.session_id,
        priority=common_pb2.Priority.Value(f"PRIORITY_{args.priority.upper()}"),
        allow_degrade=args.allow_degrade,
        budget_ms=int(budget),
    )
    return request


def chat(body: Mapping[str, Any], args: argparse.Namespace, out: TextIO) -> int:
    """Stream the answer to `out` as it arrives, then the route; 0 on success."""
    if args.burst:
        return burst(body, args, out)
    _, gateway = _target(body, args)
    request = _request(body, args)
    metadata = (("authorization", f"Bearer {_key(body, args.key)}"),)
    route: gateway_pb2.RouteInfo | None = None
    usage = None
    with grpc.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        try:
            for chunk in stub.Chat(request, metadata=metadata, timeout=DEADLINE_S):
                if chunk.delta:
                    out.write(chunk.delta)
                    out.flush()
                if chunk.HasField("route"):
                    route = chunk.route
                if chunk.HasField("usage"):
                    usage = chunk.usage
        except grpc.RpcError as exc:
            out.write("\n")
            code = exc.code().name
            details = exc.details()
            hint = _retry_after(exc)
            if "retry after" in (details or ""):
                hint = ""  # the message already says it
            print(f"spillgate chat: {code}: {details}{hint}", file=sys.stderr)
            return 1
    out.write("\n")
    if route is not None:
        print(route_line(route), file=out)
    if usage is not None:
        print(f"usage: {usage}".replace("\n", " ").strip(), file=out)
    return 0


def burst(body: Mapping[str, Any], args: argparse.Namespace, out: TextIO) -> int:
    """Send `args.burst` copies at once (one session each); print how they were routed."""
    import asyncio
    from collections import Counter

    region, gateway = _target(body, args)
    request = _request(body, args)
    metadata = (("authorization", f"Bearer {_key(body, args.key)}"),)
    routes: Counter[tuple[str, str, str]] = Counter()
    errors: Counter[str] = Counter()

    async def one(stub: gateway_pb2_grpc.GatewayServiceAsyncStub, i: int) -> None:
        copy = gateway_pb2.ChatRequest()
        copy.CopyFrom(request)
        copy.session_id = f"{args.session_id or 'burst'}-{i}"
        route = None
        try:
            async for chunk in stub.Chat(copy, metadata=metadata, timeout=DEADLINE_S):
                if chunk.HasField("route"):
                    route = chunk.route
        except grpc.aio.AioRpcError as exc:
            why = (exc.details() or "").split(";")[0]
            errors[f"{exc.code().name}: {why}"] += 1
            return
        if route is not None:
            action = common_pb2.Action.Name(route.action).removeprefix("ACTION_").lower()
            routes[(route.region, action, route.reason)] += 1

    async def run() -> None:
        async with grpc.aio.insecure_channel(gateway) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            await asyncio.gather(*(one(stub, i) for i in range(args.burst)))

    asyncio.run(run())
    print(f"{args.burst} requests into {region}:", file=out)
    for (where, action, reason), n in sorted(routes.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d}  ran in {where:6s} {action:9s} {reason}", file=out)
    for code, n in sorted(errors.items()):
        print(f"  {n:4d}  {code}", file=out)
    return 0 if routes else 1
