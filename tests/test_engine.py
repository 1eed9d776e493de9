import itertools
import random
import statistics
from collections import defaultdict
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spillgate.core.engine import (
    Engine,
    EngineConfig,
    EngineEvent,
    EventKind,
    SeqRequest,
    SubmitResult,
)
from spillgate.core.prefix import block_hashes

STARTED, TOKEN, FINISHED = EventKind.STARTED, EventKind.TOKEN, EventKind.FINISHED


def make_req(
    rid: str, prompt: int = 32, out: int = 4, topic: str = "", block_size: int = 16
) -> SeqRequest:
    """A request whose prompt is ``prompt`` tokens of ``topic``; same topic = shared prefix."""
    tokens = [f"{topic}{i}" for i in range(prompt)]
    return SeqRequest(rid, prompt, block_hashes(tokens, block_size), out)


def drain(engine: Engine) -> list[EngineEvent]:
    """Advance event by event until idle, checking invariants after each step."""
    events: list[EngineEvent] = []
    while (t := engine.next_event_time()) is not None:
        events += engine.advance(t)
        engine._check()
    return events


def times(events: list[EngineEvent], kind: EventKind, sid: str) -> list[float]:
    return [e.time_ms for e in events if e.kind is kind and e.seq_id == sid]


def first(events: list[EngineEvent], kind: EventKind, sid: str) -> float:
    return times(events, kind, sid)[0]


def test_single_sequence_timeline() -> None:
    cfg = EngineConfig(ttft_overhead_ms=10.0, prefill_ms_per_token=0.5, itl_base_ms=4.0)
    engine = Engine(cfg)
    assert engine.submit(make_req("a", prompt=20, out=3), now=100.0) is SubmitResult.ACCEPTED
    events = drain(engine)
    assert [(e.kind, e.time_ms, e.token_index) for e in events] == [
        (STARTED, 100.0, -1),
        (TOKEN, 120.0, 0),
        (TOKEN, 124.0, 1),
        (TOKEN, 128.0, 2),
        (FINISHED, 128.0, 3),
    ]
    stats = engine.stats()
    assert (stats.started, stats.finished, stats.running, stats.kv_blocks_used) == (1, 1, 0, 0)
    # The one full prompt block (16 of 20 tokens) stays cached; the other block is freed.
    assert stats.kv_blocks_cached == 1
    assert engine.next_event_time() is None


def test_prefix_hit_shortens_ttft() -> None:
    engine = Engine(EngineConfig())
    engine.submit(make_req("a", prompt=200, out=2, topic="doc"), now=0.0)
    events = drain(engine)
    t_end = first(events, FINISHED, "a")
    assert engine.predicted_ttft_ms(200, make_req("x", 200, topic="doc").block_hashes) == (
        pytest.approx(15.0 + 8 * 0.05)
    )
    engine.submit(make_req("b", prompt=200, out=2, topic="doc"), now=t_end + 1)
    events += drain(engine)
    started = {e.seq_id: e for e in events if e.kind is STARTED}
    assert started["a"].cached_tokens == 0
    assert started["b"].cached_tokens == 192  # 12 full blocks of 16; the last 8 tokens recompute
    ttft_a = first(events, TOKEN, "a") - started["a"].time_ms
    ttft_b = first(events, TOKEN, "b") - started["b"].time_ms
    assert ttft_a == pytest.approx(15.0 + 200 * 0.05)
    assert ttft_b == pytest.approx(15.0 + 8 * 0.05)
    stats = engine.stats()
    assert (stats.prefix_queries_tokens, stats.prefix_hits_tokens) == (400, 192)


def test_different_prefix_gets_no_hit() -> None:
    engine = Engine(EngineConfig())
    engine.submit(make_req("a", prompt=64, topic="x"), now=0.0)
    drain(engine)
    assert engine.cached_tokens(make_req("b", prompt=64, topic="x").block_hashes) == 64
    assert engine.cached_tokens(make_req("b", prompt=64, topic="y").block_hashes) == 0


def test_concurrent_requests_share_prefix_blocks() -> None:
    # Full prompt blocks enter the cache when a sequence starts (vLLM v1), not when it ends.
    engine = Engine(EngineConfig(block_size=16))
    engine.submit(make_req("a", prompt=64, out=16, topic="sys"), now=0.0)
    engine.submit(make_req("b", prompt=64, out=16, topic="sys"), now=0.0)
    # 4 shared prompt blocks + 1 private output block each.
    assert engine.stats().kv_blocks_used == 6
    started = {e.seq_id: e.cached_tokens for e in engine.advance(0.0) if e.kind is STARTED}
    assert started == {"a": 0, "b": 64}
    drain(engine)
    assert (engine.stats().kv_blocks_used, engine.stats().kv_blocks_cached) == (0, 4)


