"""ConsulCatalog: mirrors leased replicas into Consul's catalog through the local agent.

Each replica becomes one agent service (py-consul, /v1/agent/service/register):

    ID       the replica id              Name     "spillgate-replica" (configurable)
    Address  host of replica.endpoint    Port     port of replica.endpoint
    Tags     region=<r>, pool=<p>, backend=<b>, version=<model>@<version> per loaded version
    Meta     region, pool, backend, gpu_type, metrics_endpoint (the non-empty ones)
    Check    TTL check "service:<id>" with TTL = the lease length, Status passing while the
             replica is READY and warning otherwise, DeregisterCriticalServiceAfter set

Heartbeats pass (or warn) the check, which resets its TTL; when the registry removes the
replica (lease lapsed twice, or deleted) the service is deregistered. If the registry
itself dies, the checks go critical one lease after the last heartbeat and Consul reaps the
services after `deregister_after` (Consul enforces at least one minute and reaps every 30
seconds).

The registry's KV store is the truth; the catalog is a best-effort view. All agent calls
run in one worker thread, in order, coalesced per replica (only the latest state of a
replica is sent), so an agent that is slow or down never delays an RPC. Failures are
logged (once per outage at WARNING) and counted in `stats`; a replica whose registration
or check update failed is registered again on its next heartbeat, which also repairs an
agent that lost its services.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.parse
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import consul  # type: ignore[import-untyped]

from spillgate._proto import common_pb2, registry_pb2
from spillgate.registry.consul_store import DEFAULT_ADDR, parse_addr
from spillgate.registry.directory import ReplicaDirectory

log = logging.getLogger(__name__)

DEFAULT_SERVICE = "spillgate-replica"
DEFAULT_DEREGISTER_AFTER = timedelta(minutes=1)
PASSING, WARNING = "passing", "warning"


@dataclass
class CatalogStats:
    """Agent calls since start (for metrics and tests)."""

    registrations: int = 0
    check_updates: int = 0
    deregistrations: int = 0
    failures: int = 0


@dataclass(frozen=True)
class _Work:
    """What to send next for one replica: a registration (with `status` as the check's
    initial status), a check status, or a removal."""

    registration: dict[str, Any] | None = None
    status: str = ""
    note: str = ""
    deregister: bool = False


def check_id(replica: str) -> str:
    """The id of a replica's TTL check (Consul's default for a service's only check)."""
    return f"service:{replica}"


def _status(replica: registry_pb2.Replica) -> str:
    return PASSING if replica.state == common_pb2.REPLICA_STATE_READY else WARNING


def _note(replica: registry_pb2.Replica, lease: timedelta) -> str:
    state = common_pb2.ReplicaState.Name(replica.state).removeprefix("REPLICA_STATE_")
    return f"spillgate lease renewed: state {state}, lease {lease.total_seconds():g}s"


def _go_duration(length: timedelta) -> str:
    return f"{max(int(length / timedelta(milliseconds=1)), 1)}ms"


def _host_port(endpoint: str) -> tuple[str, int]:
    """(host, port) of "host:port" ("[v6]:port" too); the endpoint and 0 when it has no port."""
    try:
        parsed = urllib.parse.urlsplit("//" + endpoint)
        if parsed.hostname and parsed.port:
            return parsed.hostname, parsed.port
    except ValueError:
        pass
    return endpoint, 0


