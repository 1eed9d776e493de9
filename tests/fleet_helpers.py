"""A one-region fleet as real processes (registry, replica simulators, admission, gateway),
with the registry entities to describe it; for the gateway's end-to-end tests."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spillgate._proto import common_pb2, registry_pb2, registry_pb2_grpc
from spillgate.registry.store import Key, entity_key
from tests.conftest import ReplicaProcess, ServiceProcess, eventually, start_replica, start_service
from tests.test_registry_service import Registry, start_registry

DIGEST = "sha256:" + "ab" * 32
_ADMISSION_READY = re.compile(r"spillgate admission ready grpc=(\S+) region=(\S+)")
_GATEWAY_READY = re.compile(r"spillgate gateway ready grpc=(\S+) http=(\S+) region=(\S+)")


def start_admission(region: str, registry: str, *extra: str) -> ServiceProcess:
    args = ["spillgate.admission.app", "--region", region, "--registry", registry, "--port", "0"]
    args += extra
    return start_service(args, _ADMISSION_READY)


def start_gateway(region: str, registry: str, admission: str, *extra: str) -> ServiceProcess:
    """`spillgate.gateway.app` on a free gRPC port, without the HTTP API."""
    args = [
        "spillgate.gateway.app",
        "--region",
        region,
        "--registry",
        registry,
        "--admission",
        admission,
        "--port",
        "0",
        "--http-port",
        "-1",
        *extra,
    ]
    return start_service(args, _GATEWAY_READY)


def wait_serving(address: str) -> None:
    """Poll the standard gRPC health service until it says SERVING."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        eventually(
            lambda: (
                health.Check(health_pb2.HealthCheckRequest()).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        )


# -- registry entities -----------------------------------------------------------------------


def region(
    id: str,
    admission: str,
    gateway: str = "",
    zone: str = "",
    rtt: dict[str, float] | None = None,
) -> registry_pb2.Entity:
    return registry_pb2.Entity(
        region=registry_pb2.Region(
            id=id,
            residency_zone=zone or id,
            admission_endpoint=admission,
            gateway_endpoint=gateway,
            rtt_ms=rtt or {},
        )
    )


def model(
    id: str, kind: int = common_pb2.MODEL_KIND_LLM, versions: Sequence[str] = ("v1",)
) -> list[registry_pb2.Entity]:
    """A model and its versions (Triton name = model id)."""
    out = [
        registry_pb2.Entity(
            model=registry_pb2.Model(
                id=id,
                kind=kind,  # type: ignore[arg-type]
                max_context_tokens=4096,
                max_output_tokens=512,
            )
        )
    ]
    for v in versions:
        out.append(
            registry_pb2.Entity(
                version=registry_pb2.Version(
                    model=id, version=v, artifact_digest=DIGEST, triton_model_name=id
                )
            )
        )
    return out


def alias(name: str, model: str, version: str) -> registry_pb2.Entity:
    targets = [registry_pb2.AliasTarget(model=model, version=version, weight=100)]
    return registry_pb2.Entity(
        alias=registry_pb2.Alias(
            name=name, default_targets=registry_pb2.AliasTargets(targets=targets)
        )
    )


def replica(
    id: str, region: str, rp: ReplicaProcess, loaded: Sequence[tuple[str, str]]
) -> registry_pb2.Entity:
    return registry_pb2.Entity(
        replica=registry_pb2.Replica(
            id=id,
            region=region,
            pool="default",
            endpoint=rp.grpc,
            metrics_endpoint=f"http://{rp.metrics}/metrics",
            backend=common_pb2.BACKEND_KIND_SIMULATOR,
            loaded=[common_pb2.VersionRef(model=m, version=v) for m, v in loaded],
            state=common_pb2.REPLICA_STATE_READY,
        )
    )


def state(entities: Sequence[registry_pb2.Entity]) -> dict[Key, registry_pb2.Entity]:
    """Registry state as services cache it (for an in-process ModelCatalog)."""
    return {entity_key(e): e for e in entities}


def apply(registry: str, entities: Sequence[registry_pb2.Entity]) -> None:
    with grpc.insecure_channel(registry) as channel:
        registry_pb2_grpc.RegistryServiceStub(channel).Apply(
            registry_pb2.ApplyRequest(mutations=[registry_pb2.Mutation(put=e) for e in entities])
        )


# -- a one-region fleet ----------------------------------------------------------------------


@dataclass
class Fleet:
    """Registry + replicas + admission + gateway of region `us`."""

    registry: Registry
    replicas: list[ReplicaProcess]
    admission: ServiceProcess
    gateway: ServiceProcess
    entities: list[registry_pb2.Entity] = field(default_factory=list)
    extra: list[ServiceProcess] = field(default_factory=list)

    @property
    def gateway_address(self) -> str:
        return self.gateway.ready[0]

    def stop(self) -> None:
        for proc in (*self.extra, self.gateway, self.admission, *self.replicas, self.registry):
            proc.stop()


# LLM `llm-small` (alias `chat`) and Triton's `simple` example model on every replica.
LOADED = (("llm-small", "v1"), ("simple", "1"))


def start_fleet(
    db: Path, replicas: int = 2, speed: str = "20", admission_args: Sequence[str] = ()
) -> Fleet:
    """Start a one-region fleet and wait until its admission and gateway are healthy."""
    registry = start_registry(db)
    started: list[ServiceProcess] = [registry]
    try:
        rps = [start_replica("--speed", speed) for _ in range(replicas)]
        started += rps
        admission = start_admission("us", registry.address, *admission_args)
        started.append(admission)
        gateway = start_gateway("us", registry.address, admission.ready[0])
        started.append(gateway)
        entities = [
            region("us", admission.ready[0], gateway.ready[0]),
            *model("llm-small"),
            *model("simple", common_pb2.MODEL_KIND_VISION, ("1",)),
            alias("chat", "llm-small", "v1"),
            *(replica(f"us-{i}", "us", rp, LOADED) for i, rp in enumerate(rps)),
        ]
        apply(registry.address, entities)
        wait_serving(admission.ready[0])
        wait_serving(gateway.ready[0])
    except BaseException:
        for proc in reversed(started):
            proc.stop()
        raise
    return Fleet(registry, rps, admission, gateway, entities)
