"""The Envoy nodes of a local fleet: which run, on which ports, and when each has its config.

Per region one ingress node (the region's public gRPC + HTTP endpoints) and one mesh node
(the egress its gateway sends overflow hops through). Listener ports cannot be 0 (they reach
Envoy through LDS), so they are picked here before anything starts and travel to the
control plane in the node metadata (envoy/bootstrap.yaml).

"Has its config" means Envoy accepted it: the listeners and clusters the control plane
builds for the node (controlplane/snapshot.py) are active in its /config_dump, so it has
ACKed them. A rejected update (NACK) is reported at once instead of waiting for a deadline.
"""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass

from spillgate.controlplane.envoy import EnvoyProcess, free_port
from spillgate.controlplane.snapshot import (
    INGRESS_GATEWAY,
    INGRESS_GATEWAY_HTTP,
    admission_cluster,
    gateway_cluster,
    replicas_cluster,
)
from spillgate.controlplane.view import Role, node_id

HOST = "127.0.0.1"


class ConfigRejected(Exception):
    """Envoy rejected an update from the control plane (NACK)."""


@dataclass
class EnvoyNode:
    """One Envoy of the fleet: where it listens, and its process once started."""

    region: str
    role: Role
    grpc_port: int
    http_port: int = 0
    process: EnvoyProcess | None = None

    @property
    def id(self) -> str:
        return node_id(self.role, self.region)

    @property
    def name(self) -> str:
        """The fleet child's name: `envoy-ingress-us`."""
        return f"envoy-{self.id}"

    @property
    def grpc(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"{HOST}:{self.http_port}" if self.http_port else ""

    def expected(self, regions: Sequence[str]) -> tuple[set[str], set[str]]:
        """(listener names, cluster names) the control plane gives this node when every
        region in `regions` has a gateway and this region has replicas and an admission."""
        if self.role is Role.INGRESS:
            listeners = {"ingress_grpc", "ingress_http"}
            clusters = {INGRESS_GATEWAY, INGRESS_GATEWAY_HTTP, admission_cluster(self.region)}
            return listeners, clusters
        clusters = {gateway_cluster(r) for r in regions if r != self.region}
        clusters |= {replicas_cluster(self.region), admission_cluster(self.region)}
        return {"mesh"}, clusters


def plan_nodes(regions: Sequence[str]) -> list[EnvoyNode]:
    """An ingress and a mesh node per region, on ports free right now."""
    nodes: list[EnvoyNode] = []
    for region in regions:
        nodes.append(EnvoyNode(region, Role.INGRESS, free_port(HOST), free_port(HOST)))
        nodes.append(EnvoyNode(region, Role.MESH, free_port(HOST)))
    return nodes


def active_config(envoy: EnvoyProcess) -> tuple[set[str], set[str]]:
    """(active listener names, active cluster names) in Envoy's /config_dump."""
    dump = envoy.config_dump()
    listeners: set[str] = set()
    clusters: set[str] = set()
    configs = dump.get("configs", [])
    assert isinstance(configs, list)
    for config in configs:
        for lst in config.get("dynamic_listeners", []):
            if "active_state" in lst:
                listeners.add(lst["name"])
        for c in config.get("dynamic_active_clusters", []):
            clusters.add(c["cluster"]["name"])
    return listeners, clusters


def rejected_updates(envoy: EnvoyProcess) -> int:
    """How many CDS/LDS/RDS/EDS updates Envoy rejected so far."""
    text = envoy.get("/stats?format=json&filter=update_rejected")
    stats = json.loads(text).get("stats", [])
    return sum(int(s.get("value", 0)) for s in stats if "update_rejected" in s.get("name", ""))


def config_progress(node: EnvoyNode, regions: Sequence[str]) -> tuple[bool, str]:
    """(accepted, what is still missing); raises ConfigRejected on a NACK.

    An admin API that does not answer yet counts as "not yet".
    """
    envoy = node.process
    if envoy is None or not envoy.read_admin():
        return False, "admin API not up"
    try:
        if rejected_updates(envoy):
            raise ConfigRejected(f"{node.id} rejected its config (see its log)")
        listeners, clusters = active_config(envoy)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, f"admin API: {exc}"
    want_listeners, want_clusters = node.expected(regions)
    missing = sorted((want_listeners - listeners) | (want_clusters - clusters))
    if missing:
        return False, "waiting for " + ", ".join(missing)
    return True, ""
