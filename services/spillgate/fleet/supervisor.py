"""The fleet supervisor behind `spillgate up`: start, watch and stop the fleet's processes.

Order: registry -> spec applied -> replicas (registered with leases) -> admissions (region
admission endpoints applied, health SERVING) -> dev API key -> gateways (gateway endpoints
applied, healthy) -> control plane (follows the registry and the admissions' WatchRegion) ->
an ingress and a mesh Envoy per region (listener ports picked before the gateways start, so
each gateway is told its mesh address; a phase waits until every Envoy has ACKed its config
and every ingress reaches its gateway). Each phase has a deadline; a child that exits during
start-up fails the start with the end of its log. Once healthy the endpoint table goes to stdout and
endpoints.json, and the supervisor watches: a child that exits is reported (which, how, the
last lines of its log) and never restarted; its replica's lease is no longer renewed, so the
registry drops it. SIGINT/SIGTERM stop everything: SIGTERM per process group, SIGKILL after a
grace period. Children run in their own sessions (a terminal's Ctrl-C reaches only the
supervisor, which stops them in order) and die with the supervisor (fleet.child; Envoy is
exec'ed by the same launcher, so it dies with the supervisor too).

Replica registration: the supervisor is the replicas' registration agent (as a sidecar is
for a real Triton server): RegisterReplica once a simulator is ready, Heartbeat every third
of the lease while its process lives.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spillgate._proto import common_pb2, registry_pb2, registry_pb2_grpc
from spillgate.controlplane.envoy import Bootstrap, EnvoyError, EnvoyProcess
from spillgate.controlplane.view import Role
from spillgate.fleet.child import PARENT_ENV
from spillgate.fleet.envoys import ConfigRejected, EnvoyNode, config_progress, plan_nodes
from spillgate.fleet.spec import FleetSpec, RegionPlan
from spillgate.fleet.state import StateDir
from spillgate.registry.cli import render_table

GRACE_S = 5.0
LOG_TAIL_LINES = 12
_POLL_S = 0.05

READY = {
    "registry": re.compile(r"spillgate registry ready grpc=(?P<grpc>\S+)"),
    "replica": re.compile(r"spillgate replica ready grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+)"),
    "admission": re.compile(r"spillgate admission ready grpc=(?P<grpc>\S+)"),
    "gateway": re.compile(r"spillgate gateway ready grpc=(?P<grpc>\S+) http=(?P<http>\S+)"),
    "controlplane": re.compile(
        r"spillgate controlplane ready grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+)"
    ),
}


def command_name() -> str:
    """How the user can run `spillgate`: the bare name when it is on PATH, else its path
    (`.venv/bin/spillgate` after `make up` in a fresh clone)."""
    found = shutil.which("spillgate")
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if found or script is None or script.name != "spillgate":
        return "spillgate"
    try:
        return str(script.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(script)


class StartError(Exception):
    """Start-up failed; the message says which step and why."""


class Stopped(Exception):
    """SIGINT/SIGTERM arrived during start-up."""


@dataclass
class Child:
    """One process of the fleet."""

    name: str  # "registry", "replica-us-0", "admission-us", "gateway-us", "envoy-ingress-us"
    kind: str
    region: str
    module_args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    ready: dict[str, str] = field(default_factory=dict)
    replica_id: str = ""
    stopping: bool = False  # exits from now on are expected
    reported: bool = False
    _offset: int = 0
    _partial: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def start(self, env: dict[str, str], cwd: Path) -> None:
        with self.log.open("ab") as log:
            self._offset = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spillgate.fleet.child", *self.module_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # own process group: signals go to it as a unit
            )

    def poll_ready(self) -> bool:
        """Scan new log output for the ready line; True once it was seen."""
        if self.ready:
            return True
        try:
            with self.log.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return False
        self._offset += len(chunk)
        text = self._partial + chunk.decode(errors="replace")
        *lines, self._partial = text.split("\n")
        for line in lines:
            m = READY[self.kind].search(line)
            if m:
                self.ready = m.groupdict()
                return True
        return False

    def exit_reason(self) -> str:
        code = self.proc.returncode if self.proc else None
        if code is None:
            return "running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exit status {code}"

    def tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        try:
            data = self.log.read_bytes()[-16384:].decode(errors="replace")
        except OSError:
            return []
        return [line for line in data.splitlines() if line.strip()][-lines:]

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


class Supervisor:
    """Runs one fleet until signalled. `run()` returns the exit status for `spillgate up`."""

    def __init__(
        self,
        spec: FleetSpec,
        state: StateDir,
        out: TextIO = sys.stdout,
        gateways: bool = True,
        cwd: Path | None = None,
        envoy: bool = True,
    ) -> None:
        self.spec = spec
        self.state = state
        self.out = out
        self.gateways = gateways
        # Envoy fronts the gateways: without gateways there is nothing for it to route to.
        self.envoy = envoy and gateways
        self.envoys: list[EnvoyNode] = []
        self.controlplane = ""
        self.controlplane_metrics = ""
        self.cwd = cwd or Path.cwd()
        self.children: list[Child] = []
        self.phase = "starting"
        self.registry = ""
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._stop_signal = 0
        self._heartbeats: threading.Thread | None = None
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    # -- output -------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        with contextlib.suppress(OSError):  # a closed terminal must not stop a shutdown
            print(f"[{time.monotonic() - self._t0:5.1f}s] {message}", file=self.out, flush=True)

    def _report_exit(self, child: Child) -> None:
        child.reported = True
        lines = [
            f"spillgate up: {child.name} (pid {child.pid}) exited unexpectedly: "
            f"{child.exit_reason()}; it is not restarted",
        ]
        tail = child.tail()
        if tail:
            lines.append(f"  last lines of {child.log}:")
            lines += [f"    {line}" for line in tail]
        print("\n".join(lines), file=self.out, flush=True)
        if child.kind == "replica":
            print(
                f"  replica {child.replica_id} leaves the registry when its lease "
                f"({self.spec.lease_ms} ms) runs out",
                file=self.out,
                flush=True,
            )

    # -- state files --------------------------------------------------------------------------

    def write_fleet(self) -> None:
        body = {
            "pid": os.getpid(),
            "phase": self.phase,
            "spec": self.spec.source,
            "registry": self.registry,
            "children": {
                c.name: {
                    "pid": c.pid,
                    "kind": c.kind,
                    "region": c.region,
                    "status": "running"
                    if c.proc and c.proc.returncode is None
                    else c.exit_reason(),
                    "log": str(c.log),
                }
                for c in self.children
            },
        }
        self.state.write_json(self.state.fleet_file, body)

    def endpoints(self) -> dict[str, object]:
        """The endpoint table as JSON-ready data (what endpoints.json holds)."""
        regions: dict[str, dict[str, object]] = {}
        for plan in self.spec.regions:
            region = self.spec.region_entity(plan.id).region
            entry: dict[str, object] = {
                "residency_zone": region.residency_zone,
                "rtt_ms": dict(sorted(region.rtt_ms.items())),
                # The region's public endpoints (Envoy); None when the fleet runs without.
                "ingress": None,
                # Its egress for overflow hops (what its gateway's --mesh names).
                "mesh": None,
                # The gateway itself, for callers that bypass Envoy.
                "gateway": None,
                "admission": None,  # the first instance
                "admissions": [],  # every instance
                "replicas": [],
            }
            for c in self.children:
                if c.region != plan.id:
                    continue
                alive = c.proc is not None and c.proc.returncode is None
                if c.kind == "gateway":
                    entry["gateway"] = {"grpc": c.ready.get("grpc"), "http": c.ready.get("http")}
                elif c.kind == "admission":
                    if entry["admission"] is None:
                        entry["admission"] = {"grpc": c.ready.get("grpc")}
                    instances = entry["admissions"]
                    assert isinstance(instances, list)
                    instances.append({"grpc": c.ready.get("grpc")})
                elif c.kind == "envoy" and c.ready:
                    role = "ingress" if c.ready.get("http") else "mesh"
                    entry[role] = dict(c.ready)
                elif c.kind == "replica":
                    replicas = entry["replicas"]
                    assert isinstance(replicas, list)
                    replicas.append(
                        {
                            "id": c.replica_id,
                            "grpc": c.ready.get("grpc"),
                            "metrics": f"http://{c.ready.get('metrics')}/metrics",
                            "pid": c.pid,
                            "alive": alive,
                        }
                    )
            regions[plan.id] = entry
        return {
            "supervisor_pid": os.getpid(),
            "state_dir": str(self.state.root.resolve()),
            "registry": {"grpc": self.registry},
            "controlplane": {
                "grpc": self.controlplane,
                "metrics": f"http://{self.controlplane_metrics}/metrics",
                "status": f"http://{self.controlplane_metrics}/status",
            }
            if self.controlplane
            else None,
            "regions": regions,
            "model": self.spec.model,
            "budgets_ms": dict(self.spec.budgets_ms),
            "dev_key_file": str(self.state.dev_key.resolve())
            if self.state.dev_key.exists()
            else None,
        }

    # -- processes ----------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}

    def _spawn(self, child: Child) -> Child:
        self.children.append(child)
        child.start(self._env(), self.cwd)
        return child

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise Stopped

    def _wait(
        self, what: str, children: Sequence[Child], on_ready: Callable[[Child], None]
    ) -> None:
        """Wait for every child's ready line, each reported as it comes (deadline per phase)."""
        deadline = time.monotonic() + self.spec.startup_timeout_s
        pending = list(children)
        while pending:
            self._check_stop()
            for child in list(pending):
                if child.poll_ready():
                    pending.remove(child)
                    on_ready(child)
                elif child.proc is not None and child.proc.poll() is not None:
                    child.reported = True
                    tail = "\n".join(f"    {line}" for line in child.tail())
                    raise StartError(
                        f"{child.name} exited during start-up ({child.exit_reason()}); "
                        f"last lines of {child.log}:\n{tail}"
                    )
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise StartError(
                    f"{what}: no ready line from {names} within {self.spec.startup_timeout_s:g}s "
                    f"(logs in {self.state.logs})"
                )
            if pending:
                time.sleep(_POLL_S)

    def _channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address)
        return self._channels[address]

    def _wait_serving(self, children: Sequence[Child]) -> None:
        """Poll grpc.health.v1 on each child until SERVING (deadline per phase)."""
        deadline = time.monotonic() + self.spec.startup_timeout_s
        for child in children:
            stub = health_pb2_grpc.HealthStub(self._channel(child.ready["grpc"]))
            status = "no answer"
            while True:
                self._check_stop()
                if child.proc is not None and child.proc.poll() is not None:
                    raise StartError(f"{child.name} exited ({child.exit_reason()})")
                try:
                    got = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(got)
                    if got == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError as exc:
                    status = f"{exc.code().name}"
                if time.monotonic() > deadline:
                    raise StartError(
                        f"{child.name} is not healthy after {self.spec.startup_timeout_s:g}s "
                        f"(grpc.health.v1: {status}; log {child.log})"
                    )
                time.sleep(_POLL_S)

    def _registry_stub(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self._channel(self.registry))

    def _apply(self, entities: Iterable[registry_pb2.Entity]) -> int:
        request = registry_pb2.ApplyRequest(
            mutations=[registry_pb2.Mutation(put=e) for e in entities]
        )
        try:
            revision: int = self._registry_stub().Apply(request, timeout=10).revision
        except grpc.RpcError as exc:
            raise StartError(
                f"the registry refused the spec: {exc.code().name}: {exc.details()}"
            ) from None
        return revision

    def _replica_entity(self, child: Child) -> registry_pb2.Replica:
        plan = next(r for r in self.spec.regions if r.id == child.region)
        return registry_pb2.Replica(
            id=child.replica_id,
            region=child.region,
            pool="default",
            endpoint=child.ready["grpc"],
            metrics_endpoint=f"http://{child.ready['metrics']}/metrics",
            backend=common_pb2.BACKEND_KIND_SIMULATOR,
            loaded=[common_pb2.VersionRef(model=m, version=v) for m, v in plan.versions],
            state=common_pb2.REPLICA_STATE_READY,
        )

    def _register(self, child: Child) -> None:
        request = registry_pb2.RegisterReplicaRequest(
            replica=self._replica_entity(child), lease_ms=self.spec.lease_ms
        )
        self._registry_stub().RegisterReplica(request, timeout=5)

    def _heartbeat_forever(self) -> None:
        """Renew the leases of live replicas every third of the lease (own thread)."""
        interval = self.spec.lease_ms / 3000
        stub = self._registry_stub()
        while not self._stop.wait(interval):
            for child in [c for c in self.children if c.kind == "replica" and c.ready]:
                if child.stopping or child.proc is None or child.proc.poll() is not None:
                    continue  # a dead replica's lease runs out: the registry drops it
                request = registry_pb2.HeartbeatRequest(
                    replica=child.replica_id, lease_ms=self.spec.lease_ms
                )
                try:
                    stub.Heartbeat(request, timeout=interval)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        # The lease lapsed (registry restarted or we were paused): re-register.
                        with contextlib.suppress(grpc.RpcError):
                            self._register(child)

    # -- phases -------------------------------------------------------------------------------

    def _start_registry(self) -> None:
        child = self._spawn(
            Child(
                "registry",
                "registry",
                "",
                [
                    "spillgate.registry.app",
                    "--db",
                    str(self.state.registry_db),
                    "--port",
                    "0",
                    "--lease-check-ms",
                    "100",
                ],
                self.state.log("registry"),
            )
        )
        self._wait("registry", [child], lambda c: None)
        self.registry = child.ready["grpc"]
        self._wait_serving([child])
        self.say(f"registry      ready  grpc={self.registry}")
        regions = [self.spec.region_entity(r.id) for r in self.spec.regions]
        others = [e for e in self.spec.entities if e.WhichOneof("entity") != "region"]
        revision = self._apply([*regions, *others])
        counts: dict[str, int] = {}
        for e in self.spec.entities:
            kind = e.WhichOneof("entity") or "?"
            counts[kind] = counts.get(kind, 0) + 1
        what = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in counts.items())
        self.say(f"spec applied   {what} (revision {revision})")

    def _start_replicas(self) -> None:
        children: list[Child] = []
        for plan in self.spec.regions:
            if not plan.replicas:
                continue
            config = self.state.replica_config(plan.id)
            config.write_text(self.spec.replica_config_text(plan.id))
            for i in range(plan.replicas):
                rid = f"{plan.id}-{i}"
                child = Child(
                    f"replica-{rid}",
                    "replica",
                    plan.id,
                    [
                        "spillgate.cli",
                        "replica",
                        "--grpc-port",
                        "0",
                        "--metrics-port",
                        "0",
                        "--config",
                        str(config),
                    ],
                    self.state.log(f"replica-{rid}"),
                    replica_id=rid,
                )
                children.append(self._spawn(child))
        total = len(children)
        done: list[Child] = []
        self.say(f"replicas      starting {total} simulator(s) (speed {self.spec.speed:g})")

        def ready(child: Child) -> None:
            self._register(child)
            done.append(child)
            self.say(
                f"replica {child.replica_id:<6} ready  grpc={child.ready['grpc']} "
                f"metrics={child.ready['metrics']}  registered ({len(done)}/{total})"
            )

        self._wait("replicas", children, ready)
        self._heartbeats = threading.Thread(
            target=self._heartbeat_forever, name="heartbeats", daemon=True
        )
        self._heartbeats.start()

    def _start_admissions(self) -> None:
        several = [p.id for p in self.spec.regions if p.admissions > 1]
        if several and not self.envoy:
            raise StartError(
                f"region(s) {', '.join(several)} run several admission instances, which need "
                "Envoy (the mesh ring-hashes sessions onto them): drop --no-envoy"
            )
        children = [
            self._spawn(
                Child(
                    name,
                    "admission",
                    plan.id,
                    [
                        "spillgate.admission.app",
                        "--region",
                        plan.id,
                        "--registry",
                        self.registry,
                        "--port",
                        "0",
                    ],
                    self.state.log(name),
                )
            )
            for plan in self.spec.regions
            for name in admission_names(plan)
        ]
        self._wait(
            "admissions",
            children,
            lambda c: self.say(
                f"admission {c.name.removeprefix('admission-'):<4} ready  grpc={c.ready['grpc']}"
            ),
        )
        self._apply_region_endpoints()
        self._wait_serving(children)
        self.say("admissions    serving (registry snapshot received)")

    def _apply_region_endpoints(self) -> None:
        entities = []
        for plan in self.spec.regions:
            entity = self.spec.region_entity(plan.id)
            admissions = self._admissions(plan.id)
            entity.region.admission_endpoint = admissions[0]
            if len(admissions) > 1:
                entity.region.admission_endpoints.extend(admissions)
            for c in self.children:
                if c.region == plan.id and c.kind == "gateway":
                    entity.region.gateway_endpoint = c.ready["grpc"]
                    if c.ready["http"] != "-":
                        entity.region.gateway_http_endpoint = c.ready["http"]
            entities.append(entity)
        self._apply(entities)

    def _admissions(self, region: str) -> list[str]:
        """The gRPC endpoints of `region`'s admission instances, first one first."""
        return [
            c.ready["grpc"] for c in self.children if c.kind == "admission" and c.region == region
        ]

    def _create_dev_key(self) -> None:
        """A dev API key for `spillgate chat`: keys.db + dev-key (0600) in the state dir."""
        from spillgate.fleet.keys import KeyCreateError, create_dev_key

        try:
            key = create_dev_key(self.state.keys_db, self.spec.tenant, self.cwd)
        except KeyCreateError as exc:
            raise StartError(str(exc)) from None
        self.state.write_secret(self.state.dev_key, key + "\n")
        self.say(f"dev API key    tenant {self.spec.tenant!r} -> {self.state.dev_key} (0600)")

    def _start_gateways(self) -> None:
        children = []
        for plan in self.spec.regions:
            mesh = next(
                (n for n in self.envoys if n.region == plan.id and n.role is Role.MESH), None
            )
            # Several admission instances: through the mesh, which hashes x-session-id.
            admission = mesh.grpc if mesh and plan.admissions > 1 else self._admissions(plan.id)[0]
            args = [
                "spillgate.gateway.app",
                "--region",
                plan.id,
                "--registry",
                self.registry,
                "--admission",
                admission,
                "--port",
                "0",
                "--http-port",
                "0",
                "--keys",
                str(self.state.keys_db),
            ]
            if mesh is not None:
                # Overflow hops go through the region's mesh Envoy, which also adds the RTT.
                args += ["--mesh", mesh.grpc]
            elif self.spec.emulate_rtt:
                args.append("--emulate-rtt")
            children.append(
                self._spawn(
                    Child(
                        f"gateway-{plan.id}",
                        "gateway",
                        plan.id,
                        args,
                        self.state.log(f"gateway-{plan.id}"),
                    )
                )
            )
        self._wait(
            "gateways",
            children,
            lambda c: self.say(
                f"gateway {c.region:<6} ready  grpc={c.ready['grpc']} http={c.ready['http']}"
            ),
        )
        self._apply_region_endpoints()
        self._wait_serving(children)
        self.say("gateways      serving")

    def _start_controlplane(self) -> None:
        mode = "local" if self.spec.emulate_rtt else "prod"
        child = self._spawn(
            Child(
                "controlplane",
                "controlplane",
                "",
                [
                    "spillgate.controlplane.app",
                    "serve",
                    "--registry",
                    self.registry,
                    "--port",
                    "0",
                    "--mode",
                    mode,
                    "--metrics-port",
                    "0",
                ],
                self.state.log("controlplane"),
            )
        )
        self._wait("control plane", [child], lambda c: None)
        self.controlplane = child.ready["grpc"]
        self.controlplane_metrics = child.ready["metrics"]
        delay = " (inter-region routes delayed by the RTT)" if mode == "local" else ""
        self.say(
            f"controlplane  ready  grpc={self.controlplane} "
            f"metrics={self.controlplane_metrics} mode={mode}{delay}"
        )

    def _start_envoys(self) -> None:
        """Start every planned Envoy; wait until each has ACKed its config and every ingress
        reaches its region's gateway (grpc.health.v1 through the ingress)."""
        workdir = self.state.root / "envoy"
        children: list[tuple[EnvoyNode, Child]] = []
        for node in self.envoys:
            config = Bootstrap(
                node.region, node.role, self.controlplane, node.grpc_port, node.http_port
            )
            # One worker thread each: six Envoys share the host with the whole fleet.
            node.process = EnvoyProcess(config, workdir, concurrency=1)
            try:
                command = node.process.command()
            except EnvoyError as exc:
                raise StartError(f"{exc} (or run `spillgate up --no-envoy`)") from None
            child = Child(
                node.name, "envoy", node.region, ["--exec", *command], self.state.log(node.name)
            )
            children.append((node, self._spawn(child)))
        self.say(f"envoy         starting {len(children)} (an ingress and a mesh per region)")
        regions = [plan.id for plan in self.spec.regions]
        deadline = time.monotonic() + self.spec.startup_timeout_s
        pending = list(children)
        waiting: dict[str, str] = {}
        while pending:
            self._check_stop()
            for node, child in list(pending):
                if child.proc is not None and child.proc.poll() is not None:
                    child.reported = True
                    tail = "\n".join(f"    {line}" for line in child.tail())
                    raise StartError(
                        f"{child.name} exited during start-up ({child.exit_reason()}); "
                        f"last lines of {child.log}:\n{tail}"
                    )
                try:
                    done, waiting[node.id] = config_progress(node, regions)
                except ConfigRejected as exc:
                    tail = "\n".join(f"    {line}" for line in child.tail())
                    raise StartError(f"{exc}; last lines of {child.log}:\n{tail}") from None
                if done:
                    pending.remove((node, child))
                    assert node.process is not None
                    child.ready = {"grpc": node.grpc, "admin": node.process.admin}
                    if node.http:
                        child.ready["http"] = node.http
                    ports = f"grpc={node.grpc}" + (f" http={node.http}" if node.http else "")
                    self.say(f"envoy {node.id:<12} ACKed  {ports} admin={node.process.admin}")
            if pending and time.monotonic() > deadline:
                detail = "; ".join(f"{n.id}: {waiting.get(n.id, '?')}" for n, _ in pending)
                raise StartError(
                    f"envoy: no accepted config within {self.spec.startup_timeout_s:g}s "
                    f"({detail}; logs in {self.state.logs})"
                )
            if pending:
                time.sleep(_POLL_S)
        ingresses = [c for n, c in children if n.role is Role.INGRESS]
        self._wait_serving(ingresses)
        self.say("ingress       serving (each reaches its region's gateway)")

    # -- lifecycle ----------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop_signal = signum
        self._stop.set()

    def run(self) -> int:
        """Start, print the endpoints, watch until signalled, stop; 0 after a clean run."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.state.clear_run_files()
        self.write_fleet()
        self.say(f"fleet          {self.spec.source}; state and logs in {self.state.root}/")
        code = 0
        try:
            self._start_registry()
            self._start_replicas()
            self._start_admissions()
            if self.gateways:
                self._create_dev_key()
                if self.envoy:
                    self.envoys = plan_nodes([plan.id for plan in self.spec.regions])
                self._start_gateways()
            else:
                self.say("gateways      skipped (--no-gateway)")
            if self.envoy:
                self._start_controlplane()
                self._start_envoys()
            else:
                why = "--no-envoy or [fleet] envoy = false" if self.gateways else "no gateways"
                self.say(f"envoy         skipped ({why})")
            self.phase = "healthy"
            body = self.endpoints()
            self.state.write_json(self.state.endpoints_file, body)
            self.write_fleet()
            self.say(f"fleet healthy in {time.monotonic() - self._t0:.1f}s")
            print(endpoints_table(body), file=self.out, flush=True)
            cmd = command_name()
            print(
                f'\nTry: {cmd} status | {cmd} chat "Hello" --region apac | '
                f"{cmd} endpoints --json. Ctrl-C (or `{cmd} down`) stops the fleet.",
                file=self.out,
                flush=True,
            )
            self._watch()
        except Stopped:
            code = 128 + self._stop_signal
        except StartError as exc:
            print(f"spillgate up: start failed: {exc}", file=self.out, flush=True)
            self.phase = "failed"
            code = 1
        finally:
            self._shutdown()
        return code

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            changed = False
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None and not child.reported:
                    self._report_exit(child)
                    changed = True
            if changed:
                self.state.write_json(self.state.endpoints_file, self.endpoints())
                self.write_fleet()

    def _shutdown(self) -> None:
        failed = self.phase == "failed"
        self.phase = "stopping"
        self._stop.set()
        with contextlib.suppress(OSError):
            self.state.endpoints_file.unlink()
        with contextlib.suppress(OSError):
            self.write_fleet()
        if self.children:
            self.say(
                "stopping       "
                + ", ".join(c.name for c in self.children if c.proc and c.proc.poll() is None)
                or "-"
            )
        # Front to back: Envoy first (no new requests), its control plane with the gateways.
        tiers = (
            ("envoy",),
            ("controlplane", "gateway", "admission"),
            ("replica",),
            ("registry",),
        )
        for kinds in tiers:
            tier = [c for c in self.children if c.kind in kinds]
            stop_children(tier)
        if self._heartbeats is not None:
            self._heartbeats.join(timeout=5)
        for channel in self._channels.values():
            channel.close()
        self.phase = "failed" if failed else "stopped"
        with contextlib.suppress(OSError):
            self.write_fleet()
        self.say(f"fleet {self.phase}: no process left")


def stop_children(children: Sequence[Child], grace_s: float = GRACE_S) -> None:
    """SIGTERM each child's process group, wait up to `grace_s`, then SIGKILL; reap all."""
    for child in children:
        child.stopping = True
        if child.proc is not None and child.proc.poll() is None:
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.signal_group(signal.SIGKILL)
            child.proc.wait()
        # Anything the child itself started lives in its group: make sure it is gone too.
        child.signal_group(signal.SIGKILL)


