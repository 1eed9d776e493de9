"""`forward.coalesce`: pieces that arrive while the consumer writes are merged, losslessly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from spillgate.gateway.forward import Piece, ReplicaError, coalesce


async def _source(n: int, fail_at: int | None = None) -> AsyncIterator[Piece]:
    for i in range(n):
        if i == fail_at:
            raise ReplicaError("boom", False, None)
        yield Piece(text=f" w{i}", output_tokens=1, final=i == n - 1, finish_reason="stop")
        await asyncio.sleep(0)


async def test_a_slow_consumer_gets_merged_pieces_with_nothing_lost() -> None:
    got = []
    async for piece in coalesce(_source(50)):
        got.append(piece)
        await asyncio.sleep(0.002)  # a write to the client
    assert len(got) < 50  # merged
    assert "".join(p.text for p in got) == "".join(f" w{i}" for i in range(50))
    assert sum(p.output_tokens for p in got) == 50
    assert [p.final for p in got] == [False] * (len(got) - 1) + [True]
    assert got[-1].finish_reason == "stop"


async def test_a_fast_consumer_gets_every_piece() -> None:
    got = [p async for p in coalesce(_source(5))]
    assert "".join(p.text for p in got) == " w0 w1 w2 w3 w4" and got[-1].final


async def test_an_error_comes_after_the_pieces_received_before_it() -> None:
    got: list[Piece] = []
    with pytest.raises(ReplicaError):
        async for piece in coalesce(_source(10, fail_at=4)):
            got.append(piece)
            await asyncio.sleep(0.002)
    assert "".join(p.text for p in got) == " w0 w1 w2 w3"


async def test_closing_early_stops_reading_the_source() -> None:
    reads = 0

    async def endless() -> AsyncIterator[Piece]:
        nonlocal reads
        while True:
            reads += 1
            yield Piece(text="x", output_tokens=1, final=False)
            await asyncio.sleep(0.001)

    stream = coalesce(endless())
    await stream.__anext__()
    await stream.aclose()
    seen = reads
    await asyncio.sleep(0.02)
    assert reads == seen  # the pump task is gone