def test_full_slots_queue_until_a_sequence_finishes() -> None:
    engine = Engine(EngineConfig(max_num_seqs=2))
    for rid, out in (("a", 2), ("b", 10), ("c", 2)):
        assert engine.submit(make_req(rid, out=out, topic=rid), now=0.0) is SubmitResult.ACCEPTED
    assert (engine.stats().running, engine.stats().waiting) == (2, 1)
    events = drain(engine)
    assert first(events, STARTED, "c") == first(events, FINISHED, "a") > 0.0
    # The new sequence starts right after the one that made room.
    kinds = [(e.kind, e.seq_id) for e in events]
    assert kinds.index((STARTED, "c")) > kinds.index((FINISHED, "a"))


def test_queue_full_is_rejected_without_events() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, max_waiting=2))
    results = [engine.submit(make_req(f"r{i}", topic=str(i)), now=0.0) for i in range(4)]
    assert results == [SubmitResult.ACCEPTED] * 3 + [SubmitResult.QUEUE_FULL]
    assert engine.stats().rejected == 1
    events = drain(engine)
    assert not [e for e in events if e.seq_id == "r3"]
    assert engine.stats().finished == 3
    assert engine.submit(make_req("r3"), now=engine.now) is SubmitResult.ACCEPTED


def test_max_waiting_zero_admits_only_what_starts_at_once() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, max_waiting=0))
    assert engine.submit(make_req("a"), now=0.0) is SubmitResult.ACCEPTED
    assert engine.submit(make_req("b"), now=0.0) is SubmitResult.QUEUE_FULL


def test_too_large_needs_more_blocks_than_the_cache() -> None:
    engine = Engine(EngineConfig(num_kv_blocks=4, block_size=16))
    assert engine.submit(make_req("big", prompt=60, out=5), now=0.0) is SubmitResult.TOO_LARGE
    assert engine.submit(make_req("fits", prompt=60, out=4), now=0.0) is SubmitResult.ACCEPTED
    assert engine.stats().rejected == 1
    assert {e.seq_id for e in drain(engine)} == {"fits"}


def test_kv_exhaustion_queues_even_with_free_slots() -> None:
    engine = Engine(EngineConfig(max_num_seqs=8, num_kv_blocks=8, block_size=16))
    engine.submit(make_req("a", prompt=64, out=16, topic="a"), now=0.0)  # 5 blocks
    engine.submit(make_req("b", prompt=64, out=16, topic="b"), now=0.0)  # 5 more: do not fit
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (1, 1, 5)
    assert stats.kv_usage == pytest.approx(5 / 8)
    events = drain(engine)
    assert first(events, STARTED, "b") == first(events, FINISHED, "a")
    # b had to evict one of a's 4 cached prompt blocks; then its own 4 joined the cache.
    assert engine.stats().kv_blocks_cached == 3 + 4


def test_matched_cached_blocks_are_not_counted_as_evictable() -> None:
    engine = Engine(EngineConfig(max_num_seqs=2, num_kv_blocks=5, block_size=4))
    engine.submit(make_req("x", prompt=8, out=4, topic="x", block_size=4), now=0.0)
    drain(engine)  # 2 cached, 3 free
    engine.submit(make_req("hog", prompt=0, out=8), now=engine.now)  # 2 blocks: 1 free left
    # y reuses both cached blocks and needs 2 more: only 1 is free, and the cached ones are
    # its own prefix, so it must wait for hog.
    engine.submit(make_req("y", prompt=8, out=8, topic="x", block_size=4), now=engine.now)
    assert (engine.stats().running, engine.stats().waiting) == (1, 1)
    events = drain(engine)
    assert first(events, STARTED, "y") == first(events, FINISHED, "hog")
    assert [e.cached_tokens for e in events if e.kind is STARTED and e.seq_id == "y"] == [8]


def test_fifo_head_blocks_smaller_requests() -> None:
    engine = Engine(EngineConfig(max_num_seqs=4, num_kv_blocks=8, block_size=16))
    engine.submit(make_req("a", prompt=64, out=16, topic="a"), now=0.0)  # 5 blocks
    engine.submit(make_req("big", prompt=64, out=16, topic="b"), now=0.0)  # 5: waits
    engine.submit(make_req("small", prompt=0, out=1), now=0.0)  # 1 would fit, but FIFO
    assert (engine.stats().running, engine.stats().waiting) == (1, 2)
    events = drain(engine)
    assert first(events, STARTED, "small") >= first(events, STARTED, "big")