def endpoints_table(body: dict[str, object]) -> str:
    """The endpoint table `up` prints: one row per process, grouped by region."""
    rows: list[list[str]] = []
    registry = body.get("registry")
    if isinstance(registry, dict):
        rows.append(["-", "registry", str(registry.get("grpc") or "-"), "-", "-"])
    controlplane = body.get("controlplane")
    if isinstance(controlplane, dict):
        rows.append(
            [
                "-",
                "controlplane",
                str(controlplane.get("grpc") or "-"),
                "-",
                str(controlplane.get("metrics") or "-"),
            ]
        )
    regions = body.get("regions")
    if isinstance(regions, dict):
        for rid, entry in regions.items():
            gateway = entry.get("gateway") or {}
            admission = entry.get("admission") or {}
            ingress = entry.get("ingress")
            mesh = entry.get("mesh")
            for role, envoy in (("ingress (public)", ingress), ("mesh", mesh)):
                if envoy:
                    stats = f"http://{envoy['admin']}/stats/prometheus"
                    rows.append([rid, role, envoy["grpc"], envoy.get("http") or "-", stats])
            rows.append(
                [
                    rid,
                    "gateway (direct)" if ingress else "gateway",
                    gateway.get("grpc") or "-",
                    gateway.get("http") or "-",
                    "-",
                ]
            )
            instances = entry.get("admissions") or [admission]
            for i, instance in enumerate(instances):
                name = "admission" if len(instances) == 1 else f"admission {i}"
                rows.append([rid, name, instance.get("grpc") or "-", "-", "-"])
            for r in entry.get("replicas", []):
                name = f"replica {r['id']}" + ("" if r.get("alive", True) else " (exited)")
                rows.append([rid, name, r["grpc"] or "-", "-", r["metrics"] or "-"])
    return render_table(("REGION", "COMPONENT", "GRPC", "HTTP", "METRICS"), rows)


def admission_names(plan: RegionPlan) -> list[str]:
    """Child names of a region's admission instances: admission-us, admission-us-1, ..."""
    return [f"admission-{plan.id}" + (f"-{i}" if i else "") for i in range(plan.admissions)]
