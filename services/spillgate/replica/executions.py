"""How often each request id was executed: proof that nothing upstream ran a request twice.

Bounded (the most recent `capacity` ids), so a long-running replica does not grow. Served
as JSON on the admin port: `GET /executions`.
"""

from __future__ import annotations

from collections import OrderedDict


class Executions:
    """Counts backend executions per request id (empty ids are not tracked)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._counts: OrderedDict[str, int] = OrderedDict()

    def record(self, request_id: str) -> None:
        if not request_id:
            return
        self._counts[request_id] = self._counts.get(request_id, 0) + 1
        self._counts.move_to_end(request_id)
        while len(self._counts) > self._capacity:
            self._counts.popitem(last=False)

    def count(self, request_id: str) -> int:
        return self._counts.get(request_id, 0)

    def as_json(self) -> dict[str, object]:
        """{"executions": {id: n}, "duplicates": [ids executed more than once]}."""
        return {
            "executions": dict(self._counts),
            "duplicates": sorted(k for k, n in self._counts.items() if n > 1),
        }
