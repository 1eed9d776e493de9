"""What ``Policy.decide`` does once a local SERVE does not fit: overflow, degrade, shed (pure).

Split from ``policy.py`` to keep each module small. Functions here build decisions and
choose targets; they change no state: the owning ``Policy`` spends bucket tokens, takes
tickets and updates its tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from spillgate.core.decision import (
    Action,
    Decision,
    Degrade,
    Estimate,
    Priority,
    Reason,
    Request,
    Ticket,
)
from spillgate.core.errors import PolicyError
from spillgate.core.fleet import FleetView, ModelInfo, VersionInfo
from spillgate.core.lanes import slot_class
from spillgate.core.output_ratio import capped_max_tokens
from spillgate.core.overflow import NeighbourState
from spillgate.core.placement import Pick, Scan, max_tokens_that_fit
from spillgate.core.policy_config import PolicyConfig
from spillgate.core.policy_state import pick_neighbour


@dataclass(slots=True)
class Target:
    """The resolved (model, version) a request is placed on."""

    requested: str
    model: str
    version: str
    info: VersionInfo
    model_info: ModelInfo
    alias: bool  # requested an alias (any of its versions is compatible unless pinned)
    pinned: bool  # the version came from the session table
    session_replica: str


def output_tokens(cfg: PolicyConfig, req: Request, model: ModelInfo) -> int:
    """Output length to plan for: ``max_tokens`` (0 = config default), capped by the model."""
    tokens = req.max_tokens if req.max_tokens > 0 else cfg.default_output_tokens
    return min(tokens, model.max_output_tokens) if model.max_output_tokens > 0 else tokens


def serve_decision(
    region: str,
    pick: Pick,
    remaining: float,
    action: Action,
    reason: Reason,
    degrade: Degrade | None,
    ticket: Ticket | None,
) -> Decision:
    """A SERVE/DEGRADE decision on ``pick``'s lane."""
    lane = pick.lane
    return Decision(
        action, reason, f"{lane.replica}: predicted {pick.total_ms:.0f} ms of "
        f"{remaining:.0f} ms", pick.estimate(remaining), region, lane.replica,
        lane.endpoint, lane.model, lane.version, lane.triton_model_name,
        lane.triton_model_version, degrade, ticket=ticket,
    )  # fmt: skip


def overflow_decision(
    fleet: FleetView,
    origin: str,
    neighbours: dict[str, NeighbourState],
    cfg: PolicyConfig,
    req: Request,
    target: Target,
    tokens: int,
    remaining: float,
    now: float,
) -> tuple[Decision, NeighbourState] | None:
    """The OVERFLOW decision to the nearest neighbour that fits, or None (spends nothing)."""
    # An alias request not pinned by its session may take any version the alias maps
    # to in the neighbour region; a pinned one needs exactly its version.
    alias = target.requested if target.alias and not target.pinned else ""
    found = pick_neighbour(
        fleet, origin, neighbours, cfg, req, (target.model, target.version), alias, tokens,
        remaining, now,
    )  # fmt: skip
    if found is None:
        return None
    region, state, model, version, est = found
    info = fleet.versions[(model, version)]
    decision = Decision(
        Action.OVERFLOW, Reason.OVERFLOW_FIT,
        f"{region.id}: predicted {est.total_ms:.0f} ms incl. {est.network_ms:.0f} ms RTT",
        est, region.id, "", region.gateway_endpoint, model, version,
        info.triton_model_name, info.triton_model_version,
    )  # fmt: skip
    return decision, state


def fallback_target(
    fleet: FleetView, region: str, target: Target, draw: Callable[[], float]
) -> Target | None:
    """The target's fallback model resolved in ``region``, or None (no or unknown fallback).

    ``draw`` gives the uniform for an alias fallback; it is called only when a fallback
    model exists, so the RNG advances exactly as often as before the split.
    """
    fallback = target.model_info.fallback_model
    if not fallback or fallback not in fleet.models:
        return None
    try:
        model, version = fleet.resolve(fallback, region, draw())
    except PolicyError:
        return None
    if not model:
        return None
    info, model_info = fleet.versions[(model, version)], fleet.models[model]
    return Target(fallback, model, version, info, model_info, False, False, "")


def capped_pick(
    local: Scan, cfg: PolicyConfig, req: Request, max_tokens: int, ratio: float, remaining: float
) -> tuple[int, Pick] | None:
    """DEGRADE by max_tokens: (capped max_tokens, pick) when a shorter answer fits, else None.

    ``local`` is the scan of the request's own target made with ``degrade=True``. The cap
    applies to the request's ``max_tokens`` (what the replica enforces): the largest cap
    whose planned length, ``ceil(cap x ratio)``, finishes within the budget.
    """
    priority = slot_class(req.priority, req.hops)
    fit, pick = max_tokens_that_fit(local.free, priority, req.prompt_tokens, remaining)
    if pick is None:
        return None
    capped = capped_max_tokens(fit, ratio)
    if capped < max(cfg.min_degrade_tokens, 1) or capped >= max_tokens:
        return None
    return capped, pick


def queue_decision(region: str, pick: Pick, wait_ms: float, remaining: float) -> Decision:
    """A QUEUE decision: wait ~``wait_ms`` for a slot on ``pick``'s lane."""
    lane = pick.lane
    return Decision(
        Action.QUEUE, Reason.QUEUED, f"wait ~{wait_ms:.0f} ms for a slot",
        pick.estimate(remaining), region, lane.replica, lane.endpoint, lane.model,
        lane.version, lane.triton_model_name, lane.triton_model_version, queue_ms=wait_ms,
    )  # fmt: skip


def shed_reason(
    local: Scan, queue_full: bool, priority: Priority, remaining: float
) -> tuple[Reason, str]:
    """Why nothing fit (SHED reason and detail), in the order DESIGN.md lists them."""
    if remaining <= 0:
        return Reason.BUDGET_EXCEEDED, "budget already spent on arrival"
    if local.pick is None:
        return Reason.NO_REPLICAS, "no ready replica with fresh signals"
    if not local.unloaded_fits:
        return Reason.BUDGET_EXCEEDED, "cannot fit the budget even unloaded"
    if queue_full:
        return Reason.QUEUE_FULL, f"admission queue full for {priority.name}"
    return Reason.NO_HEADROOM, "no capacity within the budget"


def retry_after_ms(cfg: PolicyConfig, local: Scan, ahead: int) -> int:
    """Time for the backlog ahead of a request (``ahead`` in the admission queue plus the
    replica queues) to drain at the candidates' completion rate, clamped."""
    if local.drain_rate <= 0:
        ms = float(cfg.retry_after_no_capacity_ms)
    else:
        ms = (ahead + local.backlog + 1) / local.drain_rate
    return int(min(cfg.retry_after_max_ms, max(cfg.retry_after_min_ms, math.ceil(ms))))


def shed_decision(
    region: str,
    target: Target,
    reason: Reason,
    detail: str,
    remaining: float,
    local: Scan,
    retry_after: int,
) -> Decision:
    """A SHED decision (the estimate is the best local pick's, if any)."""
    pick = local.pick
    est = pick.estimate(remaining) if pick is not None else Estimate(budget_ms=remaining)
    return Decision(
        Action.SHED, reason, detail, est, region, model=target.model,
        version=target.version, triton_model_name=target.info.triton_model_name,
        triton_model_version=target.info.triton_model_version, retry_after_ms=retry_after,
    )  # fmt: skip
