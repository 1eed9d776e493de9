"""The admission policy of one region (DESIGN.md "Admission policy (core)"), pure.

``Policy.decide`` runs: resolve alias -> candidates -> predict -> bounded-load affinity ->
SERVE if it fits -> OVERFLOW (hop 0 only) -> QUEUE -> DEGRADE (if allowed) -> SHED. Time is
always passed in (clock seconds), randomness comes from the injected ``random.Random``, so
the same seed and inputs give the same decisions. ``decide(..., commit=False)`` is a dry run:
it changes no state at all (no RNG draw, no tokens, no accounting).
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import replace

from spillgate.core.admission_queue import AdmissionQueue, QueueEntry
from spillgate.core.affinity import PrefixIndex, SessionEntry, SessionTable, namespace_mask
from spillgate.core.breaker import Breaker
from spillgate.core.decision import (
    Action,
    Decision,
    Degrade,
    Outcome,
    Priority,
    Reason,
    Request,
    Ticket,
)
from spillgate.core.errors import NoFleet
from spillgate.core.fleet import FleetView
from spillgate.core.lanes import Lane, slot_class
from spillgate.core.output_ratio import OutputRatio, planned_tokens
from spillgate.core.overflow import NeighbourState, NeighbourSummary, TokenBucket
from spillgate.core.placement import NO_CANDIDATES, Pick, Scan, scan
from spillgate.core.policy_config import PolicyConfig
from spillgate.core.policy_fallback import (
    Target,
    capped_pick,
    fallback_target,
    output_tokens,
    overflow_decision,
    queue_decision,
    retry_after_ms,
    serve_decision,
    shed_decision,
    shed_reason,
)
from spillgate.core.policy_state import LaneSet, build_summary
from spillgate.core.signals import Signals
from spillgate.core.tickets import TicketBook

_NO_HOLDERS: tuple[int, ...] = ()


class Policy:
    """Admission policy state of one region: lanes, affinity, breakers, buckets, queue."""

    def __init__(
        self, config: PolicyConfig, region: str, rng: random.Random, instance: str = ""
    ) -> None:
        """``instance`` tells apart admissions of one region (and restarts): ticket ids are
        ``<region>-<instance>-<n>``, so a late Release never frees another run's ticket."""
        config.validate()
        self._cfg = config
        self._region = region
        self._rng = rng
        self._fleet: FleetView | None = None
        self._zone = ""
        self._lanes = LaneSet(config)
        self._prefix = PrefixIndex(config.prefix_index_stride)
        self._masks: dict[tuple[str, str, str], int] = {}
        self._sessions = SessionTable(config.session_capacity)
        self._breakers: dict[str, Breaker] = {}
        self._neighbours: dict[str, NeighbourState] = {}
        self._queue = AdmissionQueue(config.queue_capacity, config.band_capacity, config.band_ttl_s)
        self._queued_targets: dict[int, Target] = {}
        self._finished: list[tuple[Request, Decision]] = []
        prefix = f"{region}-{instance}" if instance else region
        self._tickets = TicketBook(region, config.ticket_lease_s, prefix)
        self._summary_seq = 0
        self._ratios: dict[tuple[str, str], OutputRatio] = {}
        self.overflow_in_total = 0
        self.overflow_out_total = 0

    # -- inputs ------------------------------------------------------------------------------

    def set_fleet(self, fleet: FleetView) -> None:
        """Adopt a new registry view; lanes that persist keep their load and learned rates."""
        self._fleet = fleet
        region = fleet.regions.get(self._region)
        self._zone = region.residency_zone if region else ""
        self._lanes.rebuild(fleet, self._region, self._prefix, self._breakers)

    def observe_signals(self, replica: str, signals: Signals, now: float) -> None:
        """Apply one scrape of ``replica`` (freshness counts from ``signals.time``).

        A replica whose signals were stale (it stopped answering) and are fresh again has
        come back: its open breaker lets a probe through now (``Breaker.recovered``).
        """
        fresh_after = now - self._cfg.stale_after_s
        for lane in self._lanes.of_replica(replica):
            was_stale = lane.signal_time < fresh_after
            lane.observe(signals.load(lane.triton_model_name), min(signals.time, now))
            if was_stale and lane.signal_time >= fresh_after and lane.breaker is not None:
                lane.breaker.recovered(now)

    def observe_neighbour(self, summary: NeighbourSummary, now: float) -> None:
        """Take a neighbour's RegionSummary (updates hysteresis and its overflow bucket)."""
        if summary.region == self._region:
            return
        state = self._neighbours.get(summary.region)
        if state is None:
            bucket = TokenBucket(0.0, self._cfg.overflow_refill_s, now)
            state = NeighbourState(summary, bucket, Breaker(self._cfg.neighbour_breaker))
            self._neighbours[summary.region] = state
        state.update(summary, now, self._cfg)

    def record_result(self, replica: str, ok: bool, now: float) -> None:
        """Feed the replica's breaker (health probe or request result)."""
        breaker = self._breakers.get(replica)
        if breaker is None:
            if ok:
                return  # closed breakers are created lazily, on the first failure
            breaker = self._breakers[replica] = Breaker(self._cfg.breaker)
            for lane in self._lanes.of_replica(replica):
                lane.breaker = breaker
        breaker.record(ok, now)

    def record_neighbour_result(self, region: str, ok: bool, now: float) -> None:
        """Feed a neighbour region's breaker (result of a forwarded request)."""
        state = self._neighbours.get(region)
        if state is not None:
            state.breaker.record(ok, now)

    def set_draining(self, replica: str, draining: bool) -> int:
        """Stop (or resume) admitting to ``replica``; returns its in-flight tickets."""
        self._lanes.set_draining(replica, draining)
        return self._tickets.on_replica(replica)

    # -- the decision ------------------------------------------------------------------------

    def decide(self, request: Request, now: float, commit: bool = True) -> Decision:
        """Decide for ``request`` at ``now``. Raises NoFleet, UnknownModel, InvalidRequest.

        With ``commit`` a SERVE/DEGRADE reserves a slot and returns a ticket, an OVERFLOW
        spends a bucket token, a QUEUE parks the request (finish it with ``drain_queue``).
        """
        fleet = self._fleet
        if fleet is None:
            raise NoFleet()
        request.validate()
        target = self._resolve(fleet, request, commit)
        remaining = request.remaining_ms(now)
        max_out = output_tokens(self._cfg, request, target.model_info)
        tokens = planned_tokens(max_out, self._ratio(target))
        local_ok = not request.residency_zone or request.residency_zone == self._zone
        local = NO_CANDIDATES
        if local_ok and remaining > 0:
            # A request that may be degraded also gets the free lanes DEGRADE by max_tokens needs.
            local = self._scan(target, request, tokens, remaining, now, request.allow_degrade)
            if local.fits and local.pick is not None:
                pick = local.pick
                return self._serve(
                    request, target, pick, remaining, now, commit, pick.reason, max_out
                )
        if request.hops == 0 and remaining > 0:
            overflow = self._overflow(fleet, request, target, tokens, remaining, now, commit)
            if overflow is not None:
                return overflow
        if not local_ok:
            detail = f"no target in residency zone {request.residency_zone!r} fits"
            return self._shed(request, target, Reason.RESIDENCY, detail, remaining, local)
        queue_full = False
        prio = request.priority
        if local.pick is not None and local.unloaded_fits and self._queue.may_queue(prio):
            ahead_ms = self._queue_ahead_ms(local, prio)
            wait = local.pick.queue_ms + ahead_ms
            total = local.pick.total_ms + ahead_ms
            if wait <= self._queue.ttl_s(prio) * 1000.0 and total <= remaining:
                if self._queue.has_room(prio):
                    return self._enqueue(request, target, local.pick, wait, remaining, now, commit)
                queue_full = True
        if request.allow_degrade and remaining > 0:
            degraded = self._degrade(fleet, request, target, local, max_out, remaining, now, commit)
            if degraded is not None:
                return degraded
        reason, detail = shed_reason(local, queue_full, prio, remaining)
        return self._shed(request, target, reason, detail, remaining, local)

    def drain_queue(self, now: float) -> list[tuple[Request, Decision]]:
        """Finish queued requests: SERVE those that now fit, SHED expired/displaced ones.

        Every request that got QUEUE from a committed ``decide`` appears here exactly once.
        """
        out, self._finished = self._finished, []
        for entry, reason in self._queue.expire(now):
            target = self._queued_targets.pop(entry.seq)
            detail = f"left the queue ({reason.value})"
            out.append((entry.request, self._shed_entry(entry, target, reason, detail, now)))
        blocked: set[tuple[str, str, int]] = set()  # (model, version, slot class)
        for entry in list(self._queue.ordered()):
            req, target = entry.request, self._queued_targets[entry.seq]
            key = (target.model, target.version, slot_class(req.priority, req.hops))
            if key in blocked:
                continue  # an earlier entry of the same version and priority could not start
            remaining = req.remaining_ms(now)
            max_out = output_tokens(self._cfg, req, target.model_info)
            tokens = planned_tokens(max_out, self._ratio(target))
            local = self._scan(target, req, tokens, remaining, now)
            if local.pick is None or local.pick.queue_ms > 0 or not local.fits:
                blocked.add(key)
                continue
            self._queue.remove(entry)
            del self._queued_targets[entry.seq]
            decision = self._serve(
                req, target, local.pick, remaining, now, True, Reason.QUEUE_SERVED, max_out
            )
            out.append((req, _with_queue_ms(decision, (now - entry.enqueued_at) * 1000.0)))
        return out

    # -- accounting --------------------------------------------------------------------------

    def cancel_queued(self, request: Request) -> bool:
        """Take a queued ``request`` out of the queue (its caller went away), so it holds
        no place and is never granted a slot; False when it is not queued (any more)."""
        band = self._queue.band(request.priority)
        for entry in list(band):
            if entry.request is request and self._queue.remove(entry):
                self._queued_targets.pop(entry.seq, None)
                return True
        return False

    def release(
        self,
        ticket_id: str,
        outcome: Outcome,
        now: float,
        ttft_ms: float = 0.0,
        total_ms: float = 0.0,
        output_tokens: int = 0,
    ) -> bool:
        """End a ticket; OK outcomes teach the lane's service rate and the model version's
        output length ratio (``output_tokens`` / the ticket's planned max_tokens; 0 = unknown,
        not learned). False if unknown/expired."""
        held = self._tickets.pop(ticket_id)
        if held is None:
            return False
        held.lane.release()
        if outcome is Outcome.OK:
            held.lane.learn(
                total_ms, ttft_ms, output_tokens, held.predicted_prefill_ms, held.predicted_itl_ms
            )
            if output_tokens > 0 and held.max_tokens > 0:
                self._ratio_of(held.lane.model, held.lane.version).observe(
                    output_tokens, held.max_tokens
                )
            if held.lane.replica in self._breakers:
                self.record_result(held.lane.replica, True, now)
        elif outcome is Outcome.ERROR:
            self.record_result(held.lane.replica, False, now)
        return True

    def renew(self, ticket_id: str, now: float, lease_ms: int = 0) -> Ticket | None:
        """Extend a live ticket's lease (0 = default, capped at the default); None if expired."""
        return self._tickets.renew(ticket_id, now, lease_ms)

    def expire_tickets(self, now: float) -> list[str]:
        """Free every ticket whose lease ran out (accounting heals); returns their ids."""
        expired = self._tickets.expire(now)
        for held in expired:
            held.lane.release()
        return [held.ticket.id for held in expired]

    def in_flight_on(self, replica: str) -> int:
        """Live tickets held on ``replica``."""
        return self._tickets.on_replica(replica)

    def drop_tickets(self, replica: str) -> list[str]:
        """End every ticket on ``replica`` now (a drain's hard deadline); returns their ids."""
        dropped = self._tickets.drop_replica(replica)
        for held in dropped:
            held.lane.release()
        return [held.ticket.id for held in dropped]

    def summary(self, now: float) -> NeighbourSummary:
        """This region's RegionSummary for peers (stale lanes count as no headroom)."""
        self._summary_seq += 1
        return build_summary(
            self._lanes, self._region, self._zone, now, self._cfg, len(self._queue),
            self._summary_seq, self.overflow_in_total, self.overflow_out_total,
            self._fleet.revision if self._fleet else 0,
        )  # fmt: skip

    @property
    def fleet(self) -> FleetView | None:
        """The fleet view in use (None before the first registry snapshot)."""
        return self._fleet

    @property
    def queue_len(self) -> int:
        """Requests parked in the admission queue."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Live tickets."""
        return len(self._tickets)

    # -- steps -------------------------------------------------------------------------------

    def _resolve(self, fleet: FleetView, req: Request, commit: bool) -> Target:
        entry = self._sessions.get(req.session_id) if req.session_id else None
        alias = fleet.is_alias(req.model)
        if (
            entry is not None
            and entry.requested == req.model
            and (entry.model, entry.version) in fleet.versions
        ):
            model, version, replica, pinned = entry.model, entry.version, entry.replica, True
        else:
            u = self._uniform(req, commit) if alias else 0.0
            model, version = fleet.resolve(req.model, self._region, u)
            replica, pinned = "", False
        info, model_info = fleet.versions[(model, version)], fleet.models[model]
        return Target(req.model, model, version, info, model_info, alias, pinned, replica)

    def _uniform(self, req: Request, commit: bool) -> float:
        # Dry runs must not advance the RNG (that would change later committed decisions),
        # so they draw from a stable hash of the request instead.
        if commit:
            return self._rng.random()
        return zlib.crc32((req.session_id or req.request_id).encode()) / 2**32

    def _ratio(self, target: Target) -> float:
        learned = self._ratios.get((target.model, target.version))
        return learned.ratio if learned is not None else 1.0

    def _ratio_of(self, model: str, version: str) -> OutputRatio:
        learned = self._ratios.get((model, version))
        if learned is None:
            cfg = self._cfg
            learned = self._ratios[(model, version)] = OutputRatio(
                cfg.output_ratio_quantile, cfg.output_ratio_window,
                cfg.output_ratio_min_samples, cfg.output_ratio_floor,
            )  # fmt: skip
        return learned

    def output_ratio(self, model: str, version: str) -> float:
        """The learned completion/max_tokens ratio decode is planned with (1.0 = unlearned)."""
        learned = self._ratios.get((model, version))
        return learned.ratio if learned is not None else 1.0

    def _mask(self, model: str, version: str, salt: str) -> int:
        key = (model, version, salt)
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) > 65536:
                self._masks.clear()  # a pure memo: bounded, recomputed on demand
            mask = self._masks[key] = namespace_mask(model, version, salt)
        return mask

    def _candidates(self, target: Target, req: Request) -> list[Lane]:
        lanes = self._lanes.of_version(target.model, target.version)
        if req.avoid_replicas:  # a retry: never the replica that just refused it
            return [lane for lane in lanes if lane.replica not in req.avoid_replicas]
        return lanes

    def _scan(
        self,
        target: Target,
        req: Request,
        tokens: int,
        remaining: float,
        now: float,
        degrade: bool = False,
    ) -> Scan:
        lanes = self._candidates(target, req)
        if not lanes:
            return NO_CANDIDATES
        cfg = self._cfg
        holders, cached = _NO_HOLDERS, 0
        hashes = req.prefix_block_hashes
        if len(hashes) >= max(cfg.min_prefix_blocks, 1):
            mask = self._mask(target.model, target.version, req.cache_salt)
            depth, holders = self._prefix.match(mask, hashes, cfg.min_prefix_blocks)
            cached = min(depth * req.block_size_tokens, req.prompt_tokens)
        session_lane = None
        if target.session_replica:
            session_lane = self._lanes.get(target.session_replica, target.model, target.version)
        return scan(
            lanes, now, now - cfg.stale_after_s, slot_class(req.priority, req.hops),
            req.prompt_tokens, tokens,
            remaining, cfg.epsilon, holders, cached, session_lane, degrade,
        )  # fmt: skip

    def _serve(
        self,
        req: Request,
        target: Target,
        pick: Pick,
        remaining: float,
        now: float,
        commit: bool,
        reason: Reason,
        max_tokens: int,
        action: Action = Action.SERVE,
        degrade: Degrade | None = None,
    ) -> Decision:
        lane = pick.lane
        ticket = None
        if commit:
            lane.admit()
            if lane.breaker is not None:
                lane.breaker.on_attempt(now)
            if req.prefix_block_hashes:
                mask = self._mask(target.model, target.version, req.cache_salt)
                self._prefix.touch(lane.id, mask, req.prefix_block_hashes)
            if req.session_id and action is Action.SERVE:
                entry = SessionEntry(target.requested, target.model, target.version, lane.replica)
                self._sessions.put(req.session_id, entry)
            if req.hops > 0:
                self.overflow_in_total += 1
            predicted_prefill = pick.queue_ms + pick.prefill_ms
            ticket = self._tickets.issue(lane, now, predicted_prefill, pick.itl_ms, max_tokens)
        return serve_decision(self._region, pick, remaining, action, reason, degrade, ticket)

    def _overflow(
        self, fleet: FleetView, req: Request, target: Target, tokens: int, remaining: float,
        now: float, commit: bool,
    ) -> Decision | None:  # fmt: skip
        found = overflow_decision(
            fleet, self._region, self._neighbours, self._cfg, req, target, tokens, remaining,
            now,
        )  # fmt: skip
        if found is None:
            return None
        decision, state = found
        if commit:
            state.bucket.take(now)
            state.breaker.on_attempt(now)
            self.overflow_out_total += 1
            if req.session_id:
                entry = SessionEntry(req.model, decision.model, decision.version, "")
                self._sessions.put(req.session_id, entry)
        return decision

    def _enqueue(
        self,
        req: Request,
        target: Target,
        pick: Pick,
        wait_ms: float,
        remaining: float,
        now: float,
        commit: bool,
    ) -> Decision:
        if commit:
            latest = now + (remaining - pick.prefill_ms - pick.decode_ms) / 1000.0
            entry, displaced = self._queue.push(req, now, latest)
            assert entry is not None  # has_room() was checked by the caller
            self._queued_targets[entry.seq] = target
            if displaced is not None:
                victim = self._queued_targets.pop(displaced.seq)
                detail = f"displaced by a {req.priority.name} request"
                shed = self._shed_entry(displaced, victim, Reason.DISPLACED, detail, now)
                self._finished.append((displaced.request, shed))
        return queue_decision(self._region, pick, wait_ms, remaining)

    def _degrade(
        self, fleet: FleetView, req: Request, target: Target, local: Scan, max_out: int,
        remaining: float, now: float, commit: bool,
    ) -> Decision | None:  # fmt: skip
        """``local``: the scan of ``target`` made with ``degrade=True``."""
        fb = fallback_target(fleet, self._region, target, lambda: self._uniform(req, commit))
        if fb is not None:
            fb_max = output_tokens(self._cfg, req, fb.model_info)
            fb_tokens = planned_tokens(fb_max, self._ratio(fb))
            fb_scan = self._scan(fb, req, fb_tokens, remaining, now)
            if fb_scan.fits and fb_scan.pick is not None:
                deg = Degrade(fallback_model=fb.model)
                return self._serve(
                    req, fb, fb_scan.pick, remaining, now, commit,
                    Reason.DEGRADE_FALLBACK, fb_max, Action.DEGRADE, deg,
                )  # fmt: skip
        capped = capped_pick(local, self._cfg, req, max_out, self._ratio(target), remaining)
        if capped is None:
            return None
        return self._serve(
            req, target, capped[1], remaining, now, commit, Reason.DEGRADE_MAX_TOKENS,
            capped[0], Action.DEGRADE, Degrade(max_tokens=capped[0]),
        )  # fmt: skip

    def _queue_ahead_ms(self, local: Scan, prio: Priority) -> float:
        ahead = self._queue.ahead(prio)
        if not ahead:
            return 0.0
        return ahead / local.drain_rate if local.drain_rate > 0 else math.inf

    def _shed(
        self,
        req: Request,
        target: Target,
        reason: Reason,
        detail: str,
        remaining: float,
        local: Scan,
    ) -> Decision:
        if reason is Reason.RESIDENCY:
            retry = self._cfg.retry_after_max_ms  # only a fleet change helps
        else:
            retry = retry_after_ms(self._cfg, local, self._queue.ahead(req.priority))
        return shed_decision(self._region, target, reason, detail, remaining, local, retry)

    def _shed_entry(
        self, entry: QueueEntry, target: Target, reason: Reason, detail: str, now: float
    ) -> Decision:
        req = entry.request
        remaining = req.remaining_ms(now)
        max_out = output_tokens(self._cfg, req, target.model_info)
        tokens = planned_tokens(max_out, self._ratio(target))
        local = self._scan(target, req, tokens, remaining, now)  # for retry-after only
        shed = self._shed(req, target, reason, detail, remaining, replace(local, pick=None))
        return _with_queue_ms(shed, (now - entry.enqueued_at) * 1000.0)


def _with_queue_ms(decision: Decision, queue_ms: float) -> Decision:
    return replace(decision, queue_ms=queue_ms)
