"""`spillgate registry ...`: serve the registry, apply spec files, read, watch and delete.

Client commands talk gRPC to the registry named by `--registry` (default
$SPILLGATE_REGISTRY or 127.0.0.1:7070). gRPC errors are printed as `CODE: message` with exit
status 1; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import grpc

from spillgate._proto import registry_pb2, registry_pb2_grpc
from spillgate.registry import spec
from spillgate.registry.client import CHANNEL_OPTIONS
from spillgate.registry.store import (
    ALIAS,
    MODEL,
    PLACEMENT,
    REGION,
    REPLICA,
    VERSION,
    EntityKind,
    entity_key,
    kind_name,
)
from spillgate.registry.validate import admission_endpoints

DEFAULT_REGISTRY = "127.0.0.1:7070"
TIMEOUT_S = 10.0

# Accepted spellings of kinds on the command line.
_PLURALS: dict[EntityKind, str] = {
    REGION: "regions",
    MODEL: "models",
    VERSION: "versions",
    ALIAS: "aliases",
    PLACEMENT: "placements",
    REPLICA: "replicas",
}
_KINDS: dict[str, EntityKind] = {kind_name(k): k for k in _PLURALS} | {
    plural: k for k, plural in _PLURALS.items()
}


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def _parse_kind(name: str) -> EntityKind:
    try:
        return _KINDS[name.lower()]
    except KeyError:
        raise UsageError(
            f"unknown kind {name!r} (one of: {', '.join(sorted(set(_KINDS)))})"
        ) from None


# -- tables -------------------------------------------------------------------------------


def _short(value: object) -> str:
    return str(value) if value not in (None, "") else "-"


def _targets(t: registry_pb2.AliasTargets) -> str:
    return " ".join(f"{x.model}@{x.version}:{x.weight}" for x in t.targets) or "-"


def _timestamp(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return str(ts.ToDatetime(tzinfo=UTC).strftime("%H:%M:%S"))


# kind -> (column headers, row function)
_COLUMNS: dict[EntityKind, tuple[tuple[str, ...], Callable[[registry_pb2.Entity], list[str]]]] = {
    REGION: (
        ("ID", "ZONE", "NAME", "RTT_MS", "GATEWAY", "ADMISSION", "STATE"),
        lambda e: [
            e.region.id,
            _short(e.region.residency_zone),
            _short(e.region.display_name),
            " ".join(f"{p}={ms:g}" for p, ms in sorted(e.region.rtt_ms.items())) or "-",
            _short(e.region.gateway_endpoint),
            ",".join(admission_endpoints(e.region)) or "-",
            "draining" if e.region.draining else "serving",
        ],
    ),
    MODEL: (
        ("ID", "KIND", "PARAMS", "CONTEXT", "MAX_OUT", "FALLBACK"),
        lambda e: [
            e.model.id,
            spec.enum_short_name("MODEL_KIND_", _enum_name("ModelKind", e.model.kind)),
            f"{e.model.parameter_count / 1e9:g}B" if e.model.parameter_count else "-",
            str(e.model.max_context_tokens),
            str(e.model.max_output_tokens),
            _short(e.model.fallback_model),
        ],
    ),
    VERSION: (
        ("MODEL", "VERSION", "TRITON_MODEL", "DIGEST", "CREATED"),
        lambda e: [
            e.version.model,
            e.version.version,
            _short(e.version.triton_model_name),
            e.version.artifact_digest[:19] + "…",
            _timestamp(e.version.create_time),
        ],
    ),
    ALIAS: (
        ("NAME", "DEFAULT", "REGIONS"),
        lambda e: [
            e.alias.name,
            _targets(e.alias.default_targets),
            "; ".join(f"{r}: {_targets(t)}" for r, t in sorted(e.alias.region_targets.items()))
            or "-",
        ],
    ),
    PLACEMENT: (
        ("MODEL", "VERSION", "REGION", "POOL", "MIN", "MAX"),
        lambda e: [
            e.placement.model,
            e.placement.version,
            e.placement.region,
            e.placement.pool,
            str(e.placement.min_replicas),
            str(e.placement.max_replicas),
        ],
    ),
    REPLICA: (
        ("ID", "REGION", "POOL", "STATE", "BACKEND", "ENDPOINT", "LOADED", "LEASE"),
        lambda e: [
            e.replica.id,
            e.replica.region,
            _short(e.replica.pool),
            spec.enum_short_name("REPLICA_STATE_", _enum_name("ReplicaState", e.replica.state)),
            spec.enum_short_name("BACKEND_KIND_", _enum_name("BackendKind", e.replica.backend)),
            e.replica.endpoint,
            " ".join(f"{v.model}@{v.version}" for v in e.replica.loaded) or "-",
            _timestamp(e.replica.lease_expires_at),
        ],
    ),
}


def _enum_name(enum: str, value: int) -> str:
    from spillgate._proto import common_pb2

    name: str = getattr(common_pb2, enum).Name(value)
    return name


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table (no borders), header first."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    header = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    return "\n".join([header, *lines])


def entities_table(kind: EntityKind, entities: Sequence[registry_pb2.Entity]) -> str:
    headers, row = _COLUMNS[kind]
    return render_table(headers, [row(e) for e in entities])


# -- diff ---------------------------------------------------------------------------------


def _flat(body: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in body.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = json.dumps(value, sort_keys=True)
    return out


def describe_change(change: registry_pb2.Change) -> list[str]:
    """Human-readable lines for one change: `+ kind id`, `- kind id`, `~ kind id` + fields."""
    kind, ident = entity_key(change.entity)
    name = f"{kind_name(kind)} {ident}"
    if change.kind == registry_pb2.CHANGE_KIND_DELETE:
        return [f"- {name}"]
    if not change.HasField("previous"):
        return [f"+ {name}"]
    old, new = _flat(spec.to_spec_dict(change.previous)), _flat(spec.to_spec_dict(change.entity))
    lines = [f"~ {name}"]
    for field in sorted(set(old) | set(new)):
        if old.get(field) != new.get(field):
            lines.append(f"    {field}: {old.get(field, '-')} -> {new.get(field, '-')}")
    return lines


def _summary(changes: Sequence[registry_pb2.Change]) -> str:
    adds = sum(
        1 for c in changes if c.kind == registry_pb2.CHANGE_KIND_PUT and not c.HasField("previous")
    )
    deletes = sum(1 for c in changes if c.kind == registry_pb2.CHANGE_KIND_DELETE)
    return f"{adds} to add, {len(changes) - adds - deletes} to change, {deletes} to delete"


# -- commands -----------------------------------------------------------------------------


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, registry_pb2_grpc.RegistryServiceStub]:
    channel = grpc.insecure_channel(args.registry, options=CHANNEL_OPTIONS)
    return channel, registry_pb2_grpc.RegistryServiceStub(channel)


def _apply(args: argparse.Namespace, out: TextIO) -> int:
    try:
        entities = spec.parse_spec(Path(args.file).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    except spec.SpecError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    mutations = [registry_pb2.Mutation(put=e) for e in entities]
    prune = sorted({entity_key(e)[0] for e in entities} - {REPLICA}) if args.prune else []
    channel, stub = _stub(args)
    with channel:
        plan = stub.Apply(
            registry_pb2.ApplyRequest(mutations=mutations, dry_run=True, prune_kinds=prune),
            timeout=TIMEOUT_S,
        )
        for change in plan.changes:
            print("\n".join(describe_change(change)), file=out)
        print(f"plan at revision {plan.revision}: {_summary(plan.changes)}", file=out)
        if args.dry_run or not plan.changes:
            if not plan.changes:
                print("nothing to do", file=out)
            return 0
        # One CAS transaction at the planned revision: exactly the diff shown, or nothing.
        done = stub.Apply(
            registry_pb2.ApplyRequest(
                mutations=mutations, expected_revision=plan.revision, prune_kinds=prune
            ),
            timeout=TIMEOUT_S,
        )
    print(f"applied: revision {done.revision}", file=out)
    return 0


def _get(args: argparse.Namespace, out: TextIO) -> int:
    kind = _parse_kind(args.kind)
    channel, stub = _stub(args)
    with channel:
        if args.id:
            got = stub.Get(
                registry_pb2.GetRequest(key=registry_pb2.EntityKey(kind=kind, id=args.id)),
                timeout=TIMEOUT_S,
            )
            entities, revision = [got.entity], got.revision
        else:
            listed = stub.List(
                registry_pb2.ListRequest(kind=kind, region=args.region or ""), timeout=TIMEOUT_S
            )
            entities, revision = list(listed.entities), listed.revision
    if args.output == "json":
        body = {
            "revision": revision,
            "kind": kind_name(kind),
            "items": [spec.to_spec_dict(e) for e in entities],
        }
        print(json.dumps(body, indent=2), file=out)
    elif entities:
        print(entities_table(kind, entities), file=out)
    else:
        print(f"no {kind_name(kind)}s (revision {revision})", file=out)
    return 0


def _delete(args: argparse.Namespace, out: TextIO) -> int:
    kind = _parse_kind(args.kind)
    request = registry_pb2.DeleteRequest(key=registry_pb2.EntityKey(kind=kind, id=args.id))
    if args.expected_revision is not None:
        request.expected_revision = args.expected_revision
    channel, stub = _stub(args)
    with channel:
        done = stub.Delete(request, timeout=TIMEOUT_S)
    if done.found:
        print(f"deleted {kind_name(kind)} {args.id}: revision {done.revision}", file=out)
    else:
        print(f"{kind_name(kind)} {args.id} did not exist (revision {done.revision})", file=out)
    return 0


def _watch(args: argparse.Namespace, out: TextIO) -> int:
    request = registry_pb2.WatchRequest(
        from_revision=args.from_revision, kinds=[_parse_kind(k) for k in args.kinds]
    )
    channel, stub = _stub(args)
    with channel:
        for response in stub.Watch(request):
            event = response.event
            stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
            which = event.WhichOneof("event")
            if which == "snapshot":
                s = event.snapshot
                counts = (
                    f"{len(s.regions)} regions, {len(s.models)} models, "
                    f"{len(s.versions)} versions, {len(s.aliases)} aliases, "
                    f"{len(s.placements)} placements, {len(s.replicas)} replicas"
                )
                print(f"{stamp} rev {event.revision:<6} snapshot: {counts}", file=out)
            elif which == "changes":
                for change in event.changes.changes:
                    for line in describe_change(change):
                        print(f"{stamp} rev {event.revision:<6} {line}", file=out)
            out.flush()
            if args.until_revision and event.revision >= args.until_revision:
                return 0
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spillgate registry", description=__doc__)
    p.add_argument(
        "--registry",
        default=os.environ.get("SPILLGATE_REGISTRY", DEFAULT_REGISTRY),
        help="registry gRPC address host:port (default: $SPILLGATE_REGISTRY or %(default)s)",
    )
    sub = p.add_subparsers(dest="action", required=True)

    # Handled before parsing (see main); listed here for --help.
    sub.add_parser("serve", help="run the registry server (options: serve --help)")

    a = sub.add_parser("apply", help="show the diff of a spec file, then apply it in one CAS")
    a.add_argument("-f", "--file", required=True, help="registry spec TOML")
    a.add_argument("--dry-run", action="store_true", help="show the diff only")
    a.add_argument(
        "--prune",
        action="store_true",
        help="also delete entities of the kinds in the file that the file does not list "
        "(replicas are never pruned: they register themselves)",
    )
    a.set_defaults(func=_apply)

    g = sub.add_parser("get", help="list one kind as a table, or one entity")
    g.add_argument("kind", help="regions, models, versions, aliases, placements, replicas")
    g.add_argument("id", nargs="?", help="one entity's key (e.g. llm-large@v1)")
    g.add_argument("--region", help="only this region's entities")
    g.add_argument("-o", "--output", choices=("table", "json"), default="table")
    g.set_defaults(func=_get)

    d = sub.add_parser("delete", help="delete one entity")
    d.add_argument("kind")
    d.add_argument("id")
    d.add_argument("--expected-revision", type=int, help="fail (ABORTED) if the registry moved")
    d.set_defaults(func=_delete)

    w = sub.add_parser("watch", help="print the snapshot, then every change as it commits")
    w.add_argument("--from-revision", type=int, default=0, help="resume after this revision")
    w.add_argument("--kinds", nargs="*", default=[], help="only these kinds' changes")
    w.add_argument("--until-revision", type=int, default=0, help="exit once this revision is seen")
    w.set_defaults(func=_watch)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # The server parses its own options (argparse REMAINDER drops leading options).
        from spillgate.registry.app import main as serve_main

        return serve_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args, out)
    except UsageError as exc:
        print(f"spillgate registry {args.action}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code_name = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code_name == "UNAVAILABLE":
            details = f"cannot reach the registry at {args.registry} ({details})"
        print(f"spillgate registry {args.action}: {code_name}: {details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
