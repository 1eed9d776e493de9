"""FAKE Consul agent for tests: an in-process imitation of part of Consul's HTTP API.

This is NOT Consul. It serves only what spillgate's ConsulStore uses, following Consul's
documented semantics (api-docs/kv, api-docs/txn, api-docs/features/blocking), so the store
is exercised in CI on machines without a Consul binary. The real-agent contract run
(CONSUL_HTTP_ADDR) remains the authority.

Served:
- GET /v1/kv/<key>[?recurse][?keys[&separator=]][?raw][&index=N&wait=D]: entries with
  CreateIndex/ModifyIndex/LockIndex/Flags/Value (base64, null when empty), 404 when nothing
  matches, X-Consul-Index on every answer. The index of one key is its ModifyIndex (the KV
  table's index when absent); of a prefix, the highest ModifyIndex or delete (tombstone)
  index under it. A blocking query (index > 0) returns once that index passes the given
  one, or after `wait` (default 5m, at most 10m; no jitter here) with the same index.
- PUT /v1/kv/<key>[?cas=N][&flags=F]: true/false. cas=0 creates only; cas=N sets only while
  ModifyIndex == N. Values over 512 KiB: 413.
- DELETE /v1/kv/<key>[?recurse][?cas=N]: true/false. cas=0 never deletes; a cas delete of
  an absent key succeeds (as in Consul's state store).
- PUT /v1/txn: KV verbs set, cas, get, get-or-empty, get-tree, check-index,
  check-not-exists, delete, delete-tree, delete-cas. All or nothing: 200 with Results
  (Value null except for get verbs; nothing for deletes) or 409 with Errors
  [{OpIndex, What}] (every failing op, as Consul reports them). One index for all writes of
  a txn. More than `max_txn_ops` operations (64, Consul's limit before 1.x raised it to
  128) or a body over 512 KiB: 413.

- The local agent's services and TTL checks (api-docs/agent/service, api-docs/agent/check),
  as ConsulCatalog uses them: PUT /v1/agent/service/register (JSON keys case-insensitive,
  as Consul decodes them; Check or Checks, TTL checks only; a check's id defaults to
  "service:<id>" ("service:<id>:<n>" for several); its Status to critical, or to the
  status it had when re-registered), PUT /v1/agent/service/deregister/<id> (404 when
  unknown), PUT /v1/agent/check/{pass,warn,fail}/<id>[?note=] (Output = the note, resets
  the TTL; 404 when unknown), PUT /v1/agent/check/update/<id> ({Status, Output}),
  GET /v1/agent/services, GET /v1/agent/checks.
  A TTL check not updated within its TTL turns critical with Output "TTL expired"; a
  service whose check stayed critical for DeregisterCriticalServiceAfter is removed.
  Consul enforces at least one minute for that and reaps every 30 s; the fake takes
  `min_deregister_after_s` (default 60) and reaps on every agent/catalog/health request.
- The catalog and health views of those services (one node, "consul-fake", dc1):
  GET /v1/catalog/service/<name>, GET /v1/health/service/<name>[?passing] (passing: only
  instances whose checks all pass), GET /v1/health/checks/<name>.

Not served: sessions/locks, ACLs, other nodes and check types, datacenters, consistency
modes (always consistent here), tombstone reaping, blocking queries outside the KV.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_VALUE_BYTES = 512 * 1024
MAX_TXN_BYTES = 512 * 1024
DEFAULT_TXN_OPS = 64
DEFAULT_WAIT_S = 300.0
MAX_WAIT_S = 600.0
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int

    def as_json(self, with_value: bool = True) -> dict[str, Any]:
        value = base64.b64encode(self.value).decode() if with_value and self.value else None
        return {
            "LockIndex": 0,
            "Key": self.key,
            "Flags": self.flags,
            "Value": value,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


class _Rollback(Exception):
    pass


def parse_duration(text: str) -> float:
    """Seconds of a Go duration ("10s", "250ms", "1m30s"); a bare number is seconds."""
    if re.fullmatch(r"\d+", text):
        return float(text)
    parts = re.findall(r"([\d.]+)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


class _KV:
    """The KV table with Consul's indexes. All methods run with the fake's lock held."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.tombstones: dict[str, int] = {}
        self.raft_index = 1  # Consul's indexes start above zero
        self.table_index = 1

    def copy(self) -> _KV:
        other = _KV()
        other.entries = dict(self.entries)
        other.tombstones = dict(self.tombstones)
        other.raft_index, other.table_index = self.raft_index, self.table_index
        return other

    def key_index(self, key: str) -> int:
        entry = self.entries.get(key)
        return entry.modify_index if entry else self.table_index

    def prefix_index(self, prefix: str) -> int:
        indexes = [e.modify_index for k, e in self.entries.items() if k.startswith(prefix)]
        indexes += [i for k, i in self.tombstones.items() if k.startswith(prefix)]
        return max(indexes, default=0) or self.table_index

    def put(self, key: str, value: bytes, flags: int, index: int) -> Entry:
        old = self.entries.get(key)
        entry = Entry(key, value, flags, old.create_index if old else index, index)
        self.entries[key] = entry
        self.tombstones.pop(key, None)
        self.table_index = index
        return entry

    def delete(self, key: str, index: int) -> None:
        if self.entries.pop(key, None) is not None:
            self.tombstones[key] = index
            self.table_index = index

    def delete_tree(self, prefix: str, index: int) -> None:
        for key in [k for k in self.entries if k.startswith(prefix)]:
            self.delete(key, index)


