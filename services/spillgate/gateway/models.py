"""What the gateway knows about models, read from the registry client's cached snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from spillgate._proto import common_pb2, gateway_pb2, registry_pb2
from spillgate.gateway.errors import GatewayError
from spillgate.registry.store import ALIAS, MODEL, PLACEMENT, REPLICA, VERSION, Key


@dataclass(frozen=True)
class Limits:
    """Token limits that apply to a requested model (for an alias: the strictest target)."""

    max_context_tokens: int
    max_output_tokens: int


class ModelCatalog:
    """Model lookups over a registry state (a callable returning the current mapping)."""

    def __init__(self, state: Mapping[Key, registry_pb2.Entity] | None = None) -> None:
        self.state: Mapping[Key, registry_pb2.Entity] = state or {}

    def _model(self, model_id: str) -> registry_pb2.Model | None:
        entity = self.state.get((MODEL, model_id))
        return entity.model if entity is not None else None

    def _targets(self, name: str) -> list[str]:
        """Model ids a requested name can resolve to; [] when unknown."""
        if "@" in name:
            model_id = name.partition("@")[0]
            return [model_id] if (VERSION, name) in self.state else []
        if (MODEL, name) in self.state:
            return [name]
        alias = self.state.get((ALIAS, name))
        if alias is None:
            return []
        lists = [alias.alias.default_targets, *alias.alias.region_targets.values()]
        return sorted({t.model for targets in lists for t in targets.targets})

    def limits(self, name: str) -> Limits:
        """Limits for `name` (model id, alias or model@version); NOT_FOUND when unknown."""
        if not self.state:
            # No registry snapshot yet (start-up, registry unreachable on a cold start):
            # retryable, not "unknown".
            raise GatewayError(
                grpc.StatusCode.UNAVAILABLE, "the gateway has no registry snapshot yet; retry"
            )
        models = [m for m in map(self._model, self._targets(name)) if m is not None]
        if not models:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"unknown model or alias {name!r}")
        context = [m.max_context_tokens for m in models if m.max_context_tokens]
        output = [m.max_output_tokens for m in models if m.max_output_tokens]
        return Limits(min(context, default=0), min(output, default=4096))

    def listings(self, region: str = "*") -> list[gateway_pb2.ModelListing]:
        """Models and aliases with their versions and the regions serving them: those served
        in `region`, or all of them for "*" (gateway.proto ListModelsRequest)."""
        serving: dict[str, set[str]] = {}
        versions: dict[str, list[str]] = {}
        for (kind, _), e in sorted(self.state.items()):
            if kind == VERSION:
                versions.setdefault(e.version.model, []).append(e.version.version)
            elif kind == PLACEMENT:
                serving.setdefault(e.placement.model, set()).add(e.placement.region)
            elif kind == REPLICA and e.replica.state == common_pb2.REPLICA_STATE_READY:
                for v in e.replica.loaded:
                    serving.setdefault(v.model, set()).add(e.replica.region)
        out = []
        for (kind, key), e in sorted(self.state.items()):
            if kind == MODEL:
                m = e.model
                regions = sorted(serving.get(m.id, ()))
                listing = gateway_pb2.ModelListing(
                    model=m.id,
                    alias=False,
                    kind=m.kind,
                    versions=versions.get(m.id, []),
                    regions=regions,
                    max_context_tokens=m.max_context_tokens,
                    max_output_tokens=m.max_output_tokens,
                )
            elif kind == ALIAS:
                targets = self._targets(key)
                regions = sorted({r for t in targets for r in serving.get(t, ())})
                try:
                    limits = self.limits(key)
                except GatewayError:  # its targets are gone: list it, without limits
                    limits = Limits(0, 0)
                listing = gateway_pb2.ModelListing(
                    model=key,
                    alias=True,
                    regions=regions,
                    max_context_tokens=limits.max_context_tokens,
                    max_output_tokens=limits.max_output_tokens,
                )
            else:
                continue
            if region == "*" or region in listing.regions:
                out.append(listing)
        return out

    def version(self, pinned: str) -> registry_pb2.Version:
        """The Version entity of "name@version"; NOT_FOUND when unknown."""
        entity = self.state.get((VERSION, pinned))
        if entity is None:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"unknown model version {pinned!r}")
        version: registry_pb2.Version = entity.version
        return version

    def placement_pools(self, pinned: str, region: str) -> set[str]:
        """Pools of `region` the placement of "name@version" assigns."""
        model, _, version = pinned.partition("@")
        return {
            e.placement.pool
            for (kind, _), e in self.state.items()
            if kind == PLACEMENT
            and (e.placement.model, e.placement.version, e.placement.region)
            == (model, version, region)
        }

    def ready_replicas(self, region: str) -> list[registry_pb2.Replica]:
        return [
            e.replica
            for (kind, _), e in sorted(self.state.items())
            if kind == REPLICA
            and e.replica.region == region
            and e.replica.state == common_pb2.REPLICA_STATE_READY
        ]
