"""Synthetic and replayed request streams for the global simulator (deterministic per seed).

Arrivals are Poisson per region with a time-varying rate (the scenario's diurnal curve and
flash crowds), drawn by thinning. Each arrival picks a shape:

* ``high_cache`` / ``low_cache``: inference-perf's shared-prefix shapes (world.toml
  [workload.*]): 256 groups sharing a 2,048-token system prompt with 256-token questions, or
  a 256-token system prompt with 2,048-token questions.
* ``session``: multi-turn chat; turn k's prompt is the system prompt plus the k previous
  turns, so it shares its history prefix with turn k-1 (turns are scheduled open loop).

Prefix blocks carry synthetic hash ids (unique per group / session) instead of token hashes;
only the shareable part of a prompt is hashed, the unique question is not (it can never hit).
Output lengths are short (max_tokens 32-64 interactive): a 70B model decodes at ~10-20 ms
per token, so the 1.2 s end-to-end budget (world.toml) only admits completions of tens of
tokens, and 50k req/s on 1,050 GPUs only adds up with that size (DESIGN.md's budget split).
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spillgate.core.decision import Priority

BLOCK = 64  # tokens per KV block (world.ENGINE_70B.block_size)
_HIGH, _LOW, _SESSION = 1 << 40, 2 << 40, 3 << 40
_NORMAL = int(Priority.NORMAL)


class SimRequest:
    """One simulated request: what the client asks for, then what happened to it."""

    __slots__ = (
        "allow_degrade",
        "arrival",
        "budget_ms",
        "cached",
        "degraded",
        "e2e_ms",
        "hashes",
        "id",
        "max_tokens",
        "net_ms",
        "origin",
        "output_tokens",
        "priority",
        "prompt_tokens",
        "queued",
        "replica",
        "residency",
        "served_region",
        "session",
        "setup_ms",
        "shape",
        "status",
        "submit",
        "ticket",
        "ttft_ms",
    )

    def __init__(
        self,
        rid: int,
        origin: str,
        arrival: float,
        priority: int,
        budget_ms: float,
        prompt_tokens: int,
        hashes: tuple[int, ...],
        max_tokens: int,
        output_tokens: int,
        residency: str = "",
        session: str = "",
        allow_degrade: bool = False,
        shape: str = "",
    ) -> None:
        self.id = rid
        self.origin = origin
        self.arrival = arrival  # ms of simulated time
        self.priority = priority
        self.budget_ms = budget_ms
        self.prompt_tokens = prompt_tokens
        self.hashes = hashes
        self.max_tokens = max_tokens
        self.output_tokens = output_tokens
        self.residency = residency
        self.session = session
        self.allow_degrade = allow_degrade
        self.shape = shape
        self.served_region = ""
        self.replica = -1
        self.net_ms = 0.0  # one-way network origin -> serving region
        self.submit = 0.0  # reached the replica's engine
        self.setup_ms = 0.0  # stream set-up before the engine saw it (SimConfig.stream_ms)
        self.ttft_ms = math.nan
        self.e2e_ms = math.nan
        self.queued = False
        self.degraded = False
        self.status = ""  # "" while live; ok | shed | error | unfinished
        self.ticket = ""
        self.cached = 0

    def to_json(self) -> dict[str, object]:
        """The trace line of this request (its inputs only)."""
        return {
            "t_ms": round(self.arrival, 3),
            "region": self.origin,
            "priority": Priority(self.priority).name,
            "budget_ms": self.budget_ms,
            "prompt_tokens": self.prompt_tokens,
            "prefix_hashes": list(self.hashes),
            "max_tokens": self.max_tokens,
            "output_tokens": self.output_tokens,
            "residency": self.residency,
            "session": self.session,
            "allow_degrade": self.allow_degrade,
            "shape": self.shape,
        }


@dataclass(frozen=True)
class WorkloadSpec:
    """Request mix. Shares are weights (normalized); lengths in tokens."""

    shapes: dict[str, float] = field(
        default_factory=lambda: {"high_cache": 0.35, "low_cache": 0.35, "session": 0.30}
    )
    groups: int = 256  # world.toml workload.high_cache.groups
    high_system: int = 2048
    high_question: int = 256
    low_system: int = 256
    low_question: int = 2048
    session_system: int = 256
    session_question: int = 128
    session_turns_mean: float = 4.0
    session_think_s: float = 8.0
    priorities: dict[Priority, float] = field(
        default_factory=lambda: {
            Priority.CRITICAL: 0.05,
            Priority.HIGH: 0.10,
            Priority.NORMAL: 0.65,
            Priority.LOW: 0.15,
            Priority.BATCH: 0.05,
        }
    )
    interactive_max_tokens: tuple[int, ...] = (32, 48, 64)
    background_max_tokens: tuple[int, ...] = (64, 128)  # LOW and BATCH
    output_fraction: tuple[float, float] = (0.6, 1.0)  # actual output / max_tokens, uniform
    residency: dict[str, float] = field(default_factory=lambda: {"eu": 0.10, "apac": 0.05})
    allow_degrade: float = 0.3


RateFn = Callable[[str, float], float]  # (region, seconds) -> requests per second


class Workload:
    """Merged arrival stream of every region, in time order (ties by insertion)."""

    def __init__(
        self,
        spec: WorkloadSpec,
        regions: tuple[str, ...],
        rate: RateFn,
        duration_s: float,
        budgets_ms: dict[Priority, float],
        seed: int,
    ) -> None:
        self._spec = spec
        self._rate = rate
        self._end_ms = duration_s * 1000.0
        self._budgets = budgets_ms
        self._rng = {r: random.Random(f"{seed}:{r}") for r in regions}
        self._ids = itertools.count()
        self._seq = itertools.count()
        self._sessions = itertools.count()
        self._heap: list[tuple[float, int, str, SimRequest | None]] = []
        self._lmax: dict[str, float] = {}
        shapes = list(spec.shapes.items())
        self._shape_names = [s for s, _ in shapes]
        self._shape_cum = list(itertools.accumulate(w for _, w in shapes))
        prios = list(spec.priorities.items())
        self._prio = [int(p) for p, _ in prios]
        self._prio_cum = list(itertools.accumulate(w for _, w in prios))
        # Per-request constants looked up by plain int (an IntEnum call per request is slow).
        self._budget_of = {int(p): v for p, v in budgets_ms.items()}
        self._prefix: dict[tuple[int, int, int], tuple[int, ...]] = {}
        for r in regions:
            grid = [rate(r, t / 4.0) for t in range(int(duration_s * 4) + 2)]
            self._lmax[r] = max(grid) * 1.05 + 1e-9
            self._next_marker(r, 0.0)

    def _next_marker(self, region: str, t_ms: float) -> None:
        t = t_ms + self._rng[region].expovariate(self._lmax[region]) * 1000.0
        if t < self._end_ms:
            heapq.heappush(self._heap, (t, next(self._seq), region, None))

    def next_time(self) -> float | None:
        """Time (ms) of the next candidate arrival, None when the stream is over."""
        return self._heap[0][0] if self._heap else None

    def pop(self) -> SimRequest | None:
        """The next candidate; None when thinning rejected it (call again)."""
        t, _, region, req = heapq.heappop(self._heap)
        if req is not None:
            return req
        self._next_marker(region, t)
        rng = self._rng[region]
        if rng.random() * self._lmax[region] > self._rate(region, t / 1000.0):
            return None
        return self._make(region, t, rng)

    def _make(self, region: str, t: float, rng: random.Random) -> SimRequest:
        spec = self._spec
        shape = self._shape_names[_pick(self._shape_cum, rng.random())]
        prio = self._prio[_pick(self._prio_cum, rng.random())]
        residency = region if rng.random() < spec.residency.get(region, 0.0) else ""
        degrade = rng.random() < spec.allow_degrade
        if shape == "session":
            return self._session(region, t, rng, prio, residency, degrade)
        g = rng.randrange(spec.groups)
        if shape == "high_cache":
            base, system, question = _HIGH, spec.high_system, spec.high_question
        else:
            base, system, question = _LOW, spec.low_system, spec.low_question
        hashes = self._group_prefix(base, g, system // BLOCK)
        return self._request(
            region, t, rng, prio, system + question, hashes, shape, residency, "", degrade
        )

    def _group_prefix(self, base: int, g: int, blocks: int) -> tuple[int, ...]:
        # A group's shared prefix is the same tuple for every request of it: build it once.
        key = (base, g, blocks)
        hashes = self._prefix.get(key)
        if hashes is None:
            start = base + (g << 12)
            hashes = self._prefix[key] = tuple(range(start, start + blocks))
        return hashes

    def _session(
        self, region: str, t: float, rng: random.Random, prio: int, residency: str, degrade: bool
    ) -> SimRequest:
        spec = self._spec
        sid = next(self._sessions)
        turns = min(12, 1 + int(rng.expovariate(1.0 / max(spec.session_turns_mean - 1, 1e-9))))
        g = rng.randrange(spec.groups)
        system = self._group_prefix(_LOW, g, spec.session_system // BLOCK)
        own_base = _SESSION + (sid << 8)
        history, at, first = 0, t, None
        for k in range(turns):
            prompt = spec.session_system + history + spec.session_question
            hist_blocks = (spec.session_system + history) // BLOCK - len(system)
            own = tuple(range(own_base, own_base + min(hist_blocks, 255)))
            req = self._request(
                region,
                at,
                rng,
                prio,
                prompt,
                system + own,
                "session",
                residency,
                f"s{sid}",
                degrade,
            )
            history += spec.session_question + req.output_tokens
            if k == 0:
                first = req
            elif at < self._end_ms:
                heapq.heappush(self._heap, (at, next(self._seq), region, req))
            at += rng.expovariate(1.0 / spec.session_think_s) * 1000.0
        assert first is not None
        return first

    def _request(
        self,
        region: str,
        t: float,
        rng: random.Random,
        prio: int,
        prompt: int,
        hashes: tuple[int, ...],
        shape: str,
        residency: str,
        session: str,
        degrade: bool,
    ) -> SimRequest:
        spec = self._spec
        interactive = prio <= _NORMAL
        choices = spec.interactive_max_tokens if interactive else spec.background_max_tokens
        max_tokens = choices[rng.randrange(len(choices))]
        lo, hi = spec.output_fraction
        out = max(1, round(max_tokens * rng.uniform(lo, hi)))
        budget = self._budget_of[prio]
        return SimRequest(
            next(self._ids),
            region,
            t,
            prio,
            budget,
            prompt,
            hashes,
            max_tokens,
            out,
            residency,
            session,
            degrade,
            shape,
        )


def _pick(cumulative: list[float], u: float) -> int:
    x = u * cumulative[-1]
    for i, c in enumerate(cumulative):
        if x < c:
            return i
    return len(cumulative) - 1


class TraceWorkload:
    """Replay of a JSONL trace (one ``SimRequest.to_json`` object per line, any order)."""

    def __init__(self, path: Path, budgets_ms: dict[Priority, float]) -> None:
        rows: list[SimRequest] = []
        with path.open() as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                d = json.loads(line)
                prio = int(Priority[str(d.get("priority", "NORMAL"))])
                rows.append(
                    SimRequest(
                        n,
                        str(d["region"]),
                        float(d["t_ms"]),
                        prio,
                        float(d.get("budget_ms") or budgets_ms[Priority(prio)]),
                        int(d["prompt_tokens"]),
                        tuple(int(h) for h in d.get("prefix_hashes", ())),
                        int(d.get("max_tokens", 0)) or int(d["output_tokens"]),
                        int(d["output_tokens"]),
                        str(d.get("residency", "")),
                        str(d.get("session", "")),
                        bool(d.get("allow_degrade", False)),
                        str(d.get("shape", "trace")),
                    )
                )
        rows.sort(key=lambda r: (r.arrival, r.id))
        self._rows = rows
        self._i = 0

    def next_time(self) -> float | None:
        """Time (ms) of the next request, None at the end."""
        return self._rows[self._i].arrival if self._i < len(self._rows) else None

    def pop(self) -> SimRequest | None:
        """The next request."""
        self._i += 1
        return self._rows[self._i - 1]


def dump_trace(requests: Iterator[SimRequest], path: Path) -> int:
    """Write requests as a JSONL trace; returns the line count."""
    n = 0
    with path.open("w") as f:
        for req in requests:
            f.write(json.dumps(req.to_json(), separators=(",", ":")) + "\n")
            n += 1
    return n
