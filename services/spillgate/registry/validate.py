"""Pure validation and planning of registry writes (no I/O), shared by every store.

`plan_apply` turns a batch of mutations into the effective changes against a state, and
raises the same errors whatever the store: ValidationError for malformed entities (checked
per mutation, in order), PreconditionFailed for immutable versions and for references the
resulting state leaves dangling (checked once, on the state after the whole batch, so a
batch may create a model and its versions in any order).

Writes are checked incrementally (`validate_delta`): the state a write starts from passed
the same checks when it was written, so only the entities a batch touches, and those that
refer to what it deletes, can break a rule. A heartbeat-sized write costs O(batch), not
O(fleet). `validate_state` is the full check the incremental one must agree with.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import TypeAlias

from spillgate._proto import registry_pb2
from spillgate.registry.store import (
    ALIAS,
    MODEL,
    PLACEMENT,
    REGION,
    REPLICA,
    VERSION,
    EntityKind,
    Key,
    PreconditionFailed,
    State,
    ValidationError,
    entity_key,
    kind_name,
    version_id,
)

_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _check_id(field: str, value: str) -> None:
    if not value:
        raise ValidationError(field, "must not be empty")
    if not _ID.fullmatch(value):
        raise ValidationError(field, f"{value!r} must match [a-z0-9][a-z0-9._-]*")


def _check_targets(field: str, targets: registry_pb2.AliasTargets) -> None:
    for i, target in enumerate(targets.targets):
        _check_id(f"{field}.targets[{i}].model", target.model)
        _check_id(f"{field}.targets[{i}].version", target.version)
    total = sum(t.weight for t in targets.targets)
    if total != 100:
        raise ValidationError(field, f"weights must sum to 100, got {total}")


def validate_entity(entity: registry_pb2.Entity) -> None:
    """Check one entity on its own (ids, digest, weights, required fields).

    Raises ValidationError naming the offending field ("region.residency_zone").
    """
    which = entity.WhichOneof("entity")
    if which == "region":
        r = entity.region
        _check_id("region.id", r.id)
        if not r.residency_zone:
            raise ValidationError("region.residency_zone", "must not be empty")
        _check_id("region.residency_zone", r.residency_zone)
        for peer in r.rtt_ms:
            _check_id("region.rtt_ms", peer)
        if len(set(r.admission_endpoints)) != len(r.admission_endpoints):
            raise ValidationError("region.admission_endpoints", "lists an endpoint twice")
        if any(not e for e in r.admission_endpoints):
            raise ValidationError("region.admission_endpoints", "must not hold an empty endpoint")
        if (
            r.admission_endpoint
            and r.admission_endpoints
            and r.admission_endpoint not in r.admission_endpoints
        ):
            raise ValidationError(
                "region.admission_endpoint",
                f"{r.admission_endpoint!r} is not one of admission_endpoints",
            )
    elif which == "model":
        m = entity.model
        _check_id("model.id", m.id)
        if m.kind == 0:
            raise ValidationError("model.kind", "must be set")
        if m.fallback_model:
            _check_id("model.fallback_model", m.fallback_model)
            if m.fallback_model == m.id:
                raise ValidationError("model.fallback_model", "must not be the model itself")
    elif which == "version":
        v = entity.version
        _check_id("version.model", v.model)
        _check_id("version.version", v.version)
        if not _DIGEST.fullmatch(v.artifact_digest):
            raise ValidationError(
                "version.artifact_digest",
                f"{v.artifact_digest!r} must be 'sha256:' + 64 lowercase hex digits",
            )
    elif which == "alias":
        a = entity.alias
        _check_id("alias.name", a.name)
        _check_targets("alias.default_targets", a.default_targets)
        for region in sorted(a.region_targets):
            _check_id("alias.region_targets", region)
            _check_targets(f"alias.region_targets[{region}]", a.region_targets[region])
    elif which == "placement":
        p = entity.placement
        for name in ("model", "version", "region", "pool"):
            _check_id(f"placement.{name}", getattr(p, name))
        if p.max_replicas < p.min_replicas:
            raise ValidationError(
                "placement.max_replicas",
                f"{p.max_replicas} is below min_replicas {p.min_replicas}",
            )
    elif which == "replica":
        rep = entity.replica
        _check_id("replica.id", rep.id)
        _check_id("replica.region", rep.region)
        if rep.pool:
            _check_id("replica.pool", rep.pool)
        if not rep.endpoint:
            raise ValidationError("replica.endpoint", "must not be empty")
    else:
        raise ValidationError("entity", "exactly one entity kind must be set")


def _references(kind: EntityKind, entity: registry_pb2.Entity) -> list[Key]:
    """The keys `entity` requires to exist, in the order they are checked."""
    if kind == MODEL:
        fallback = entity.model.fallback_model
        return [(MODEL, fallback)] if fallback else []
    if kind == VERSION:
        return [(MODEL, entity.version.model)]
    if kind == ALIAS:
        a = entity.alias
        regions = sorted(a.region_targets)
        lists = [a.default_targets, *(a.region_targets[r] for r in regions)]
        refs: list[Key] = [(REGION, r) for r in regions]
        refs += [(VERSION, version_id(t.model, t.version)) for ts in lists for t in ts.targets]
        return refs
    if kind == PLACEMENT:
        p = entity.placement
        return [(VERSION, version_id(p.model, p.version)), (REGION, p.region)]
    if kind == REPLICA:
        # Loaded versions are reported by the replica and are not checked: a replica
        # must not be refused registration because an operator deleted a version.
        return [(REGION, entity.replica.region)]
    return []


# Which kinds may hold a reference to an entity of a kind (from `_references`), so that a
# delete only needs to look at those.
_REFERRER_KINDS: dict[EntityKind, frozenset[EntityKind]] = {
    REGION: frozenset({ALIAS, PLACEMENT, REPLICA}),
    MODEL: frozenset({MODEL, VERSION}),
    VERSION: frozenset({ALIAS, PLACEMENT}),
}


def _check_entity(state: State, key: Key, entity: registry_pb2.Entity) -> None:
    """Check one entity of `state` against the rest of it (the rules of validate_state)."""
    kind, key_id = key
    if kind == ALIAS and (MODEL, key_id) in state:
        raise ValidationError("alias.name", f"{key_id!r} collides with a model id")
    for ref in _references(kind, entity):
        if ref not in state:
            raise PreconditionFailed(
                f"{kind_name(kind)} {key_id!r} references unknown {kind_name(ref[0])} {ref[1]!r}"
            )


def validate_state(state: State) -> None:
    """Check that every reference in `state` resolves and that ids do not collide.

    Raises PreconditionFailed naming the referring entity and the missing one, or
    ValidationError for an alias whose name collides with a model id. Checks run in key
    order so the reported problem is deterministic. O(state): writes use `validate_delta`.
    """
    for key, entity in sorted(state.items()):
        _check_entity(state, key, entity)


def validate_delta(before: State, after: State, touched: Iterable[Key]) -> None:
    """Check `after` exactly as `validate_state(after)` would, in O(touched) for most writes.

    Precondition: `before` passes validate_state and `after` differs from it only at the
    keys in `touched`. Then only these entities can break a rule: the touched ones still
    present, the alias named like a touched model, and the referrers of touched keys that
    are gone. They are checked in key order, so the first problem reported is the one
    validate_state reports. Finding the referrers of a deleted region, model or version
    scans `after` (those deletes are rare operator actions); replica, placement and alias
    writes never scan.
    """
    check: set[Key] = set()
    gone: set[Key] = set()
    for key in touched:
        if key in after:
            check.add(key)
            if key[0] == MODEL and (ALIAS, key[1]) in after:
                check.add((ALIAS, key[1]))
        elif key[0] in _REFERRER_KINDS:
            gone.add(key)
    if gone:
        kinds = frozenset().union(*(_REFERRER_KINDS[k] for k, _ in gone))
        check.update(
            key
            for key, entity in after.items()
            if key[0] in kinds
            and key not in check
            and not gone.isdisjoint(_references(key[0], entity))
        )
    for key in sorted(check):
        _check_entity(after, key, after[key])


def _without_create_time(version: registry_pb2.Version) -> bytes:
    copy = registry_pb2.Version()
    copy.CopyFrom(version)
    copy.ClearField("create_time")
    return copy.SerializeToString(deterministic=True)


def _same(a: registry_pb2.Entity, b: registry_pb2.Entity) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


# The result of a write as key -> new entity, or None where the key is deleted.
Delta: TypeAlias = dict[Key, registry_pb2.Entity | None]


def apply_delta(state: dict[Key, registry_pb2.Entity], delta: Delta) -> None:
    """Make `state` the state `delta` was planned to produce from it (in place)."""
    for key, entity in delta.items():
        if entity is None:
            state.pop(key, None)
        else:
            state[key] = entity


class _Overlay(Mapping[Key, registry_pb2.Entity]):
    """`base` with `delta` laid over it (None = deleted), without copying `base`."""

    def __init__(self, base: State, delta: Delta) -> None:
        self._base = base
        self._delta = delta

    def __getitem__(self, key: Key) -> registry_pb2.Entity:
        if key in self._delta:
            entity = self._delta[key]
            if entity is None:
                raise KeyError(key)
            return entity
        return self._base[key]

    def __contains__(self, key: object) -> bool:
        if key in self._delta:
            return self._delta[key] is not None
        return key in self._base

    def __iter__(self) -> Iterator[Key]:
        for key in self._base:
            if key not in self._delta:
                yield key
        for key, entity in self._delta.items():
            if entity is not None:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


def plan_delta(
    state: State, mutations: list[registry_pb2.Mutation], now: datetime
) -> tuple[Delta, list[registry_pb2.Change]]:
    """Like `plan_apply`, but returns the resulting state as a Delta against `state`.

    Costs O(mutations), not O(state) (bar the deletes validate_delta scans for). Stores
    that keep the state in memory apply the delta to it with `apply_delta` once the write
    is committed. The delta's entities are not shared with the changes.
    """
    delta: Delta = {}
    result = _Overlay(state, delta)
    changes: list[registry_pb2.Change] = []
    for i, mutation in enumerate(mutations):
        which = mutation.WhichOneof("mutation")
        if which == "put":
            entity = registry_pb2.Entity()
            entity.CopyFrom(mutation.put)
            validate_entity(entity)
            key = entity_key(entity)
            previous = result.get(key)
            if key[0] == VERSION:
                if previous is not None:
                    if _without_create_time(previous.version) != _without_create_time(
                        entity.version
                    ):
                        raise PreconditionFailed(
                            f"version {key[1]!r} is immutable and already exists with "
                            "different content"
                        )
                    continue
                entity.version.create_time.FromDatetime(now)
            if previous is not None and _same(previous, entity):
                continue
            change = registry_pb2.Change(kind=registry_pb2.CHANGE_KIND_PUT, entity=entity)
            if previous is not None:
                change.previous.CopyFrom(previous)
            delta[key] = entity
            changes.append(change)
        elif which == "delete":
            kind, key_id = mutation.delete.kind, mutation.delete.id
            if kind_name(kind) == "unknown":
                raise ValidationError(f"mutations[{i}].delete.kind", "must be set")
            if not key_id:
                raise ValidationError(f"mutations[{i}].delete.id", "must not be empty")
            removed = result.get((kind, key_id))
            if removed is not None:
                delta[kind, key_id] = None
                changes.append(
                    registry_pb2.Change(
                        kind=registry_pb2.CHANGE_KIND_DELETE, entity=removed, previous=removed
                    )
                )
        else:
            raise ValidationError(f"mutations[{i}]", "exactly one of put or delete must be set")
    if changes:
        validate_delta(state, result, delta)
    return delta, changes


def plan_apply(
    state: State, mutations: list[registry_pb2.Mutation], now: datetime
) -> tuple[dict[Key, registry_pb2.Entity], list[registry_pb2.Change]]:
    """Compute the resulting state and the effective changes of applying `mutations`.

    `state` is not modified and must be valid (it passed validation when it was written):
    only what the mutations touch is re-checked (validate_delta). No-op puts and deletes
    of absent keys produce no change. A new version gets `create_time = now` (the registry
    owns it); re-putting an existing version is a no-op when its content is identical
    (create_time aside) and raises PreconditionFailed otherwise, since versions are
    immutable. The result is a shallow copy of `state` (~0.2 ms for 30,000 entities);
    stores that keep their own state in memory can use `plan_delta` and skip it.
    """
    delta, changes = plan_delta(state, mutations, now)
    result = dict(state)
    apply_delta(result, delta)
    return result, changes


def admission_endpoints(region: registry_pb2.Region) -> tuple[str, ...]:
    """Every admission instance of `region` (`admission_endpoints`, else the one
    `admission_endpoint`, else none), in registry order."""
    if region.admission_endpoints:
        return tuple(region.admission_endpoints)
    return (region.admission_endpoint,) if region.admission_endpoint else ()
