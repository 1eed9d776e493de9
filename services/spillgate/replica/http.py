"""The replica's HTTP port (Triton's 8002): Prometheus `/metrics` and the fault admin API.

GET  /metrics   Triton-core and vLLM-style metrics (Prometheus text format)
GET  /faults    current fault settings (JSON)
GET  /executions  executions per request id, and ids executed more than once (JSON)
POST /faults    JSON partial update, e.g. {"error_rate": 0.2} or {"stall": true};
                {"crash": true} makes the process exit at once (exit code 70)
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import asdict

from prometheus_client import CollectorRegistry

from spillgate.minihttp import MiniHTTP
from spillgate.replica.executions import Executions
from spillgate.replica.faults import Faults
from spillgate.replica.metrics import render

CRASH_EXIT_CODE = 70


class AdminHTTP(MiniHTTP):
    """The replica's metrics and fault admin port."""

    def __init__(
        self,
        registry: CollectorRegistry,
        faults: Faults,
        on_slow: Callable[[float], None],
        exit_fn: Callable[[int], None] = os._exit,
        executions: Executions | None = None,
    ) -> None:
        self._registry = registry
        self._faults = faults
        self._on_slow = on_slow
        self._exit = exit_fn
        self._executions = executions or Executions()

    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if path == "/metrics":
            if method != "GET":
                return 405, "text/plain", b"use GET\n"
            return 200, "text/plain; version=0.0.4", render(self._registry)
        if path == "/faults":
            if method == "GET":
                return 200, "application/json", json.dumps(asdict(self._faults.settings)).encode()
            if method != "POST":
                return 405, "text/plain", b"use GET or POST\n"
            try:
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("body must be a JSON object")
                if changes.get("crash"):
                    asyncio.get_running_loop().call_soon(self._exit, CRASH_EXIT_CODE)
                    return 200, "application/json", b'{"crash": true}'
                settings = self._faults.update(changes)
            except ValueError as exc:
                return 400, "application/json", json.dumps({"error": str(exc)}).encode()
            self._on_slow(settings.slow_factor)
            return 200, "application/json", json.dumps(asdict(settings)).encode()
        if path == "/executions":
            return 200, "application/json", json.dumps(self._executions.as_json()).encode()
        return 404, "text/plain", b"not found: try /metrics, /faults or /executions\n"
