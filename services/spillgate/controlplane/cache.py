"""SnapshotCache: the latest consistent snapshot per Envoy node, plus what each node said.

Like go-control-plane's SnapshotCache, `set` refuses an inconsistent snapshot and wakes the
streams of that node. It also remembers, per node, the last snapshot Envoy fully accepted
(`good`) and the versions it rejected, so a rejected snapshot is never pushed again: the
node is served its last good snapshot until a new one is set.

Not thread-safe: use it from the event loop the ADS server runs in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from spillgate.controlplane.snapshot import Snapshot, check_consistent

log = logging.getLogger(__name__)

Watcher = Callable[[], None]


@dataclass
class Nack:
    """One rejected response."""

    type_url: str
    version: str
    message: str


@dataclass
class NodeStatus:
    """What the control plane knows about one node (for status output, metrics, tests)."""

    streams: int = 0  # open ADS streams
    acks: int = 0
    nacks: int = 0
    last_nack: Nack | None = None
    # type URL -> version the node last ACKed.
    acked: dict[str, str] = field(default_factory=dict)
    # Snapshot versions the node rejected (never pushed to it again).
    rejected: set[str] = field(default_factory=set)
    # Version of the last snapshot the node accepted for every type it subscribes to.
    good_version: str = ""


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._good: dict[str, Snapshot] = {}
        self._status: dict[str, NodeStatus] = {}
        self._watchers: dict[str, list[Watcher]] = {}

    def set(self, node_id: str, snapshot: Snapshot) -> bool:
        """Check `snapshot` (InconsistentSnapshot if broken) and make it `node_id`'s.

        Returns whether anything changed (an identical version is a no-op).
        """
        check_consistent(snapshot)
        current = self._snapshots.get(node_id)
        if current is not None and current.version == snapshot.version:
            return False
        self._snapshots[node_id] = snapshot
        for watcher in list(self._watchers.get(node_id, ())):
            watcher()
        return True

    def clear(self, node_id: str) -> None:
        self._snapshots.pop(node_id, None)

    def get(self, node_id: str) -> Snapshot | None:
        """The latest snapshot set for `node_id` (maybe one the node rejected)."""
        return self._snapshots.get(node_id)

    def serving(self, node_id: str) -> Snapshot | None:
        """What to serve `node_id`: the latest snapshot, unless the node rejected it; then
        the last one it accepted (or, when there is none, the latest anyway)."""
        latest = self._snapshots.get(node_id)
        status = self._status.get(node_id)
        if latest is not None and status is not None and latest.version in status.rejected:
            return self._good.get(node_id, latest)
        return latest

    def nodes(self) -> list[str]:
        return sorted(self._snapshots)

    def known_nodes(self) -> list[str]:
        """Nodes with a snapshot or that ever opened a stream."""
        return sorted(set(self._snapshots) | set(self._status))

    def status(self, node_id: str) -> NodeStatus:
        """A copy of the node's status (a zero status for unknown nodes)."""
        status = self._status.get(node_id, NodeStatus())
        return dataclasses.replace(status, acked=dict(status.acked), rejected=set(status.rejected))

    def watch(self, node_id: str, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher()` whenever `node_id`'s snapshot changes; returns an unsubscriber."""
        self._watchers.setdefault(node_id, []).append(watcher)

        def cancel() -> None:
            watchers = self._watchers.get(node_id, [])
            if watcher in watchers:
                watchers.remove(watcher)

        return cancel

    # -- reports from the ADS streams --------------------------------------------------------

    def _node(self, node_id: str) -> NodeStatus:
        return self._status.setdefault(node_id, NodeStatus())

    def stream_opened(self, node_id: str) -> None:
        self._node(node_id).streams += 1

    def stream_closed(self, node_id: str) -> None:
        self._node(node_id).streams -= 1

    def acked(self, node_id: str, type_url: str, version: str) -> None:
        status = self._node(node_id)
        status.acks += 1
        status.acked[type_url] = version

    def accepted(self, node_id: str, snapshot: Snapshot) -> None:
        """The node ACKed `snapshot` for every type it subscribes to."""
        self._node(node_id).good_version = snapshot.version
        self._good[node_id] = snapshot

    def nacked(self, node_id: str, snapshot_version: str, nack: Nack) -> None:
        status = self._node(node_id)
        status.nacks += 1
        status.last_nack = nack
        if snapshot_version != status.good_version:
            status.rejected.add(snapshot_version)
        log.warning(
            "node %s rejected %s version %s: %s", node_id, nack.type_url, nack.version, nack.message
        )
