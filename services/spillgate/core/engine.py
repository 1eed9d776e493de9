"""Pure discrete-event model of one LLM inference engine (vLLM-like).

Continuous batching over ``max_num_seqs`` decode slots, a bounded FIFO waiting queue, a KV
cache of fixed-size blocks with prefix caching, TTFT = overhead + uncached prompt tokens x
per-token cost, and an inter-token latency that grows with the batch. No clock, no I/O: the
caller passes model time ``now`` (milliseconds) and drains events with :meth:`Engine.advance`.
The replica simulator and the global simulator drive the same class.
"""

from __future__ import annotations

import enum
import heapq
import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Engine capacity and latency model; all times in milliseconds."""

    max_num_seqs: int = 64  # decode slots (vLLM max_num_seqs)
    max_waiting: int = 256  # bounded waiting queue; a submit beyond it is rejected
    num_kv_blocks: int = 4096  # KV cache capacity in blocks
    block_size: int = 16  # tokens per block
    ttft_overhead_ms: float = 15.0  # fixed cost before the first token
    prefill_ms_per_token: float = 0.05  # per UNCACHED prompt token
    itl_base_ms: float = 8.0  # inter-token latency with one running sequence
    itl_per_seq_ms: float = 0.15  # added ITL per additional running sequence
    jitter: float = 0.0  # relative std-dev applied to TTFT and each ITL (>= 0), seeded rng
    token_events: bool = True  # False: only STARTED, first TOKEN and FINISHED events

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of range."""
        lows = {"max_num_seqs": 1, "max_waiting": 0, "num_kv_blocks": 1, "block_size": 1}
        for name, low in lows.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        reals = ("ttft_overhead_ms", "prefill_ms_per_token", "itl_base_ms", "itl_per_seq_ms")
        for name in (*reals, "jitter"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class SeqRequest:
    """One generation request as the engine sees it (token counts, not text)."""

    id: str
    prompt_tokens: int  # >= 0
    block_hashes: tuple[int, ...]  # hash chain of the prompt's full blocks (prefix.block_hashes)
    output_tokens: int  # tokens to generate, >= 1


class SubmitResult(enum.Enum):
    """Outcome of :meth:`Engine.submit`; only ACCEPTED requests ever produce events."""

    ACCEPTED = "accepted"
    QUEUE_FULL = "queue_full"
    TOO_LARGE = "too_large"  # needs more blocks than the whole cache: can never run


class EventKind(enum.Enum):
    """STARTED (admitted to a slot), TOKEN (one output token), FINISHED (last token done)."""

    STARTED = "started"
    TOKEN = "token"
    FINISHED = "finished"


@dataclass(frozen=True)
class EngineEvent:
    """Something that happened to one sequence at model time ``time_ms``."""

    kind: EventKind
    seq_id: str
    time_ms: float
    token_index: int = -1  # TOKEN: 0-based (0 = first token); FINISHED: output_tokens
    cached_tokens: int = 0  # STARTED: prompt tokens served from the prefix cache


@dataclass(frozen=True)
class EngineStats:
    """Occupancy now and cumulative counters (rejected = QUEUE_FULL + TOO_LARGE)."""

    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int  # referenced by a live sequence
    kv_blocks_cached: int  # unreferenced blocks kept for prefix reuse (evictable, LRU)
    kv_usage: float  # used / total, 0..1 (like vllm:kv_cache_usage_perc)
    prefix_queries_tokens: int  # cumulative, like vllm:prefix_cache_queries_total
    prefix_hits_tokens: int  # cumulative, like vllm:prefix_cache_hits_total
    started: int
    finished: int
    cancelled: int
    rejected: int


@dataclass(eq=False, slots=True)
class _Seq:
    req: SeqRequest
    blocks_needed: int
    cached_tokens: int = 0
    hashes: tuple[int, ...] = ()  # cache entries this sequence holds a reference on
    private: int = 0  # blocks outside the hash map, freed when the sequence ends
    done: bool = False  # finished or cancelled: its heap entries are stale


_STARTED, _TOKEN, _FINISHED = EventKind.STARTED, EventKind.TOKEN, EventKind.FINISHED

# (time, insertion number, sequence, kind, token index); the unique insertion number makes
# ordering total and deterministic, so the tuple never compares the _Seq.
_Item = tuple[float, int, _Seq, EventKind, int]


class Engine:
    """Continuous-batching engine with KV blocks and prefix caching, driven by model time.

    Every method taking ``now`` first processes everything due at or before ``now`` (events are
    buffered until the next :meth:`advance`), so state is always current when requests arrive.
    ``now`` must never go backwards (``ValueError``). Every accepted request ends exactly once:
    a FINISHED event, or a :meth:`cancel` that returned True; nothing is emitted for it after.
    Without ``rng``, a ``random.Random(0)`` keeps jittered runs reproducible.
    """

    def __init__(self, config: EngineConfig, rng: random.Random | None = None) -> None:
        config.validate()
        self._cfg = config
        self._rng = rng if rng is not None else random.Random(0)
        self._now = -math.inf
        self._seqno = 0
        self._heap: list[_Item] = []
        self._outbox: list[EngineEvent] = []
        self._waiting: deque[_Seq] = deque()
        self._running: dict[str, _Seq] = {}
        self._live: dict[str, _Seq] = {}
        self._free = config.num_kv_blocks
        self._refs: dict[int, int] = {}  # block hash -> live references (the prefix cache)
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced hashes, oldest first
        self._queries = self._hits = 0
        self._started = self._finished = self._cancelled = self._rejected = 0

    @property
    def now(self) -> float:
        """Latest model time processed (``-inf`` before the first call)."""
        return self._now

    def submit(self, req: SeqRequest, now: float) -> SubmitResult:
        """Queue ``req`` FIFO and start whatever can start at ``now``.

        TOO_LARGE if it needs more blocks than the whole cache; QUEUE_FULL if it cannot start at
        once and ``max_waiting`` requests already wait. ``ValueError`` for a live duplicate id or
        an inconsistent request (negative prompt, no output, more or repeated block hashes than
        the prompt's full blocks).
        """
        self._process(now)
        bs = self._cfg.block_size
        if req.prompt_tokens < 0 or req.output_tokens < 1:
            raise ValueError(f"request {req.id!r}: need prompt_tokens >= 0, output_tokens >= 1")
        if len(req.block_hashes) > req.prompt_tokens // bs:
            raise ValueError(f"request {req.id!r}: more block_hashes than full prompt blocks")
        if len(set(req.block_hashes)) != len(req.block_hashes):
            raise ValueError(f"request {req.id!r}: repeated block hash")
        if req.id in self._live:
            raise ValueError(f"request {req.id!r} is already live")
        needed = -(-(req.prompt_tokens + req.output_tokens) // bs)
        if needed > self._cfg.num_kv_blocks:
            self._rejected += 1
            return SubmitResult.TOO_LARGE
        # Waiters mean the head cannot start, and FIFO forbids overtaking it, so "queue full"
        # is only decided when the request would actually have to wait.
        full = len(self._waiting) >= self._cfg.max_waiting
        if full and (self._waiting or not self._can_start(req)):
            self._rejected += 1
            return SubmitResult.QUEUE_FULL
        seq = _Seq(req, needed)
        self._live[req.id] = seq
        self._waiting.append(seq)
        self._schedule(now, direct=True)
        return SubmitResult.ACCEPTED

    def cancel(self, seq_id: str, now: float) -> bool:
        """End a waiting or running request at ``now``; False if unknown or already ended.

        Frees its slot and blocks (prompt blocks stay cached) and admits waiters at ``now``.
        """
        self._process(now)
        seq = self._live.pop(seq_id, None)
        if seq is None:
            return False
        seq.done = True
        self._cancelled += 1
        if seq_id in self._running:
            del self._running[seq_id]
            self._release(seq)
        else:
            self._waiting.remove(seq)
        self._schedule(now, direct=True)
        return True

    def advance(self, now: float) -> list[EngineEvent]:
        """Return, in time order, every event due at or before ``now`` not returned yet."""
        self._process(now)
        out, self._outbox = self._outbox, []
        return out

    def next_event_time(self) -> float | None:
        """Earliest ``now`` for which :meth:`advance` returns something; None when idle.

        Events already due (processed by ``submit``/``cancel``) make it the engine time
        :attr:`now`, so ``advance(next_event_time())`` is always a legal call.
        """
        if self._outbox:
            return self._now
        while self._heap and self._heap[0][2].done:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    @property
    def config(self) -> EngineConfig:
        """The engine's capacity and latency model."""
        return self._cfg

    def stats(self) -> EngineStats:
        """Snapshot of occupancy and cumulative counters."""
        total = self._cfg.num_kv_blocks
        used = total - self._free - len(self._lru)
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_blocks_total=total,
            kv_blocks_used=used,
            kv_blocks_cached=len(self._lru),
            kv_usage=used / total,
            prefix_queries_tokens=self._queries,
            prefix_hits_tokens=self._hits,
            started=self._started,
            finished=self._finished,
            cancelled=self._cancelled,
            rejected=self._rejected,
        )

    def cached_tokens(self, block_hashes: tuple[int, ...]) -> int:
        """Prompt tokens a request with ``block_hashes`` would get from the cache now (pure)."""
        return len(self._match(block_hashes)) * self._cfg.block_size

    def predicted_ttft_ms(self, prompt_tokens: int, block_hashes: tuple[int, ...]) -> float:
        """TTFT without jitter if the request started now with no queueing (pure query)."""
        uncached = max(0, prompt_tokens - self.cached_tokens(block_hashes))
        return self._cfg.ttft_overhead_ms + uncached * self._cfg.prefill_ms_per_token

    def itl_ms(self, running: int) -> float:
        """Inter-token latency without jitter when ``running`` sequences decode together."""
        return self._cfg.itl_base_ms + self._cfg.itl_per_seq_ms * max(0, running - 1)

    # -- time ---------------------------------------------------------------------------------

    def _process(self, now: float) -> None:
        if now < self._now or now != now:  # now != now: NaN
            raise ValueError(f"now={now} is earlier than the engine time {self._now}")
        self._now = now
        heap = self._heap
        if not heap or heap[0][0] > now:
            return
        # Hot loop (the global simulator runs millions of these): locals, no helper calls
        # on the common paths; same events, same order and the same rng draws as the
        # straightforward version (gap = itl_ms(running) x jitter factor, inlined).
        outbox, pop, push = self._outbox, heapq.heappop, heapq.heappush
        cfg = self._cfg
        base, per_seq, jitter = cfg.itl_base_ms, cfg.itl_per_seq_ms, cfg.jitter
        token_events = cfg.token_events
        running = self._running
        while heap and heap[0][0] <= now:
            time, _, seq, kind, index = pop(heap)
            if seq.done:
                continue
            req = seq.req
            sid, last = req.id, req.output_tokens - 1
            if kind is _STARTED:
                outbox.append(EngineEvent(_STARTED, sid, time, -1, seq.cached_tokens))
                continue
            if kind is _TOKEN:
                outbox.append(EngineEvent(_TOKEN, sid, time, index))
            if kind is _FINISHED or index == last:
                self._finish(seq, time)
                continue
            itl = base + per_seq * max(0, len(running) - 1)
            if token_events:
                draw = 1.0 if jitter == 0 else max(0.05, self._rng.gauss(1.0, jitter))
                nxt, nkind = index + 1, _TOKEN
            else:
                # The sum of the n remaining jitter factors, drawn as one normal with the same
                # mean and variance, so token_events=False costs one draw instead of n.
                n = last - index
                if jitter == 0:
                    draw = float(n)
                else:
                    draw = max(0.05 * n, self._rng.gauss(n, jitter * math.sqrt(n)))
                nxt, nkind = last, _FINISHED
            self._seqno += 1
            push(heap, (time + itl * draw, self._seqno, seq, nkind, nxt))

    def _finish(self, seq: _Seq, time: float) -> None:
        req = seq.req
        sid = req.id
        self._outbox.append(EngineEvent(_FINISHED, sid, time, req.output_tokens))
        seq.done = True
        self._finished += 1
        del self._live[sid]
        del self._running[sid]
        self._release(seq)
        if self._waiting:
            self._schedule(time)

    # -- scheduling and KV blocks ---------------------------------------------------------------

    def _schedule(self, now: float, direct: bool = False) -> None:
        # Strict FIFO: a head that cannot start blocks smaller requests behind it. The fit
        # test and the prefix walk of _start are one pass here (same result as _can_start
        # then _match: nothing changes the cache in between). ``direct``: nothing due at or
        # before ``now`` is left in the heap (submit and cancel processed it), see _start.
        waiting, refs, lru = self._waiting, self._refs, self._lru
        slots = self._cfg.max_num_seqs
        while waiting and len(self._running) < slots:
            seq = waiting[0]
            matched, unreferenced = _walk(refs, seq.req.block_hashes)
            if seq.blocks_needed - matched > self._free + len(lru) - unreferenced:
                return
            waiting.popleft()
            direct = self._start(seq, now, matched, direct)

    def _match(self, hashes: tuple[int, ...]) -> tuple[int, ...]:
        refs = self._refs
        n = 0
        for h in hashes:
            if h not in refs:
                break
            n += 1
        return hashes[:n]

    def _can_start(self, req: SeqRequest) -> bool:
        if len(self._running) >= self._cfg.max_num_seqs:
            return False
        matched, unreferenced = _walk(self._refs, req.block_hashes)
        needed = -(-(req.prompt_tokens + req.output_tokens) // self._cfg.block_size)
        evictable = len(self._lru) - unreferenced
        return needed - matched <= self._free + evictable

    def _start(self, seq: _Seq, now: float, n_matched: int, direct: bool) -> bool:
        # ``n_matched``: the leading block hashes present in the cache (see _schedule).
        # Returns whether a later start at ``now`` may still emit its STARTED directly.
        req = seq.req
        refs, lru = self._refs, self._lru
        hashes = req.block_hashes
        matched = hashes[:n_matched]
        for h in matched:
            r = refs[h]
            if r == 0:
                del lru[h]
            refs[h] = r + 1
        new = seq.blocks_needed - n_matched
        free = self._free
        while free < new:
            evicted, _ = lru.popitem(last=False)
            del refs[evicted]
            free += 1
        self._free = free - new
        # Like vLLM v1, newly allocated full prompt blocks enter the cache at scheduling time,
        # so concurrent requests with the same prefix share them. A hash already present past
        # the first miss (impossible for a real chain; hashes come from callers) keeps its
        # entry and our copy stays private, so the hash -> block map stays unique.
        if n_matched < len(hashes):
            registered = [h for h in hashes[n_matched:] if h not in refs]
            for h in registered:
                refs[h] = 1
            held = matched + tuple(registered)
        else:
            held = matched
        seq.hashes = held
        seq.private = seq.blocks_needed - len(held)
        cfg = self._cfg
        cached = seq.cached_tokens = n_matched * cfg.block_size
        self._queries += req.prompt_tokens
        self._hits += cached
        self._started += 1
        self._running[req.id] = seq
        ttft = cfg.ttft_overhead_ms + (req.prompt_tokens - cached) * cfg.prefill_ms_per_token
        jitter = 1.0 if cfg.jitter == 0 else max(0.05, self._rng.gauss(1.0, cfg.jitter))
        token_at = now + ttft * jitter
        heap, push = self._heap, heapq.heappush
        if direct and token_at > now:
            # STARTED straight to the outbox instead of a heap entry due now: with nothing
            # else due at ``now`` in the heap (``direct``) and this first token strictly
            # later, the heap would have returned it next anyway, in this order.
            self._outbox.append(EngineEvent(_STARTED, req.id, now, -1, cached))
            self._seqno += 1
            push(heap, (token_at, self._seqno, seq, _TOKEN, 0))
            return True
        seqno = self._seqno
        push(heap, (now, seqno + 1, seq, _STARTED, -1))
        push(heap, (token_at, seqno + 2, seq, _TOKEN, 0))
        self._seqno = seqno + 2
        return False

    def _release(self, seq: _Seq) -> None:
        # Tail blocks first, so they are older in the LRU and evicted before the prefix they
        # extend: evicting a parent would strand its children (unreachable by the walk).
        refs, lru = self._refs, self._lru
        for h in reversed(seq.hashes):
            r = refs[h] - 1
            refs[h] = r
            if r == 0:
                lru[h] = None
        self._free += seq.private
        seq.hashes, seq.private = (), 0

    def _check(self) -> None:
        """Assert the bookkeeping invariants (for tests; O(cache size))."""
        cfg = self._cfg
        assert self._free >= 0
        assert all(r >= 0 for r in self._refs.values())
        assert set(self._lru) == {h for h, r in self._refs.items() if r == 0}
        held = [h for s in self._running.values() for h in s.hashes]
        assert sum(self._refs.values()) == len(held)
        assert all(len(s.hashes) + s.private == s.blocks_needed for s in self._running.values())
        used = sum(1 for r in self._refs.values() if r > 0)
        used += sum(s.private for s in self._running.values())
        assert used + len(self._lru) + self._free == cfg.num_kv_blocks
        assert len(self._running) <= cfg.max_num_seqs
        assert len(self._waiting) <= cfg.max_waiting
        assert len(self._live) == len(self._running) + len(self._waiting)
        assert all(not s.hashes and not s.private for s in self._waiting)
        times = [e.time_ms for e in self._outbox]
        assert times == sorted(times) and all(t <= self._now for t in times)


def _walk(refs: dict[int, int], hashes: tuple[int, ...]) -> tuple[int, int]:
    """(blocks of the prompt's prefix cached, how many of those sit unreferenced in the
    LRU) in one pass: matched blocks in the LRU are reused, not evicted, so a fit test must
    not count them twice."""
    matched = unreferenced = 0
    for h in hashes:
        r = refs.get(h)
        if r is None:
            break
        matched += 1
        if r == 0:
            unreferenced += 1
    return matched, unreferenced