def test_itl_grows_with_batch() -> None:
    def mean_gap(concurrent: int) -> float:
        engine = Engine(EngineConfig())
        for i in range(concurrent):
            engine.submit(make_req(f"s{i}", out=20, topic=str(i)), now=0.0)
        events = drain(engine)
        gaps = []
        for i in range(concurrent):
            ts = times(events, TOKEN, f"s{i}")
            gaps += [b - a for a, b in itertools.pairwise(ts)]
        return statistics.mean(gaps)

    assert mean_gap(1) == pytest.approx(8.0)
    assert mean_gap(8) == pytest.approx(8.0 + 7 * 0.15)
    assert Engine(EngineConfig()).itl_ms(8) == pytest.approx(9.05)


def test_cancel_running_frees_slot_and_admits_waiter() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1))
    engine.submit(make_req("a", out=50, topic="a"), now=0.0)
    engine.submit(make_req("b", out=2, topic="b"), now=0.0)
    events = engine.advance(40.0)
    assert times(events, TOKEN, "a")  # a is decoding
    assert engine.cancel("a", now=50.0)
    assert (engine.stats().running, engine.stats().cancelled) == (1, 1)
    events += drain(engine)
    assert first(events, STARTED, "b") == 50.0
    assert all(e.time_ms <= 50.0 for e in events if e.seq_id == "a")
    assert not times(events, FINISHED, "a")
    assert not engine.cancel("a", now=engine.now)
    stats = engine.stats()
    assert (stats.finished, stats.cancelled, stats.kv_blocks_used) == (1, 1, 0)


def test_cancel_waiting_and_unknown() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1))
    engine.submit(make_req("a"), now=0.0)
    engine.submit(make_req("b"), now=0.0)
    assert engine.cancel("b", now=1.0)
    assert not engine.cancel("b", now=1.0)
    assert not engine.cancel("nope", now=1.0)
    events = drain(engine)
    assert not [e for e in events if e.seq_id == "b"]
    assert engine.stats().waiting == 0


def test_cancel_at_start_time_keeps_what_was_due_and_nothing_after() -> None:
    # cancel() first processes everything due at its time, so the STARTED at 0.0 happened.
    engine = Engine(EngineConfig())
    engine.submit(make_req("a"), now=0.0)
    assert engine.cancel("a", now=0.0)
    assert [e.kind for e in engine.advance(0.0)] == [STARTED]
    assert engine.next_event_time() is None
    assert engine.advance(1e9) == []


def test_finished_before_cancel_time_is_not_cancelled() -> None:
    engine = Engine(EngineConfig())
    engine.submit(make_req("a", out=1), now=0.0)
    assert not engine.cancel("a", now=1000.0)  # it finished at ~16.6 ms
    assert [e.kind for e in engine.advance(1000.0)] == [STARTED, TOKEN, FINISHED]
    assert (engine.stats().finished, engine.stats().cancelled) == (1, 0)


@pytest.mark.parametrize("touch_x", [True, False])
def test_lru_evicts_least_recently_used_prefix_first(touch_x: bool) -> None:
    cfg = EngineConfig(max_num_seqs=1, num_kv_blocks=6, block_size=4)

    def run(rid: str, topic: str, prompt: int) -> None:
        engine.submit(make_req(rid, prompt=prompt, out=4, topic=topic, block_size=4), engine.now)
        drain(engine)

    def cached(topic: str, prompt: int = 8) -> int:
        return engine.cached_tokens(make_req("q", prompt, topic=topic, block_size=4).block_hashes)

    engine = Engine(cfg)
    engine.advance(0.0)
    run("x1", "x", 8)  # 2 cached prompt blocks
    run("y1", "y", 8)  # 2 more; 2 free
    if touch_x:
        run("x2", "x", 8)  # x is now more recent than y
    assert (cached("x"), cached("y")) == (8, 8)
    run("z", "z", 12)  # needs 4 fresh blocks: evicts 2 cached ones
    old, recent = ("y", "x") if touch_x else ("x", "y")
    assert (cached(old), cached(recent), cached("z", 12)) == (0, 8, 12)


def test_eviction_takes_the_tail_of_a_prefix_first() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, num_kv_blocks=4, block_size=4))
    engine.submit(make_req("x", prompt=12, out=4, topic="x", block_size=4), now=0.0)
    drain(engine)  # 3 cached, 1 free
    engine.submit(make_req("z", prompt=0, out=8), now=engine.now)  # 2 blocks: evicts 1
    drain(engine)
    assert engine.cached_tokens(make_req("q", 12, topic="x", block_size=4).block_hashes) == 8


