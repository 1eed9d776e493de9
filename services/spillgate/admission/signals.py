"""Load signals: scrape each replica's Prometheus endpoint and normalize it to core Signals.

`parse_metrics` is pure: Prometheus text + backend kind -> `Signals`, through ONE mapping
table per backend kind (`MAPPINGS`). `Scraper` is the I/O edge: it scrapes every target
concurrently every `interval` over one shared keep-alive HTTP client, keeps the latest
Signals per replica, counts failures, and tells listeners. A replica whose scrapes fail
keeps its last Signals (they only age); the caller decides when they are too old to use
(DESIGN.md principle 6: stale signals count as saturation).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from spillgate.admission._http import HttpClient, HttpError, Url, parse_url
from spillgate.core.signals import ModelLoad, Signals

log = logging.getLogger(__name__)

BACKEND_KINDS = ("triton", "triton-vllm", "triton-trtllm", "simulator")

# Label naming the model: Triton (and Triton's vLLM / TRT-LLM backends) say `model`;
# a standalone vLLM server says `model_name`.
_MODEL_LABELS = ("model", "model_name")
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@dataclass(frozen=True)
class MetricMap:
    """One row of a mapping table: the samples of `metric` (optionally only those carrying
    `label`) feed `ModelLoad.<field>`. Fields starting with `_` are inputs of a derived value."""

    metric: str  # sample name; a counter may be exported with or without `_total`
    field: str
    label: tuple[str, str] | None = None


_TRITON_CORE = (
    MetricMap("nv_inference_pending_request_count", "pending"),
    MetricMap("nv_inference_request_success", "success"),
    MetricMap("nv_inference_request_failure", "failure"),  # summed over its `reason` label
    MetricMap("nv_inference_request_duration_us", "request_duration_us"),
    MetricMap("nv_inference_queue_duration_us", "queue_duration_us"),
    MetricMap("nv_inference_exec_count", "exec_count"),
)

_VLLM = (
    MetricMap("vllm:num_requests_running", "running"),
    MetricMap("vllm:num_requests_waiting", "waiting"),
    MetricMap("vllm:kv_cache_usage_perc", "kv_usage"),
    # The same gauge under its pre-V1 name, which Triton's vllm_backend still exports
    # (triton-inference-server/vllm_backend src/utils/metrics.py; labels model/version).
    MetricMap("vllm:gpu_cache_usage_perc", "kv_usage"),
    MetricMap("vllm:prefix_cache_queries", "prefix_queries_tokens"),
    MetricMap("vllm:prefix_cache_hits", "prefix_hits_tokens"),
)

# Label values from the TensorRT-LLM Triton backend's custom metrics reporter
# (NVIDIA/TensorRT-LLM triton_backend/inflight_batcher_llm/src/custom_metrics_reporter/
# custom_metrics_reporter.cc; older releases: triton-inference-server/tensorrtllm_backend,
# same path, and its README "Triton Metrics"). request_type: active, max, scheduled,
# context, waiting (newer releases only); kv_cache_block_type: max, free, used, tokens_per,
# reused, fraction (`fraction` newer releases only, else derived as used / max).
# `active` = requests the executor holds (scheduled this iteration or not); `max` = its
# maximum. Releases without `waiting` export no queue gauge: waiting stays None.
_TRTLLM = (
    MetricMap("nv_trt_llm_request_metrics", "running", ("request_type", "active")),
    MetricMap("nv_trt_llm_request_metrics", "waiting", ("request_type", "waiting")),
    MetricMap("nv_trt_llm_request_metrics", "max_running", ("request_type", "max")),
    MetricMap("nv_trt_llm_kv_cache_block_metrics", "kv_usage", ("kv_cache_block_type", "fraction")),
    MetricMap("nv_trt_llm_kv_cache_block_metrics", "_kv_used", ("kv_cache_block_type", "used")),
    MetricMap("nv_trt_llm_kv_cache_block_metrics", "_kv_max", ("kv_cache_block_type", "max")),
)

# One mapping table per backend kind (the registry's BackendKind short names).
MAPPINGS: Mapping[str, tuple[MetricMap, ...]] = MappingProxyType(
    {
        # Triton core exports no running gauge; its pending queue is the only queue signal.
        "triton": (*_TRITON_CORE, MetricMap("nv_inference_pending_request_count", "waiting")),
        "triton-vllm": (*_TRITON_CORE, *_VLLM),
        "triton-trtllm": (*_TRITON_CORE, *_TRTLLM),
        # The replica simulator exports what a Triton server with the vLLM backend does,
        # plus its decode slots (vLLM exports no max_num_seqs gauge).
        "simulator": (
            *_TRITON_CORE,
            *_VLLM,
            MetricMap("spillgate:max_num_seqs", "max_running"),
        ),
    }
)

_INDEX: Mapping[str, Mapping[str, tuple[MetricMap, ...]]] = MappingProxyType(
    {
        kind: MappingProxyType(
            {m.metric: tuple(r for r in rows if r.metric == m.metric) for m in rows}
        )
        for kind, rows in MAPPINGS.items()
    }
)


class MetricsParseError(ValueError):
    """The text is not valid Prometheus exposition format."""


def backend_kind(kind: str) -> str:
    """Normalize a backend kind ('' and 'unspecified' mean 'triton'); ValueError if unknown."""
    k = kind.strip().lower().replace("_", "-")
    if k in ("", "unspecified"):
        return "triton"
    if k not in MAPPINGS:
        raise ValueError(f"unknown backend kind {kind!r} (one of: {', '.join(BACKEND_KINDS)})")
    return k


def parse_metrics(text: str, backend: str, now: float) -> Signals:
    """Normalize one scrape of a replica's `/metrics` text to `Signals` at time `now`.

    Per Triton model name, values are summed over versions and other labels (failure
    reasons); `kv_usage` takes the highest fraction (the most pessimistic pool). A gauge the
    text lacks for a model is None, never 0; counters a model lacks are 0. Samples without a
    model label, non-finite or negative values, and metrics outside the backend's table are
    ignored. Raises MetricsParseError for malformed text, ValueError for an unknown backend.
    """
    index = _INDEX[backend_kind(backend)]
    found: dict[str, dict[str, float]] = {}
    try:
        for family in text_string_to_metric_families(_mapped_lines(text, index)):
            for sample in family.samples:
                rows = index.get(sample.name) or index.get(sample.name.removesuffix("_total"))
                if not rows:
                    continue
                model = next((sample.labels[k] for k in _MODEL_LABELS if k in sample.labels), None)
                value = float(sample.value)
                if model is None or not math.isfinite(value) or value < 0:
                    continue
                for row in rows:
                    if row.label is not None and sample.labels.get(row.label[0]) != row.label[1]:
                        continue
                    fields = found.setdefault(model, {})
                    if row.field == "kv_usage":
                        fields[row.field] = max(fields.get(row.field, 0.0), value)
                    else:
                        fields[row.field] = fields.get(row.field, 0.0) + value
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise MetricsParseError(f"malformed Prometheus text: {exc}") from None
    return Signals(time=now, models=MappingProxyType({m: _model_load(f) for m, f in found.items()}))


def _mapped_lines(text: str, index: Mapping[str, object]) -> str:
    """The sample lines of mapped metrics, for the (slow, pure-Python) Prometheus parser.

    Scrapes run every ~75 ms per replica and the parser costs ~15 us per sample, so the
    lines no table maps (GPU, memory, histogram buckets, HELP/TYPE) skip it; they are still
    checked for the shape `name[{labels}] value [timestamp]` so garbage is an error.
    """
    keep: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _METRIC_NAME.match(line)
        name = "" if m is None else m.group()
        if name in index or name.removesuffix("_total") in index:
            keep.append(line)
            continue
        rest = line[len(name) :]
        if rest.startswith("{"):
            rest = rest[rest.rfind("}") + 1 :] if "}" in rest else ""
        parts = rest.split()
        if not name or not rest[:1].isspace() or len(parts) not in (1, 2):
            raise ValueError(f"not a sample line: {raw[:80]!r}")
        float(parts[0])  # ValueError if the value is no number
    keep.append("")
    return "\n".join(keep)


def _model_load(f: dict[str, float]) -> ModelLoad:
    def count(name: str) -> int | None:
        return None if name not in f else round(f[name])

    kv = f.get("kv_usage")
    if kv is None and f.get("_kv_max", 0.0) > 0 and "_kv_used" in f:
        kv = f["_kv_used"] / f["_kv_max"]
    return ModelLoad(
        running=count("running"),
        waiting=count("waiting"),
        kv_usage=None if kv is None else min(kv, 1.0),
        pending=count("pending"),
        max_running=count("max_running"),
        success=f.get("success", 0.0),
        failure=f.get("failure", 0.0),
        request_duration_us=f.get("request_duration_us", 0.0),
        queue_duration_us=f.get("queue_duration_us", 0.0),
        exec_count=f.get("exec_count", 0.0),
        prefix_queries_tokens=f.get("prefix_queries_tokens", 0.0),
        prefix_hits_tokens=f.get("prefix_hits_tokens", 0.0),
    )


# -- scraping --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScrapeConfig:
    """How often and how patiently to scrape (seconds)."""

    interval: float = 0.075  # between scrapes of one replica (DESIGN.md: 50-100 ms)
    timeout: float = 0.5  # one scrape: connect, request, whole body
    max_backoff: float = 1.0  # a failing replica is retried at least this often
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (self.interval > 0 and self.timeout > 0 and self.max_backoff > 0):
            raise ValueError("interval, timeout and max_backoff must be > 0")


@dataclass(frozen=True)
class ScrapeTarget:
    """Where a replica's metrics are and which mapping table reads them."""

    url: str  # http://host:port/metrics, or host:port (path /metrics)
    backend: str  # a BACKEND_KINDS name


