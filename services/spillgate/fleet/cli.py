"""`spillgate up | down | endpoints | status | chat`: the local multi-region fleet.

`up` runs a fleet spec (default: the built-in three-region fleet) in the foreground until
Ctrl-C/SIGTERM, or with `--detach` in the background until `spillgate down`. The other
commands find the running fleet through its state directory (`--state-dir`, default
$SPILLGATE_STATE_DIR or ./.spillgate). Exit status: 0 ok, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from spillgate.fleet.spec import PRIORITIES, FleetSpecError, load_fleet_spec
from spillgate.fleet.state import FleetRunning, StateDir, default_state_dir, pid_alive
from spillgate.fleet.supervisor import Supervisor, endpoints_table

DOWN_TIMEOUT_S = 30.0


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"spillgate {command}: {message}", file=sys.stderr)
    return code


def _no_fleet(state: StateDir) -> str:
    return f"no fleet is running from {state.root} (start one with `spillgate up`)"


# -- up / down ------------------------------------------------------------------------------


def _up(args: argparse.Namespace, out: TextIO) -> int:
    try:
        spec = load_fleet_spec(args.file)
    except FleetSpecError as exc:
        return _fail("up", str(exc), 2)
    state = StateDir(args.state_dir)
    gateways = not args.no_gateway
    if args.detach:
        return _detach(args, state, out)
    try:
        lock = state.lock()
    except FleetRunning as exc:
        return _fail("up", str(exc))
    with lock:
        envoy = spec.envoy and not args.no_envoy
        return Supervisor(spec, state, out, gateways=gateways, envoy=envoy).run()


def _detach(args: argparse.Namespace, state: StateDir, out: TextIO) -> int:
    """Start the supervisor in its own session; stream its progress until it is healthy."""
    if state.locked():
        pid = (state.read_fleet() or {}).get("pid", "?")
        return _fail("up", f"a fleet is already running from {state.root} (pid {pid})")
    state.create()
    argv = [sys.executable, "-m", "spillgate.fleet.cli", "up", "--state-dir", str(state.root)]
    if args.file is not None:
        argv += ["-f", str(args.file)]
    if args.no_gateway:
        argv.append("--no-gateway")
    if args.no_envoy:
        argv.append("--no-envoy")
    log_path = state.log("supervisor")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    offset = 0
    while True:
        with log_path.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        # Echo whole lines only; the endpoint table is printed from endpoints.json below.
        cut = chunk.rfind(b"\n") + 1
        for line in chunk[:cut].decode(errors="replace").splitlines():
            if line.startswith("["):
                print(line, file=out, flush=True)
        offset += cut
        fleet = state.read_fleet() or {}
        body = state.read_endpoints()
        if fleet.get("pid") == proc.pid and fleet.get("phase") == "healthy" and body:
            print(endpoints_table(body), file=out)
            print(
                f"\nfleet running in the background (supervisor pid {proc.pid}, log "
                f"{log_path}); `spillgate down` stops it",
                file=out,
                flush=True,
            )
            return 0
        if proc.poll() is not None:
            rest = log_path.read_text(errors="replace")
            tail = "\n".join(rest.splitlines()[-20:])
            return _fail("up", f"the fleet did not start (exit {proc.returncode}):\n{tail}")
        time.sleep(0.1)


def _down(args: argparse.Namespace, out: TextIO) -> int:
    state = StateDir(args.state_dir)
    fleet = state.read_fleet()
    if not state.locked() or not fleet:
        print(_no_fleet(state), file=out)
        return 0
    pid = int(fleet["pid"])
    children = [int(c["pid"]) for c in fleet.get("children", {}).values() if c.get("pid")]
    print(
        f"stopping the fleet (supervisor pid {pid}, {len(children)} children)", file=out, flush=True
    )
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not state.locked() and not any(pid_alive(p) for p in [pid, *children]):
            print("fleet stopped: no process left", file=out)
            return 0
        time.sleep(0.1)
    # The supervisor did not finish in time: kill it; its children die with it (PDEATHSIG).
    for p in [pid, *children]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if p == pid:
                os.kill(p, signal.SIGKILL)
            else:
                os.killpg(p, signal.SIGKILL)  # children lead their own process groups
    return _fail("down", f"the fleet did not stop within {args.timeout:g}s; killed it")


# -- endpoints / status ---------------------------------------------------------------------


def _running_endpoints(state: StateDir) -> dict[str, Any] | None:
    body = state.read_endpoints()
    if body is None or not state.locked():
        return None
    return body


def _endpoints(args: argparse.Namespace, out: TextIO) -> int:
    state = StateDir(args.state_dir)
    body = _running_endpoints(state)
    if body is None:
        return _fail("endpoints", _no_fleet(state))
    print(json.dumps(body, indent=2) if args.json else endpoints_table(body), file=out)
    return 0


def _status(args: argparse.Namespace, out: TextIO) -> int:
    from spillgate.fleet.status import render

    state = StateDir(args.state_dir)
    while True:
        body = _running_endpoints(state)
        if body is None:
            return _fail("status", _no_fleet(state))
        table = render(body)
        if args.watch is None:
            print(table, file=out)
            return 0
        # Clear the screen and redraw (a live table).
        stamp = time.strftime("%H:%M:%S")
        print(
            f"\x1b[H\x1b[2J{stamp}  every {args.watch:g}s, Ctrl-C to stop\n\n{table}",
            file=out,
            flush=True,
        )
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


# -- chat -----------------------------------------------------------------------------------


def _chat(args: argparse.Namespace, out: TextIO) -> int:
    from spillgate.fleet.chat import ChatError, chat

    state = StateDir(args.state_dir)
    body = _running_endpoints(state)
    if body is None:
        return _fail("chat", _no_fleet(state))
    try:
        return chat(body, args, out)
    except ChatError as exc:
        return _fail("chat", str(exc))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spillgate", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="the fleet's state directory (default: $SPILLGATE_STATE_DIR or ./.spillgate)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    u = sub.add_parser("up", parents=[common], help="run the local multi-region fleet")
    u.add_argument("-f", "--file", type=Path, help="fleet spec TOML (default: built-in)")
    u.add_argument(
        "--detach", action="store_true", help="run in the background; return once healthy"
    )
    u.add_argument(
        "--no-gateway",
        action="store_true",
        help="no gateways: callers use the admissions directly (zero-proxy)",
    )
    u.add_argument(
        "--no-envoy",
        action="store_true",
        help="no control plane and no Envoy: clients call the gateways directly "
        "(overrides [fleet] envoy = true)",
    )
    u.set_defaults(func=_up)

    d = sub.add_parser("down", parents=[common], help="stop the fleet started by `up`")
    d.add_argument("--timeout", type=float, default=DOWN_TIMEOUT_S, help="seconds to wait")
    d.set_defaults(func=_down)

    e = sub.add_parser("endpoints", parents=[common], help="the fleet's endpoint table")
    e.add_argument("--json", action="store_true", help="as JSON (for scripts)")
    e.set_defaults(func=_endpoints)

    s = sub.add_parser("status", parents=[common], help="load, queues, KV use, overflow per region")
    s.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=1.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 1)",
    )
    s.set_defaults(func=_status)

    c = sub.add_parser("chat", parents=[common], help="ask the fleet; shows how it was routed")
    c.add_argument("prompt")
    c.add_argument(
        "--region",
        help="the region to ask, through its ingress Envoy when the fleet runs one "
        "(default: the first region)",
    )
    c.add_argument("--model", help="alias or name@version (default: the spec's fleet.model)")
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--priority", choices=PRIORITIES, default="normal")
    c.add_argument("--budget-ms", type=int, help="SLA budget (default: the spec's [sla])")
    c.add_argument("--allow-degrade", action="store_true", help="accept the fallback model")
    c.add_argument("--session-id", default="")
    c.add_argument("--key", help="API key (default: the fleet's dev-key file)")
    c.add_argument(
        "--burst",
        type=int,
        default=0,
        metavar="N",
        help="send N copies at once and print how they were routed (not the answers)",
    )
    c.set_defaults(func=_chat)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    code: int = args.func(args, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