def test_token_events_off_matches_timeline_of_single_sequence() -> None:
    def key_events(token_events: bool) -> list[tuple[EventKind, float, int]]:
        engine = Engine(EngineConfig(token_events=token_events))
        engine.submit(make_req("a", prompt=100, out=30), now=5.0)
        events = drain(engine)
        assert engine.stats().finished == 1
        assert engine.stats().kv_blocks_used == 0
        return [
            (e.kind, e.time_ms, e.token_index)
            for e in events
            if e.kind is not TOKEN or e.token_index == 0
        ]

    full, fast = key_events(True), key_events(False)
    assert [(k, i) for k, _, i in full] == [(k, i) for k, _, i in fast]
    assert [t for _, t, _ in full] == pytest.approx([t for _, t, _ in fast])
    assert [k for k, _, _ in fast] == [STARTED, TOKEN, FINISHED]


def test_token_events_off_emits_three_events_per_sequence() -> None:
    engine = Engine(EngineConfig(token_events=False, max_num_seqs=3))
    for i in range(5):
        engine.submit(make_req(f"s{i}", out=1 + 7 * i, topic=str(i)), now=0.0)
    events = drain(engine)
    assert len(events) == 15
    assert engine.stats().finished == 5


def _jittered_run(seed: int, token_events: bool = True) -> list[EngineEvent]:
    engine = Engine(
        EngineConfig(jitter=0.3, max_num_seqs=2, token_events=token_events), random.Random(seed)
    )
    for i in range(4):
        engine.submit(make_req(f"s{i}", out=10, topic=str(i % 2)), now=float(i))
    return drain(engine)


@pytest.mark.parametrize("token_events", [True, False])
def test_jitter_is_reproducible_per_seed(token_events: bool) -> None:
    assert _jittered_run(7, token_events) == _jittered_run(7, token_events)
    assert _jittered_run(7, token_events) != _jittered_run(8, token_events)
    no_jitter = Engine(EngineConfig(max_num_seqs=2))
    for i in range(4):
        no_jitter.submit(make_req(f"s{i}", out=10, topic=str(i % 2)), now=float(i))
    assert [e.time_ms for e in drain(no_jitter)] != [e.time_ms for e in _jittered_run(7)]


def test_advance_is_idempotent_and_monotone() -> None:
    engine = Engine(EngineConfig())
    engine.submit(make_req("a", out=3), now=0.0)
    first_batch = engine.advance(20.0)
    assert first_batch and all(e.time_ms <= 20.0 for e in first_batch)
    assert engine.advance(20.0) == []
    with pytest.raises(ValueError, match="earlier"):
        engine.advance(19.0)
    with pytest.raises(ValueError, match="earlier"):
        engine.submit(make_req("b"), now=10.0)
    assert engine.advance(float("inf"))[-1].kind is FINISHED


def test_submit_catches_up_before_scheduling() -> None:
    # A slot freed at ~21.6 ms is free for a request arriving at 100 ms, without an advance()
    # in between, and the new request starts at its arrival time, not in the past.
    engine = Engine(EngineConfig(max_num_seqs=1))
    engine.submit(make_req("a", out=1), now=0.0)
    engine.submit(make_req("b", out=1), now=100.0)
    assert engine.stats().running == 1
    events = engine.advance(100.0)
    assert [(e.kind, e.seq_id) for e in events][-1] == (STARTED, "b")
    assert first(events, STARTED, "b") == 100.0
    assert [e.time_ms for e in events] == sorted(e.time_ms for e in events)


def test_submit_validates_request() -> None:
    engine = Engine(EngineConfig(block_size=4))
    engine.submit(SeqRequest("a", 8, (1, 2), 1), now=0.0)
    with pytest.raises(ValueError, match="already live"):
        engine.submit(SeqRequest("a", 8, (1, 2), 1), now=0.0)
    with pytest.raises(ValueError, match="block_hashes"):
        engine.submit(SeqRequest("b", 7, (1, 2), 1), now=0.0)
    with pytest.raises(ValueError, match="repeated"):
        engine.submit(SeqRequest("b", 8, (3, 3), 1), now=0.0)
    with pytest.raises(ValueError, match="output_tokens"):
        engine.submit(SeqRequest("b", 8, (), 0), now=0.0)
    drain(engine)
    assert engine.submit(SeqRequest("a", 8, (1, 2), 1), now=engine.now) is SubmitResult.ACCEPTED


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_num_seqs", 0),
        ("max_waiting", -1),
        ("num_kv_blocks", 0),
        ("block_size", 0),
        ("ttft_overhead_ms", -1.0),
        ("prefill_ms_per_token", float("nan")),
        ("itl_base_ms", float("inf")),
        ("itl_per_seq_ms", -0.1),
        ("jitter", -0.5),
    ],
)
def test_validate_names_the_bad_field(field: str, value: float) -> None:
    changes: dict[str, Any] = {field: value}
    bad = replace(EngineConfig(), **changes)
    with pytest.raises(ValueError, match=field):
        bad.validate()
    with pytest.raises(ValueError, match=field):
        Engine(bad)


