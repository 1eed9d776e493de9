"""FleetView: the policy's immutable, pre-indexed view of registry state (pure input).

The admission service builds one from its registry snapshot (adapter outside ``core``) and
hands it to ``Policy.set_fleet`` whenever the snapshot changes. Everything the hot path
needs is indexed here once: replicas per (region, model, version), alias weight tables per
region, neighbours ordered by RTT.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from spillgate.core.errors import InvalidRequest, UnknownModel


class ReplicaStatus(enum.IntEnum):
    """Replica lifecycle; values equal ``spillgate.v1.ReplicaState`` (0 reads as NOT_READY)."""

    READY = 1
    NOT_READY = 2
    DRAINING = 3


@dataclass(frozen=True)
class RegionInfo:
    """A region (``spillgate.v1.Region``): zone, gateway endpoint, RTT to peers in ms;
    ``draining`` (the operator drained the whole region) makes it nobody's neighbour."""

    id: str
    residency_zone: str = ""
    gateway_endpoint: str = ""
    rtt_ms: Mapping[str, float] = field(default_factory=dict)
    draining: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """A model (``spillgate.v1.Model``): output limit and fallback for DEGRADE."""

    id: str
    max_output_tokens: int = 4096
    fallback_model: str = ""


@dataclass(frozen=True)
class VersionInfo:
    """An immutable version (``spillgate.v1.Version``) and the Triton name that serves it."""

    model: str
    version: str
    triton_model_name: str
    triton_model_version: str = ""


@dataclass(frozen=True)
class AliasTarget:
    """One weighted target (``spillgate.v1.AliasTarget``); weight 0..100."""

    model: str
    version: str
    weight: int


@dataclass(frozen=True)
class AliasInfo:
    """Alias (``spillgate.v1.Alias``): default targets plus per-region canary targets."""

    name: str
    default_targets: tuple[AliasTarget, ...]
    region_targets: Mapping[str, tuple[AliasTarget, ...]] = field(default_factory=dict)

    def targets(self, region: str) -> tuple[AliasTarget, ...]:
        """The targets that apply in ``region``."""
        return self.region_targets.get(region, self.default_targets)


@dataclass(frozen=True)
class ReplicaInfo:
    """A replica (``spillgate.v1.Replica``) plus capacity hints (None = config prior)."""

    id: str
    region: str
    endpoint: str
    state: ReplicaStatus
    loaded: tuple[tuple[str, str], ...]  # (model, version) pairs ready on it
    max_num_seqs: int | None = None
    kv_blocks: int | None = None


@dataclass(frozen=True)
class _AliasTable:
    cumulative: tuple[float, ...]
    targets: tuple[AliasTarget, ...]


class FleetView:
    """Indexed registry state. Raises ``ValueError`` on dangling references at construction.

    Only READY replicas become candidates; DRAINING/NOT_READY ones are never listed.
    """

    def __init__(
        self,
        regions: Iterable[RegionInfo],
        models: Iterable[ModelInfo],
        versions: Iterable[VersionInfo],
        aliases: Iterable[AliasInfo] = (),
        replicas: Iterable[ReplicaInfo] = (),
        revision: int = 0,
    ) -> None:
        self.revision = revision
        self.regions = {r.id: r for r in regions}
        self.models = {m.id: m for m in models}
        self.versions = {(v.model, v.version): v for v in versions}
        self.aliases = {a.name: a for a in aliases}
        self.replicas = {r.id: r for r in replicas}
        for key in self.versions:
            if key[0] not in self.models:
                raise ValueError(f"version {key[0]}@{key[1]} names an unknown model")
        serving: dict[tuple[str, str, str], list[ReplicaInfo]] = {}
        for rep in self.replicas.values():
            if rep.region not in self.regions:
                raise ValueError(f"replica {rep.id} names an unknown region {rep.region!r}")
            if rep.state is not ReplicaStatus.READY:
                continue
            for model, version in rep.loaded:
                if (model, version) in self.versions:
                    serving.setdefault((rep.region, model, version), []).append(rep)
        self._serving = {k: tuple(sorted(v, key=lambda r: r.id)) for k, v in serving.items()}
        self._versions_of: dict[str, list[str]] = {}
        for model, version in sorted(self.versions):
            self._versions_of.setdefault(model, []).append(version)
        self._alias_tables: dict[tuple[str, str], _AliasTable] = {}
        for alias in self.aliases.values():
            if alias.name in self.models:
                raise ValueError(f"alias {alias.name!r} collides with a model id")
            for region_id in (*self.regions, ""):
                targets = alias.targets(region_id) if region_id else alias.default_targets
                for t in targets:
                    if (t.model, t.version) not in self.versions:
                        raise ValueError(
                            f"alias {alias.name!r} targets unknown {t.model}@{t.version}"
                        )
                weights = itertools.accumulate(float(t.weight) for t in targets)
                self._alias_tables[(alias.name, region_id)] = _AliasTable(tuple(weights), targets)
        self._neighbours: dict[str, tuple[RegionInfo, ...]] = {}
        for info in self.regions.values():
            rtts = info.rtt_ms
            peers = [
                self.regions[p]
                for p, rtt in rtts.items()
                if p in self.regions
                and p != info.id
                and math.isfinite(rtt)
                and not self.regions[p].draining
            ]
            peers.sort(key=lambda p: (rtts[p.id], p.id))
            self._neighbours[info.id] = tuple(peers)

    def serving(self, region: str, model: str, version: str) -> tuple[ReplicaInfo, ...]:
        """READY replicas of ``region`` with ``model@version`` loaded, sorted by id."""
        return self._serving.get((region, model, version), ())

    def local_keys(self, region: str) -> list[tuple[str, str]]:
        """(model, version) pairs with at least one READY replica in ``region``."""
        return sorted((m, v) for (r, m, v) in self._serving if r == region)

    def neighbours(self, region: str) -> tuple[RegionInfo, ...]:
        """Peers of ``region`` with a known RTT that are not draining, nearest first."""
        return self._neighbours.get(region, ())

    def is_alias(self, name: str) -> bool:
        """True when ``name`` is an alias (not a model id or ``name@version``)."""
        return name in self.aliases

    def alias_versions(self, alias: str, region: str) -> tuple[tuple[str, str], ...]:
        """(model, version) targets of ``alias`` in ``region`` with a non-zero weight."""
        table = self._alias_tables.get((alias, region)) or self._alias_tables[(alias, "")]
        return tuple((t.model, t.version) for t in table.targets if t.weight > 0)

    def resolve(self, name: str, region: str, u: float) -> tuple[str, str]:
        """Resolve an alias, ``name@version`` or bare model id to (model, version).

        ``u`` in [0, 1) picks among an alias's weighted targets for ``region`` (canary). A bare
        model id resolves to its only version, or to the alias of the same name's choice.
        Raises :class:`UnknownModel` or :class:`InvalidRequest` (ambiguous bare model id).
        """
        if "@" in name:
            model, _, version = name.partition("@")
            if (model, version) not in self.versions:
                raise UnknownModel(name)
            return model, version
        table = self._alias_tables.get((name, region)) or self._alias_tables.get((name, ""))
        if table is not None:
            if not table.targets or table.cumulative[-1] <= 0:
                raise UnknownModel(name)
            i = bisect.bisect_right(table.cumulative, u * table.cumulative[-1])
            target = table.targets[min(i, len(table.targets) - 1)]
            return target.model, target.version
        versions = self._versions_of.get(name)
        if not versions:
            raise UnknownModel(name)
        if len(versions) > 1:
            raise InvalidRequest("model", f"model {name!r} has several versions: pin one")
        return name, versions[0]