@dataclass
class _Check:
    """One TTL check of the agent; `updated` and `critical_since` are monotonic seconds."""

    check_id: str
    name: str
    service_id: str
    ttl: float
    status: str
    notes: str
    output: str
    deregister_after: float | None
    updated: float
    critical_since: float | None

    def set_status(self, status: str, output: str, now: float) -> None:
        if status == "critical" and self.status != "critical":
            self.critical_since = now
        elif status != "critical":
            self.critical_since = None
        self.status, self.output, self.updated = status, output, now


_STATUSES = ("passing", "warning", "critical")


def _lower_keys(value: Any) -> dict[str, Any]:
    """A JSON object with lower-cased keys (Consul decodes field names case-insensitively)."""
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return {str(k).lower(): v for k, v in value.items()}


class FakeConsul:
    """A fake Consul HTTP API on 127.0.0.1:<free port>, served from a thread.

    Use as a context manager or call start()/stop(); `addr` is "127.0.0.1:PORT".
    `min_deregister_after_s` is the floor on DeregisterCriticalServiceAfter (Consul's: 60).
    """

    NODE = "consul-fake"

    def __init__(
        self, max_txn_ops: int = DEFAULT_TXN_OPS, min_deregister_after_s: float = 60.0
    ) -> None:
        self.max_txn_ops = max_txn_ops
        self.min_deregister_after_s = min_deregister_after_s
        self._services: dict[str, dict[str, Any]] = {}
        self._checks: dict[str, _Check] = {}
        self._kv = _KV()
        self._cond = threading.Condition()
        self._closing = False
        fake = self

        class Handler(_Handler):
            consul = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Track handler threads so stop() joins them all (no thread outlives the fake).
        self._server.daemon_threads = False
        self._server.block_on_close = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="consul-fake", daemon=True
        )

    @property
    def addr(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> FakeConsul:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()  # release blocking queries
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FakeConsul:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def keys(self) -> list[str]:
        """All keys currently stored (for test assertions)."""
        with self._cond:
            return sorted(self._kv.entries)

    # --- KV endpoint ------------------------------------------------------------------

    def kv_get(self, key: str, params: dict[str, str]) -> tuple[int, dict[str, str], bytes | Any]:
        recurse, keys_only, raw = "recurse" in params, "keys" in params, "raw" in params
        separator = params.get("separator", "")

        def answer() -> tuple[int, int, Any]:
            kv = self._kv
            if keys_only or recurse:
                index = kv.prefix_index(key)
                found = sorted(k for k in kv.entries if k.startswith(key))
                if not found:
                    return index, 404, None
                if keys_only:
                    names: list[str] = []
                    for k in found:
                        cut = k.find(separator, len(key)) if separator else -1
                        name = k[: cut + len(separator)] if cut >= 0 else k
                        if not names or names[-1] != name:
                            names.append(name)
                    return index, 200, names
                return index, 200, [kv.entries[k].as_json() for k in found]
            entry = kv.entries.get(key)
            if entry is None:
                return kv.key_index(key), 404, None
            return entry.modify_index, 200, entry.value if raw else [entry.as_json()]

        with self._cond:
            index, code, body = answer()
            wanted = int(params.get("index", "0") or 0)
            if wanted > 0:
                wait = min(parse_duration(params["wait"]), MAX_WAIT_S) if "wait" in params else 0
                deadline = time.monotonic() + (wait or DEFAULT_WAIT_S)
                while index <= wanted and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    index, code, body = answer()
        headers = {"X-Consul-Index": str(max(index, 1)), "X-Consul-KnownLeader": "true"}
        return code, headers, body

    def kv_put(self, key: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        if len(body) > MAX_VALUE_BYTES:
            return 413, f"Value exceeds {MAX_VALUE_BYTES} byte limit"
        flags = int(params.get("flags", "0") or 0)
        with self._cond:
            kv = self._kv
            kv.raft_index += 1
            current = kv.entries.get(key)
            if "cas" in params:
                cas = int(params["cas"])
                if (cas == 0 and current is not None) or (
                    cas != 0 and (current is None or current.modify_index != cas)
                ):
                    return 200, False
            kv.put(key, body, flags, kv.raft_index)
            self._cond.notify_all()
        return 200, True

    def kv_delete(self, key: str, params: dict[str, str]) -> tuple[int, Any]:
        with self._cond:
            kv = self._kv
            kv.raft_index += 1
            if "recurse" in params:
                kv.delete_tree(key, kv.raft_index)
            else:
                current = kv.entries.get(key)
                if "cas" in params:
                    cas = int(params["cas"])
                    if cas == 0:
                        return 200, False
                    if current is None:
                        return 200, True
                    if current.modify_index != cas:
                        return 200, False
                kv.delete(key, kv.raft_index)
            self._cond.notify_all()
        return 200, True

    # --- agent, catalog and health endpoints --------------------------------------------

    def _expire(self, now: float) -> None:
        """Run out TTLs and reap services critical for too long. Lock held."""
        for check in self._checks.values():
            deadline = check.updated + check.ttl
            if check.status != "critical" and now > deadline:
                check.set_status("critical", "TTL expired", deadline)
        for check in list(self._checks.values()):
            if check.critical_since is None or check.deregister_after is None:
                continue
            after = max(check.deregister_after, self.min_deregister_after_s)
            if now - check.critical_since >= after:
                self._remove_service(check.service_id)

    def _remove_service(self, service_id: str) -> bool:
        if self._services.pop(service_id, None) is None:
            return False
        for check_id in [c for c, k in self._checks.items() if k.service_id == service_id]:
            del self._checks[check_id]
        return True

    def agent_register(self, body: bytes) -> tuple[int, Any]:
        try:
            fields = _lower_keys(json.loads(body or b"null"))
        except ValueError as exc:
            return 400, f"Request decode failed: {exc}"
        name = str(fields.get("name") or "")
        if not name:
            return 400, "Missing service name"
        service_id = str(fields.get("id") or name)
        definitions = [fields["check"]] if fields.get("check") else []
        definitions += list(fields.get("checks") or [])
        with self._cond:
            return self._register(name, service_id, fields, definitions)

    def _register(
        self, name: str, service_id: str, fields: dict[str, Any], definitions: list[Any]
    ) -> tuple[int, Any]:
        """Add or replace one service and its checks. Lock held."""
        now = time.monotonic()
        self._expire(now)
        checks: list[_Check] = []
        for i, raw in enumerate(definitions):
            try:
                d = _lower_keys(raw)
                if not d.get("ttl"):
                    return 400, "this fake Consul supports only TTL checks"
                default_id = f"service:{service_id}" + (f":{i + 1}" if len(definitions) > 1 else "")
                check_id = str(d.get("checkid") or d.get("id") or default_id)
                old = self._checks.get(check_id)
                status = str(d.get("status") or (old.status if old else "critical"))
                if status not in _STATUSES:
                    return 400, f"Status {status!r} is not one of {_STATUSES}"
                deregister = d.get("deregistercriticalserviceafter")
                checks.append(
                    _Check(
                        check_id=check_id,
                        name=str(d.get("name") or f"Service '{name}' check"),
                        service_id=service_id,
                        ttl=parse_duration(str(d["ttl"])),
                        status=status,
                        notes=str(d.get("notes") or ""),
                        output=old.output if old else "",
                        deregister_after=parse_duration(str(deregister)) if deregister else None,
                        updated=now,
                        critical_since=now if status == "critical" else None,
                    )
                )
            except ValueError as exc:
                return 400, f"Invalid check: {exc}"
        self._kv.raft_index += 1
        old_service = self._services.get(service_id)
        self._services[service_id] = {
            "ID": service_id,
            "Service": name,
            "Tags": list(fields.get("tags") or []),
            "Meta": dict(fields.get("meta") or {}),
            "Address": str(fields.get("address") or ""),
            "Port": int(fields.get("port") or 0),
            "CreateIndex": old_service["CreateIndex"] if old_service else self._kv.raft_index,
            "ModifyIndex": self._kv.raft_index,
        }
        for check in checks:
            self._checks[check.check_id] = check
        return 200, None

    def agent_deregister(self, service_id: str) -> tuple[int, Any]:
        with self._cond:
            self._expire(time.monotonic())
            if not self._remove_service(service_id):
                return 404, f'Unknown service ID "{service_id}"'
        return 200, None

    def agent_check_update(self, check_id: str, status: str, output: str) -> tuple[int, Any]:
        if status not in _STATUSES:
            return 400, f"Invalid status {status!r}"
        with self._cond:
            now = time.monotonic()
            self._expire(now)
            check = self._checks.get(check_id)
            if check is None:
                return 404, f'Unknown check ID "{check_id}"'
            check.set_status(status, output, now)
        return 200, None

    def _check_json(self, check: _Check) -> dict[str, Any]:
        service = self._services[check.service_id]
        return {
            "Node": self.NODE,
            "CheckID": check.check_id,
            "Name": check.name,
            "Status": check.status,
            "Notes": check.notes,
            "Output": check.output,
            "ServiceID": check.service_id,
            "ServiceName": service["Service"],
            "ServiceTags": service["Tags"],
            "Type": "ttl",
        }

    def agent_view(self, what: str) -> tuple[int, Any]:
        """GET /v1/agent/services or /v1/agent/checks."""
        with self._cond:
            self._expire(time.monotonic())
            if what == "services":
                return 200, {i: dict(s, Datacenter="dc1") for i, s in self._services.items()}
            return 200, {c: self._check_json(k) for c, k in self._checks.items()}

    def service_view(
        self, view: str, name: str, params: dict[str, str]
    ) -> tuple[int, Any, dict[str, str]]:
        """GET /v1/catalog/service/<name>, /v1/health/service/<name>, /v1/health/checks/<name>."""
        with self._cond:
            self._expire(time.monotonic())
            # Blocking-capable endpoints always send X-Consul-Index (py-consul requires it).
            headers = {"X-Consul-Index": str(self._kv.raft_index), "X-Consul-KnownLeader": "true"}
            services = sorted(
                (s for s in self._services.values() if s["Service"] == name),
                key=lambda s: str(s["ID"]),
            )
            checks = {
                s["ID"]: [
                    self._check_json(k) for k in self._checks.values() if k.service_id == s["ID"]
                ]
                for s in services
            }
            if view == "checks":
                return 200, [c for s in services for c in checks[s["ID"]]], headers
            if view == "health":
                node = {"Node": self.NODE, "Address": "127.0.0.1", "Datacenter": "dc1"}
                entries = [
                    {"Node": node, "Service": s, "Checks": checks[s["ID"]]}
                    for s in services
                    if "passing" not in params
                    or all(c["Status"] == "passing" for c in checks[s["ID"]])
                ]
                return 200, entries, headers
            return (
                200,
                [
                    {
                        "ID": "00000000-0000-0000-0000-000000000001",
                        "Node": self.NODE,
                        "Address": "127.0.0.1",
                        "Datacenter": "dc1",
                        "ServiceID": s["ID"],
                        "ServiceName": s["Service"],
                        "ServiceTags": s["Tags"],
                        "ServiceAddress": s["Address"],
                        "ServicePort": s["Port"],
                        "ServiceMeta": s["Meta"],
                        "CreateIndex": s["CreateIndex"],
                        "ModifyIndex": s["ModifyIndex"],
                    }
                    for s in services
                ],
                headers,
            )

    # --- txn endpoint -----------------------------------------------------------------

    def txn(self, body: bytes) -> tuple[int, Any]:
        if len(body) > MAX_TXN_BYTES:
            return (
                413,
                f"Request body({len(body)} bytes) too large, max size: {MAX_TXN_BYTES} bytes",
            )
        try:
            ops = json.loads(body)
        except ValueError as exc:
            return 400, f"Failed to parse body: {exc}"
        if not isinstance(ops, list):
            return 400, "Failed to parse body: expected a JSON array of operations"
        if len(ops) > self.max_txn_ops:
            return (
                413,
                f"Transaction contains too many operations ({len(ops)} > {self.max_txn_ops})",
            )
        decoded: list[dict[str, Any]] = []
        for op in ops:
            if not isinstance(op, dict) or set(op) != {"KV"}:
                return 400, "this fake Consul supports only KV operations in a txn"
            kv_op = dict(op["KV"])
            try:
                kv_op["Value"] = base64.b64decode(kv_op.get("Value") or "", validate=True)
            except binascii.Error as exc:
                return 400, f"Failed to parse body: {exc}"
            if len(kv_op["Value"]) > MAX_VALUE_BYTES:
                return 413, (
                    f"Value for key {kv_op.get('Key')!r} is too large "
                    f"({len(kv_op['Value'])} > {MAX_VALUE_BYTES} bytes)"
                )
            decoded.append(kv_op)
        with self._cond:
            work = self._kv.copy()
            writes = any(not op.get("Verb", "").startswith(("get", "check")) for op in decoded)
            if writes:
                work.raft_index += 1
            results: list[dict[str, Any]] = []
            errors: list[dict[str, Any]] = []
            for i, op in enumerate(decoded):
                try:
                    results += _txn_op(work, op, work.raft_index)
                except _Rollback as exc:
                    errors.append({"OpIndex": i, "What": str(exc)})
            if errors:
                return 409, {"Results": None, "Errors": errors}
            if writes:
                self._kv = work
                self._cond.notify_all()
        return 200, {"Results": results, "Errors": None}


def _txn_op(kv: _KV, op: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """Run one KV txn op on `kv` (a working copy); its results, or raise _Rollback."""
    verb, key = op.get("Verb", ""), op.get("Key", "")
    value, flags, want = op["Value"], int(op.get("Flags") or 0), int(op.get("Index") or 0)
    entry = kv.entries.get(key)
    if verb == "set":
        return [{"KV": kv.put(key, value, flags, index).as_json(with_value=False)}]
    if verb == "cas":
        if (want == 0 and entry is not None) or (
            want != 0 and (entry is None or entry.modify_index != want)
        ):
            raise _Rollback(f'failed to set key "{key}", index is stale')
        return [{"KV": kv.put(key, value, flags, index).as_json(with_value=False)}]
    if verb in ("get", "get-or-empty"):
        if entry is None:
            if verb == "get-or-empty":
                return [{"KV": None}]
            raise _Rollback(f'key "{key}" doesn\'t exist')
        return [{"KV": entry.as_json()}]
    if verb == "get-tree":
        return [{"KV": kv.entries[k].as_json()} for k in sorted(kv.entries) if k.startswith(key)]
    if verb == "check-index":
        if entry is None:
            raise _Rollback(f'key "{key}" doesn\'t exist')
        if entry.modify_index != want:
            raise _Rollback(f"current modify index {entry.modify_index} != {want}")
        return [{"KV": entry.as_json(with_value=False)}]
    if verb == "check-not-exists":
        if entry is not None:
            raise _Rollback(f'key "{key}" exists')
        return []
    if verb == "delete":
        kv.delete(key, index)
        return []
    if verb == "delete-tree":
        kv.delete_tree(key, index)
        return []
    if verb == "delete-cas":
        if entry is not None and entry.modify_index != want:
            raise _Rollback(f'failed to delete key "{key}", index is stale')
        if entry is not None:
            kv.delete(key, index)
        return []
    raise _Rollback(f'unknown KV verb "{verb}"')


class _Handler(BaseHTTPRequestHandler):
    consul: FakeConsul
    # HTTP/1.0: one request per connection, so no handler thread idles on a kept-alive
    # socket and stop() can join them all.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def _route(self) -> tuple[str, dict[str, str]]:
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        return urllib.parse.unquote(url.path), params

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        if isinstance(body, bytes):
            data, kind = body, "application/octet-stream"
        elif isinstance(body, str) and code != 200:
            data, kind = body.encode(), "text/plain; charset=utf-8"
        else:
            data, kind = json.dumps(body).encode(), "application/json"
        if body is None:
            data = b""
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, handlers: dict[str, Callable[[str, dict[str, str]], None]]) -> None:
        path, params = self._route()
        for prefix, handler in handlers.items():
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                try:
                    handler(path[len(prefix) :], params)
                except ValueError as exc:
                    self._send(400, f"Bad request: {exc}")
                return
        self._send(404, f"fake Consul: no handler for {self.command} {path}")

    def do_GET(self) -> None:
        def kv(key: str, params: dict[str, str]) -> None:
            code, headers, body = self.consul.kv_get(key, params)
            self._send(code, body, headers)

        def agent(what: str) -> Callable[[str, dict[str, str]], None]:
            def handler(_: str, params: dict[str, str]) -> None:
                self._send(*self.consul.agent_view(what))

            return handler

        def view(kind: str) -> Callable[[str, dict[str, str]], None]:
            def handler(name: str, params: dict[str, str]) -> None:
                code, body, headers = self.consul.service_view(kind, name, params)
                self._send(code, body, headers)

            return handler

        self._dispatch(
            {
                "/v1/kv/": kv,
                "/v1/agent/services": agent("services"),
                "/v1/agent/checks": agent("checks"),
                "/v1/catalog/service/": view("catalog"),
                "/v1/health/service/": view("health"),
                "/v1/health/checks/": view("checks"),
            }
        )

    def do_PUT(self) -> None:
        def kv(key: str, params: dict[str, str]) -> None:
            self._send(*self.consul.kv_put(key, params, self._body()))

        def txn(_: str, params: dict[str, str]) -> None:
            self._send(*self.consul.txn(self._body()))

        def register(_: str, params: dict[str, str]) -> None:
            self._send(*self.consul.agent_register(self._body()))

        def deregister(service_id: str, params: dict[str, str]) -> None:
            self._send(*self.consul.agent_deregister(service_id))

        def ttl(status: str) -> Callable[[str, dict[str, str]], None]:
            def handler(check_id: str, params: dict[str, str]) -> None:
                self._body()
                self._send(
                    *self.consul.agent_check_update(check_id, status, params.get("note", ""))
                )

            return handler

        def update(check_id: str, params: dict[str, str]) -> None:
            fields = _lower_keys(json.loads(self._body() or b"{}"))
            status, output = str(fields.get("status") or ""), str(fields.get("output") or "")
            self._send(*self.consul.agent_check_update(check_id, status, output))

        self._dispatch(
            {
                "/v1/kv/": kv,
                "/v1/txn": txn,
                "/v1/agent/service/register": register,
                "/v1/agent/service/deregister/": deregister,
                "/v1/agent/check/pass/": ttl("passing"),
                "/v1/agent/check/warn/": ttl("warning"),
                "/v1/agent/check/fail/": ttl("critical"),
                "/v1/agent/check/update/": update,
            }
        )

    def do_DELETE(self) -> None:
        def kv(key: str, params: dict[str, str]) -> None:
            self._send(*self.consul.kv_delete(key, params))

        self._dispatch({"/v1/kv/": kv})
