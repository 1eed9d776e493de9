"""spillgate: multi-region inference routing mesh (command line)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def _replica(args: argparse.Namespace) -> int:
    from spillgate.replica.app import Listen, run
    from spillgate.replica.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"spillgate replica: {exc}", file=sys.stderr)
        return 2
    if args.speed is not None:
        if not 0 < args.speed < float("inf"):  # also refuses NaN
            print("spillgate replica: --speed must be a finite number > 0", file=sys.stderr)
            return 2
        config = type(config)(args.speed, config.seed, config.load, config.llms)
    listen = Listen(args.host, args.grpc_port, args.metrics_port)
    try:
        asyncio.run(run(config, listen))
    except OSError as exc:
        print(f"spillgate replica: {exc}", file=sys.stderr)
        return 1
    return 0


def _fault(args: argparse.Namespace) -> int:
    changes: dict[str, object] = {}
    for key in ("error_rate", "refuse_rate", "added_latency_ms", "slow_factor"):
        value = getattr(args, key)
        if value is not None:
            changes[key] = value
    if args.stall is not None:
        changes["stall"] = args.stall == "on"
    if args.crash:
        changes["crash"] = True
    if args.clear:
        changes = {
            "error_rate": 0.0,
            "refuse_rate": 0.0,
            "added_latency_ms": 0.0,
            "stall": False,
            "slow_factor": 1.0,
        }
    url = args.url.rstrip("/")
    if not url.startswith("http"):
        url = "http://" + url
    method = "POST" if changes else "GET"
    data = json.dumps(changes).encode() if changes else None
    req = urllib.request.Request(f"{url}/faults", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            print(resp.read().decode())
    except urllib.error.HTTPError as exc:
        print(f"spillgate fault: {exc.code}: {exc.read().decode()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"spillgate fault: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _generate(args: argparse.Namespace) -> int:
    from spillgate.replica.demo import generate

    return generate(args.url, args.model, args.prompt, args.max_tokens)


# Commands with their own parsers (and --help): words -> (module with `main(argv)`, the
# argv it gets: "rest" = after the command words, "all" = the whole argv), help text.
DELEGATED: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("registry",): (
        "spillgate.registry.cli",
        "rest",
        "the fleet's source of truth: serve, apply -f FILE, get, watch, delete",
    ),
    ("keys",): (
        "spillgate.gateway.keys_cli",
        "rest",
        "the gateway's API keys: create, list, revoke",
    ),
    ("admission", "serve"): (
        "spillgate.admission.app",
        "rest",
        "one region's admission service: `spillgate admission serve --region R ...`",
    ),
    ("gateway", "serve"): (
        "spillgate.gateway.app",
        "rest",
        "one region's public API (gRPC + OpenAI HTTP): `spillgate gateway serve ...`",
    ),
    ("controlplane",): (
        "spillgate.controlplane.app",
        "rest",
        "Envoy's xDS control plane: `spillgate controlplane serve|dump --help`",
    ),
    ("sim",): (
        "spillgate.sim.cli",
        "rest",
        "global simulator: spillgate vs baselines on scenario presets",
    ),
    # The local fleet (spillgate.fleet.cli parses the command word itself).
    ("up",): (
        "spillgate.fleet.cli",
        "all",
        "run the local multi-region fleet (registry, replicas, admissions, gateways, Envoy)",
    ),
    ("down",): ("spillgate.fleet.cli", "all", "stop the fleet that `up --detach` started"),
    ("endpoints",): (
        "spillgate.fleet.cli",
        "all",
        "the running fleet's endpoints (--json for scripts)",
    ),
    ("status",): (
        "spillgate.fleet.cli",
        "all",
        "regions, replicas, load, queues, KV use, overflow (--watch to refresh)",
    ),
    ("chat",): (
        "spillgate.fleet.cli",
        "all",
        'ask the fleet: `spillgate chat "Hello" --region apac`',
    ),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spillgate", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "replica", help="run a Triton-protocol replica simulator (CPU, no GPU needed)"
    )
    r.add_argument("--config", type=Path, help="replica TOML (default: built-in demo models)")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--grpc-port", type=int, default=8001, help="0 = pick a free port")
    r.add_argument("--metrics-port", type=int, default=8002, help="0 = pick a free port")
    r.add_argument("--speed", type=float, help="model time / wall time (overrides config)")
    r.set_defaults(func=_replica)

    f = sub.add_parser("fault", help="show or change a replica's injected faults")
    f.add_argument("--url", default="127.0.0.1:8002", help="the replica's metrics address")
    f.add_argument("--error-rate", type=float, help="share of requests failed (0..1)")
    f.add_argument(
        "--refuse-rate", type=float, help="share of requests refused UNAVAILABLE, unrun (0..1)"
    )
    f.add_argument("--added-latency-ms", type=float)
    f.add_argument("--slow-factor", type=float, help=">= 1: LLM time runs this much slower")
    f.add_argument("--stall", choices=("on", "off"))
    f.add_argument("--crash", action="store_true", help="make the replica process exit")
    f.add_argument("--clear", action="store_true", help="reset every fault")
    f.set_defaults(func=_fault)

    g = sub.add_parser("generate", help="stream a completion from a replica's LLM model")
    g.add_argument("prompt")
    g.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    g.add_argument("--model", default="llm-small")
    g.add_argument("--max-tokens", type=int, default=32)
    g.set_defaults(func=_generate)
    for words, (_, _, text) in DELEGATED.items():
        # Help-only entries: main() hands these commands to their own parsers.
        sub.add_parser(words[0], help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for words, (module, passes, _) in DELEGATED.items():
        if tuple(argv[: len(words)]) == words:
            entry = importlib.import_module(module)
            code: int = entry.main(argv[len(words) :] if passes == "rest" else argv)
            return code
    if argv[:1] in (["admission"], ["gateway"]):
        print(f"usage: spillgate {argv[0]} serve --help", file=sys.stderr)
        return 2
    args = parser().parse_args(argv)
    code = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
