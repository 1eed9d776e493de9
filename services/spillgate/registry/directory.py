"""ReplicaDirectory: the hook through which the registry announces leased replicas elsewhere.

The registry store is the truth about replicas; a directory mirrors the leased ones into
another system (Consul's catalog: `consul_catalog.ConsulCatalog`) so that tools that only
speak that system's discovery see the fleet. Mirroring is best-effort: the service calls
these methods after the store committed, and nothing a directory does may fail or delay
RegisterReplica or Heartbeat. A registry without a directory (SQLite) simply has none.
"""

from __future__ import annotations

import abc
from datetime import timedelta

from spillgate._proto import registry_pb2


class ReplicaDirectory(abc.ABC):
    """Receives replica lease events, in the order the service saw them.

    Implementations must return quickly (queue the work) and must not raise; the service
    logs and ignores an exception anyway. They are called from the event loop's thread.
    """

    @abc.abstractmethod
    def registered(self, replica: registry_pb2.Replica, lease: timedelta) -> None:
        """`replica` (as stored) registered with a lease of `lease`; replaces any earlier one."""

    @abc.abstractmethod
    def renewed(self, replica: registry_pb2.Replica, lease: timedelta) -> None:
        """A heartbeat renewed the lease of `replica` (as stored after the heartbeat)."""

    @abc.abstractmethod
    def removed(self, replica: str) -> None:
        """Replica `replica` left the registry (its lease ran out twice, or it was deleted)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop; pending work may be dropped (the directory's own expiry cleans up)."""
