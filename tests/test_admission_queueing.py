"""AdmissionServicer's in-call queue over the real Policy (in process, injected clock):
a queued Admit ends in exactly one decision, and a caller that leaves never leaks a slot."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from spillgate._proto import admission_pb2, common_pb2
from spillgate.admission.service import AdmissionServicer, ServiceConfig
from spillgate.core.policy_config import PolicyConfig
from tests.test_policy_world import make_policy, scrape

LOCAL_8B = ("us-0", "us-1", "us-2", "us-3")
WALL = datetime(2026, 1, 1, tzinfo=UTC)


def _setup() -> tuple[AdmissionServicer, list[float]]:
    now = [0.0]
    policy = make_policy()
    scrape(policy, 0.0, dict.fromkeys(LOCAL_8B, 6))  # LOW may use 6 of 8 slots: it queues
    servicer = AdmissionServicer(
        policy,
        "us",
        PolicyConfig(),
        ServiceConfig(queue_tick_s=3600),  # only explicit steps below move the queue
        clock=lambda: now[0],
        wall=lambda: WALL,
    )
    return servicer, now


def _low() -> admission_pb2.AdmitRequest:
    ctx = common_pb2.RequestContext(
        request_id="q1",
        model="llama-8b@v1",
        priority=common_pb2.PRIORITY_LOW,
        prompt_tokens=256,
        max_tokens=32,
    )
    return admission_pb2.AdmitRequest(context=ctx)


def _pump_once(servicer: AdmissionServicer, now: float) -> None:
    for req, decision in servicer.policy.drain_queue(now):
        servicer._finish(req, decision, now)


async def test_a_queued_admit_is_served_once_a_slot_frees() -> None:
    servicer, now = _setup()
    call = asyncio.create_task(servicer._admit(_low()))
    await asyncio.sleep(0)
    assert servicer.policy.queue_len == 1 and not call.done()
    now[0] = 0.3
    scrape(servicer.policy, 0.3)  # slots free
    _pump_once(servicer, 0.3)
    decision = (await call).decision
    assert decision.action == common_pb2.ACTION_SERVE and decision.reason == "queue_served"
    assert decision.ticket.id and servicer.policy.in_flight == 1


async def test_a_caller_cancelled_as_its_slot_is_granted_gives_the_slot_back() -> None:
    servicer, now = _setup()
    call = asyncio.create_task(servicer._admit(_low()))
    await asyncio.sleep(0)
    now[0] = 0.3
    scrape(servicer.policy, 0.3)
    _pump_once(servicer, 0.3)  # the future now holds a SERVE with a ticket ...
    call.cancel()  # ... and the caller leaves in the same loop turn
    with contextlib.suppress(asyncio.CancelledError):
        await call
    assert servicer.policy.in_flight == 0  # released, not held until the lease expires


async def test_a_caller_gone_before_its_slot_is_granted_leaves_the_queue_at_once() -> None:
    servicer, now = _setup()
    call = asyncio.create_task(servicer._admit(_low()))
    await asyncio.sleep(0)
    assert servicer.policy.queue_len == 1
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    assert servicer.policy.queue_len == 0  # no place held until the TTL
    now[0] = 0.3
    scrape(servicer.policy, 0.3)
    _pump_once(servicer, 0.3)  # nothing left to grant
    assert servicer.policy.in_flight == 0 and servicer.policy.queue_len == 0
