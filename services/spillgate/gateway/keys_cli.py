"""`spillgate keys create|list|revoke`: manage the gateway's API keys in a key store file.

`create` prints the new key once on stdout (details and a warning on stderr), so
``KEY=$(spillgate keys create ...)`` works. Usage errors exit 2, a missing store or key 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from spillgate.core.decision import Priority
from spillgate.core.ratelimit import DEFAULT_BURST, DEFAULT_RATE_PER_S
from spillgate.gateway.auth import (
    DEFAULT_PRIORITY_CEILING,
    DEFAULT_SCOPES,
    KeyRecord,
    Scope,
    TenantLimits,
)
from spillgate.gateway.sqlite_keys import SQLiteKeyStore

STORE_ENV = "SPILLGATE_KEY_STORE"


def _priority(text: str) -> Priority:
    try:
        return Priority[text.upper()]
    except KeyError:
        names = ", ".join(p.name.lower() for p in Priority)
        raise argparse.ArgumentTypeError(f"unknown priority {text!r} (one of {names})") from None


def _scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    known = {s.value for s in Scope}
    unknown = sorted(scopes - known)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scope {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    return scopes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spillgate keys", description=__doc__)
    store = argparse.ArgumentParser(add_help=False)
    default_store = os.environ.get(STORE_ENV)
    store.add_argument(
        "--store",
        type=Path,
        default=default_store,
        required=default_store is None,
        help=f"key store file (SQLite; default ${STORE_ENV})",
    )
    sub = p.add_subparsers(dest="action", required=True)

    c = sub.add_parser("create", parents=[store], help="make a key and print it once")
    c.add_argument("--tenant", required=True)
    c.add_argument(
        "--priority-ceiling",
        type=_priority,
        default=DEFAULT_PRIORITY_CEILING,
        help="most important priority the key may ask for; more is clamped to it "
        f"(default {DEFAULT_PRIORITY_CEILING.name.lower()})",
    )
    c.add_argument(
        "--scopes",
        type=_scopes,
        default=DEFAULT_SCOPES,
        help="comma-separated: chat, models, admin (default chat,models)",
    )
    c.add_argument(
        "--rps", type=float, default=DEFAULT_RATE_PER_S, help="requests per second (default 20)"
    )
    c.add_argument("--burst", type=int, default=int(DEFAULT_BURST), help="(default 40)")
    c.add_argument("--tokens-per-s", type=float, help="LLM token limit (default: none)")

    sub.add_parser("list", parents=[store], help="show every key (never the secrets)")

    r = sub.add_parser("revoke", parents=[store], help="refuse a key from now on")
    r.add_argument("key_id")
    return p


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(records: Sequence[KeyRecord]) -> list[str]:
    header = ("KEY_ID", "TENANT", "CEILING", "SCOPES", "RATE", "CREATED", "REVOKED")
    rows = [header] + [
        (
            r.key_id,
            r.caller.tenant,
            r.caller.priority_ceiling.name.lower(),
            ",".join(sorted(r.caller.scopes)),
            r.caller.limits.describe(),
            _when(r.created_at),
            _when(r.revoked_at),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path: Path = args.store
    if args.action != "create" and not path.exists():
        print(f"spillgate keys {args.action}: no key store at {path}", file=err)
        return 1
    with SQLiteKeyStore(path) as store:
        if args.action == "create":
            limits = TenantLimits(args.rps, args.burst, args.tokens_per_s)
            issued = store.create(
                args.tenant,
                priority_ceiling=args.priority_ceiling,
                scopes=args.scopes,
                limits=limits,
            )
            caller = issued.record.caller
            print(issued.key, file=out)
            print(
                f"created key {caller.key_id} for tenant {caller.tenant} (ceiling "
                f"{caller.priority_ceiling.name.lower()}, scopes "
                f"{','.join(sorted(caller.scopes))}, {limits.describe()})\n"
                "warning: store this key now; it cannot be shown again",
                file=err,
            )
            return 0
        if args.action == "list":
            for line in _table(store.list()):
                print(line, file=out)
            return 0
        if not store.revoke(args.key_id):
            print(f"spillgate keys revoke: no key {args.key_id!r}", file=err)
            return 1
        print(f"revoked {args.key_id}", file=out)
        return 0


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run `spillgate keys ...`; ``out``/``err`` default to the current sys.stdout/stderr."""
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        return _run(args, out, err)
    except ValueError as exc:  # bad tenant, limits
        print(f"spillgate keys {args.action}: {exc}", file=err)
        return 2