class ConsulCatalog(ReplicaDirectory):
    """Registers leased replicas as services of the Consul agent at `addr`.

    `addr` is as for ConsulStore (None: CONSUL_HTTP_ADDR, then 127.0.0.1:8500); `service`
    names the Consul service; `deregister_after` is each check's
    DeregisterCriticalServiceAfter; `timeout` bounds each agent call.
    """

    def __init__(
        self,
        addr: str | None = None,
        *,
        token: str | None = None,
        service: str = DEFAULT_SERVICE,
        deregister_after: timedelta = DEFAULT_DEREGISTER_AFTER,
        timeout: float = 2.0,
    ) -> None:
        self._addr = addr or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR
        host, port, scheme = parse_addr(self._addr)
        self._consul = consul.Consul(
            host=host, port=port, scheme=scheme, token=token, connections_timeout=timeout
        )
        self._service = service
        self._deregister_after = deregister_after
        self._stats = CatalogStats()
        self._cond = threading.Condition()
        self._pending: dict[str, _Work] = {}  # insertion order = order of arrival
        # Registration last queued per replica: a heartbeat with the same one only updates
        # the check. Dropped when a call for the replica fails, so the next one re-registers.
        self._sent: dict[str, dict[str, Any]] = {}
        self._closing = False
        self._healthy = True
        self._worker = threading.Thread(target=self._run, name="consul-catalog", daemon=True)
        self._worker.start()

    @property
    def service(self) -> str:
        """The Consul service name replicas are registered under."""
        return self._service

    @property
    def stats(self) -> CatalogStats:
        """A copy of the counters."""
        with self._cond:
            return replace(self._stats)

    # -- ReplicaDirectory ---------------------------------------------------------------------

    def registered(self, replica: registry_pb2.Replica, lease: timedelta) -> None:
        """Queue the replica's (re-)registration with a fresh TTL check."""
        body = self._registration(replica, lease)
        with self._cond:
            self._sent[replica.id] = body
            self._queue(replica.id, _Work(registration=body, status=_status(replica)))

    def renewed(self, replica: registry_pb2.Replica, lease: timedelta) -> None:
        """Queue a check update, or a registration when the replica's entry changed."""
        body = self._registration(replica, lease)
        status, note = _status(replica), _note(replica, lease)
        with self._cond:
            if self._sent.get(replica.id) != body:
                self._sent[replica.id] = body
                self._queue(replica.id, _Work(registration=body, status=status))
            else:
                self._queue(replica.id, _Work(status=status, note=note))

    def removed(self, replica: str) -> None:
        """Queue the replica's deregistration."""
        with self._cond:
            self._sent.pop(replica, None)
            self._queue(replica, _Work(deregister=True))

    def close(self) -> None:
        """Stop the worker (pending calls are dropped) and close the agent connection."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout=10)
        self._consul.http.session.close()

    # -- internals ----------------------------------------------------------------------------

    def _registration(self, replica: registry_pb2.Replica, lease: timedelta) -> dict[str, Any]:
        host, port = _host_port(replica.endpoint)
        backend = common_pb2.BackendKind.Name(replica.backend).removeprefix("BACKEND_KIND_")
        backend = backend.lower()
        meta = {
            "region": replica.region,
            "pool": replica.pool,
            "backend": backend,
            "gpu_type": replica.gpu_type,
            "metrics_endpoint": replica.metrics_endpoint,
        }
        tags = [f"region={replica.region}", f"pool={replica.pool}", f"backend={backend}"]
        tags += sorted({f"version={v.model}@{v.version}" for v in replica.loaded})
        body: dict[str, Any] = {
            "ID": replica.id,
            "Name": self._service,
            "Address": host,
            "Tags": tags,
            # Only fields the replica has: an empty value would still match `Meta.x == ""`.
            "Meta": {k: v for k, v in meta.items() if v},
            "Check": {
                "CheckID": check_id(replica.id),
                "Name": "spillgate registry lease",
                "TTL": _go_duration(lease),
                "Notes": "passed by the spillgate registry on every replica heartbeat",
                "DeregisterCriticalServiceAfter": _go_duration(self._deregister_after),
            },
        }
        if port:
            body["Port"] = port
        return body

    def _queue(self, replica: str, work: _Work) -> None:
        """Coalesce `work` with what is pending for the replica. Lock held."""
        old = self._pending.pop(replica, None)
        update_only = work.registration is None and not work.deregister
        if old is not None and old.registration is not None and update_only:
            # Not registered yet: register with the newer status instead of updating.
            work = _Work(registration=old.registration, status=work.status)
        self._pending[replica] = work
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                replica = next(iter(self._pending))
                work = self._pending.pop(replica)
            self._send(replica, work)

    def _send(self, replica: str, work: _Work) -> None:
        """Make one agent call; count it, and forget the replica's registration on failure."""
        agent = self._consul.agent
        try:
            if work.deregister:
                agent.service.deregister(replica)  # False (404): already gone, fine
                counter = "deregistrations"
            elif work.registration is not None:
                body = work.registration
                ok = agent.service.register(
                    body["Name"],
                    service_id=body["ID"],
                    address=body["Address"],
                    port=body.get("Port"),
                    tags=body["Tags"],
                    meta=body["Meta"],
                    check={**body["Check"], "Status": work.status},
                )
                if not ok:
                    raise consul.ConsulException("the agent refused the registration")
                counter = "registrations"
            else:
                update = agent.check.ttl_pass if work.status == PASSING else agent.check.ttl_warn
                if not update(check_id(replica), work.note):
                    # 404: the agent does not know the check (restarted, or reaped it).
                    raise consul.ConsulException(f"unknown check {check_id(replica)}")
                counter = "check_updates"
        except (consul.ConsulException, OSError) as exc:
            with self._cond:
                self._stats.failures += 1
                if not work.deregister:
                    self._sent.pop(replica, None)
                first, self._healthy = self._healthy, False
            level = logging.WARNING if first else logging.DEBUG
            log.log(level, "consul catalog at %s: %s failed: %s", self._addr, replica, exc)
            return
        with self._cond:
            setattr(self._stats, counter, getattr(self._stats, counter) + 1)
            recovered, self._healthy = not self._healthy, True
        if recovered:
            log.info("consul catalog at %s reachable again", self._addr)