@dataclass(frozen=True)
class ScrapeState:
    """Scrape bookkeeping of one replica (times are the scraper's clock)."""

    target: ScrapeTarget
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None  # of the most recent failure (kept after a success)
    last_attempt: float | None = None  # when the most recent scrape finished
    last_success: float | None = None
    last_duration: float | None = None  # seconds the most recent scrape took

    def age(self, now: float) -> float:
        """Seconds since the last successful scrape (inf if none yet)."""
        return math.inf if self.last_success is None else now - self.last_success


_V = TypeVar("_V")
SignalsListener = Callable[[str, Signals], None]
FailureListener = Callable[[str, ScrapeState], None]


@dataclass
class _Entry:
    target: ScrapeTarget
    url: Url
    state: ScrapeState
    latest: Signals | None = None
    task: asyncio.Task[None] | None = None


class Scraper:
    """Scrapes a changing set of replicas concurrently; one task per replica, one HTTP client.

    `set_targets` may be called before or after `start`; `close` cancels every scrape and
    closes every connection. Listeners run in the event loop; one that raises is logged.
    """

    def __init__(
        self,
        config: ScrapeConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_signals: SignalsListener | None = None,
        on_failure: FailureListener | None = None,
    ) -> None:
        self._cfg = config or ScrapeConfig()
        self._clock = clock
        self._on_signals = on_signals
        self._on_failure = on_failure
        self._http = HttpClient(self._cfg.max_body_bytes)
        self._entries: dict[str, _Entry] = {}
        self._dropped: set[asyncio.Task[None]] = set()  # cancelled, maybe still unwinding
        self._running = False

    async def __aenter__(self) -> Scraper:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def set_targets(self, targets: Mapping[str, ScrapeTarget | tuple[str, str]]) -> None:
        """Replace the target set: {replica_id: ScrapeTarget(url, backend) or (url, backend)}.

        Unchanged targets keep their state and latest Signals; a changed URL or backend starts
        afresh. Raises ValueError (and changes nothing) for a bad URL or backend kind.
        """
        parsed: dict[str, tuple[ScrapeTarget, Url]] = {}
        for rid, t in targets.items():
            target = t if isinstance(t, ScrapeTarget) else ScrapeTarget(*t)
            target = ScrapeTarget(target.url, backend_kind(target.backend))
            parsed[rid] = (target, parse_url(target.url))
        for rid in list(self._entries):
            if rid not in parsed or parsed[rid][0] != self._entries[rid].target:
                self._drop(rid)
        for rid, (target, url) in parsed.items():
            if rid not in self._entries:
                self._entries[rid] = _Entry(target, url, ScrapeState(target))
                if self._running:
                    self._spawn(rid)

    def targets(self) -> dict[str, ScrapeTarget]:
        return {rid: e.target for rid, e in self._entries.items()}

    def latest(self, replica_id: str) -> Signals | None:
        """The most recent successful scrape of the replica, however old (None if none)."""
        entry = self._entries.get(replica_id)
        return None if entry is None else entry.latest

    def fresh(self, replica_id: str, max_age: float) -> Signals | None:
        """`latest`, but only while it is at most `max_age` seconds old by the clock."""
        signals = self.latest(replica_id)
        if signals is None or self._clock() - signals.time > max_age:
            return None
        return signals

    def state(self, replica_id: str) -> ScrapeState | None:
        entry = self._entries.get(replica_id)
        return None if entry is None else entry.state

    def start(self) -> None:
        """Start scraping every target (call from the running event loop)."""
        if self._running:
            return
        self._running = True
        for rid in self._entries:
            self._spawn(rid)

    async def close(self) -> None:
        """Stop all scrapes and close the HTTP client; targets and latest values are kept."""
        self._running = False
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        tasks += self._dropped
        for e in self._entries.values():
            e.task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.close()
        self._http = HttpClient(self._cfg.max_body_bytes)  # a later start() gets a fresh one

    async def scrape_once(self, replica_id: str) -> Signals | None:
        """Scrape one target now and record the outcome; the Signals, or None on failure."""
        entry = self._entries[replica_id]
        loop = asyncio.get_running_loop()
        started = loop.time()
        error: str | None = None
        signals: Signals | None = None
        try:
            async with asyncio.timeout(self._cfg.timeout):
                body = await self._http.get(entry.url)
            signals = parse_metrics(body.decode("utf-8"), entry.target.backend, self._clock())
        except TimeoutError:
            error = f"timed out after {self._cfg.timeout:g} s"
        except (OSError, EOFError, ValueError, HttpError) as exc:  # UnicodeError is a ValueError
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._entries.get(replica_id) is not entry:
            return signals  # the target changed meanwhile: this outcome is no one's
        now = self._clock()
        s = entry.state
        duration = loop.time() - started
        if signals is not None:
            entry.latest = signals
            entry.state = dataclasses.replace(
                s,
                successes=s.successes + 1,
                consecutive_failures=0,
                last_attempt=now,
                last_success=signals.time,
                last_duration=duration,
            )
            self._notify(self._on_signals, replica_id, signals)
        else:
            entry.state = dataclasses.replace(
                s,
                failures=s.failures + 1,
                consecutive_failures=s.consecutive_failures + 1,
                last_error=error,
                last_attempt=now,
                last_duration=duration,
            )
            log.debug("scrape of %s failed: %s", replica_id, error)
            self._notify(self._on_failure, replica_id, entry.state)
        return signals

    def _notify(self, listener: Callable[[str, _V], None] | None, rid: str, value: _V) -> None:
        if listener is None:
            return
        try:
            listener(rid, value)
        except Exception:
            log.exception("scrape listener failed for replica %s", rid)

    def _delay(self, state: ScrapeState) -> float:
        if state.consecutive_failures == 0:
            return self._cfg.interval
        cap = max(self._cfg.max_backoff, self._cfg.interval)
        return min(self._cfg.interval * 2.0 ** min(state.consecutive_failures, 30), cap)

    async def _loop(self, replica_id: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await self.scrape_once(replica_id)
            entry = self._entries.get(replica_id)
            if entry is None:
                return
            await asyncio.sleep(max(0.0, began + self._delay(entry.state) - loop.time()))

    def _spawn(self, rid: str) -> None:
        entry = self._entries[rid]
        entry.task = asyncio.get_running_loop().create_task(
            self._loop(rid), name=f"spillgate-scrape:{rid}"
        )

    def _drop(self, rid: str) -> None:
        entry = self._entries.pop(rid)
        if entry.task is not None:
            entry.task.cancel()  # its connection closes as the cancelled GET unwinds
            self._dropped.add(entry.task)
            entry.task.add_done_callback(self._dropped.discard)