def test_default_config_is_valid() -> None:
    EngineConfig().validate()


# -- property test ----------------------------------------------------------------------------

BS = 4
TOPICS = ("sys", "sys", "doc", "")  # repeated topic = more shared prefixes
submit_op = st.tuples(
    st.just("submit"), st.sampled_from(TOPICS), st.integers(0, 24), st.integers(1, 12)
)
cancel_op = st.tuples(st.just("cancel"), st.integers(0, 40))
advance_op = st.tuples(st.just("advance"), st.floats(0.0, 60.0))
configs = st.builds(
    EngineConfig,
    max_num_seqs=st.integers(1, 3),
    max_waiting=st.integers(0, 3),
    num_kv_blocks=st.integers(2, 12),
    block_size=st.just(BS),
    jitter=st.sampled_from([0.0, 0.5]),
    token_events=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    cfg=configs,
    seed=st.integers(0, 3),
    ops=st.lists(st.one_of(submit_op, cancel_op, advance_op), max_size=40),
)
def test_random_operations_keep_invariants_and_end_every_request_once(
    cfg: EngineConfig, seed: int, ops: list[tuple[object, ...]]
) -> None:
    engine = Engine(cfg, random.Random(seed))
    now = 0.0
    accepted: dict[str, SeqRequest] = {}
    rejected: set[str] = set()
    cancelled_at: dict[str, float] = {}
    events: list[EngineEvent] = []

    def collect(batch: list[EngineEvent]) -> None:
        assert all(e.time_ms <= engine.now for e in batch)
        events.extend(batch)
        stamps = [e.time_ms for e in events]
        assert stamps == sorted(stamps)

    for i, op in enumerate(ops):
        match op:
            case ("submit", str(topic), int(prompt), int(out)):
                req = make_req(f"r{i}", prompt=prompt, out=out, topic=topic, block_size=BS)
                if engine.submit(req, now) is SubmitResult.ACCEPTED:
                    accepted[req.id] = req
                else:
                    rejected.add(req.id)
            case ("cancel", int(target)):
                rid = f"r{target}"
                was_live = (
                    rid in accepted and rid not in cancelled_at and not times(events, FINISHED, rid)
                )
                if engine.cancel(rid, now):
                    assert was_live
                    cancelled_at[rid] = now
            case ("advance", float(dt)):
                now += dt
                collect(engine.advance(now))
        engine._check()
        stats = engine.stats()
        total = stats.kv_blocks_total
        assert 0 <= stats.kv_blocks_used <= total and 0 <= stats.kv_blocks_cached <= total
        assert stats.kv_blocks_used + stats.kv_blocks_cached <= total
        assert stats.running <= cfg.max_num_seqs and stats.waiting <= cfg.max_waiting

    while (t := engine.next_event_time()) is not None:
        collect(engine.advance(t))
        engine._check()

    per_id: dict[str, list[EngineEvent]] = defaultdict(list)
    for e in events:
        per_id[e.seq_id].append(e)
    assert not rejected & per_id.keys()
    for rid, req in accepted.items():
        evs = per_id.get(rid, [])
        finished = [e for e in evs if e.kind is FINISHED]
        assert (len(finished) == 1) != (rid in cancelled_at), rid
        if rid in cancelled_at:
            assert all(e.time_ms <= cancelled_at[rid] for e in evs)
        if finished:
            assert evs[-1] == finished[0] and finished[0].token_index == req.output_tokens
            tokens = [e.token_index for e in evs if e.kind is TOKEN]
            expect = list(range(req.output_tokens)) if cfg.token_events else [0]
            assert tokens == expect
        if evs:
            assert evs[0].kind is STARTED and 0 <= evs[0].cached_tokens <= req.prompt_tokens
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
    assert stats.finished + stats.cancelled == len(accepted)
    assert stats.cancelled == len(cancelled_at)
    assert stats.rejected == len(rejected)
    assert len(per_id) == stats.started <= len(accepted)
    assert stats.finished <= stats.started
    assert 0 <= stats.prefix_hits_tokens <= stats.prefix_queries_tokens
