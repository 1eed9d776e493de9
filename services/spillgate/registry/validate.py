"""Pure validation and planning of registry writes (no I/O), shared by every store.

`plan_apply` turns a batch of mutations into the effective changes against a state, and
raises the same errors whatever the store: ValidationError for malformed entities (checked
per mutation, in order), PreconditionFailed for immutable versions and for references the
resulting state leaves dangling (checked once, on the state after the whole batch, so a
batch may create a model and its versions in any order).
"""

from __future__ import annotations

import re
from datetime import datetime

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


def _require(state: State, owner: str, kind: EntityKind, key: str) -> None:
    if (kind, key) not in state:
        raise PreconditionFailed(f"{owner} references unknown {kind_name(kind)} {key!r}")


def validate_state(state: State) -> None:
    """Check that every reference in `state` resolves and that ids do not collide.

    Raises PreconditionFailed naming the referring entity and the missing one, or
    ValidationError for an alias whose name collides with a model id. Checks run in key
    order so the reported problem is deterministic.
    """
    for (kind, key), entity in sorted(state.items()):
        owner = f"{kind_name(kind)} {key!r}"
        if kind == MODEL and entity.model.fallback_model:
            _require(state, owner, MODEL, entity.model.fallback_model)
        elif kind == VERSION:
            _require(state, owner, MODEL, entity.version.model)
        elif kind == ALIAS:
            if (MODEL, key) in state:
                raise ValidationError("alias.name", f"{key!r} collides with a model id")
            a = entity.alias
            lists = [a.default_targets, *(a.region_targets[r] for r in sorted(a.region_targets))]
            for region in sorted(a.region_targets):
                _require(state, owner, REGION, region)
            for targets in lists:
                for t in targets.targets:
                    _require(state, owner, VERSION, version_id(t.model, t.version))
        elif kind == PLACEMENT:
            p = entity.placement
            _require(state, owner, VERSION, version_id(p.model, p.version))
            _require(state, owner, REGION, p.region)
        elif kind == REPLICA:
            # Loaded versions are reported by the replica and are not checked: a replica
            # must not be refused registration because an operator deleted a version.
            _require(state, owner, REGION, entity.replica.region)


def _without_create_time(version: registry_pb2.Version) -> bytes:
    copy = registry_pb2.Version()
    copy.CopyFrom(version)
    copy.ClearField("create_time")
    return copy.SerializeToString(deterministic=True)


def _same(a: registry_pb2.Entity, b: registry_pb2.Entity) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def plan_apply(
    state: State, mutations: list[registry_pb2.Mutation], now: datetime
) -> tuple[dict[Key, registry_pb2.Entity], list[registry_pb2.Change]]:
    """Compute the resulting state and the effective changes of applying `mutations`.

    `state` is not modified. No-op puts and deletes of absent keys produce no change.
    A new version gets `create_time = now` (the registry owns it); re-putting an existing
    version is a no-op when its content is identical (create_time aside) and raises
    PreconditionFailed otherwise, since versions are immutable.
    """
    result = dict(state)
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
            result[key] = entity
            changes.append(change)
        elif which == "delete":
            kind, key_id = mutation.delete.kind, mutation.delete.id
            if kind_name(kind) == "unknown":
                raise ValidationError(f"mutations[{i}].delete.kind", "must be set")
            if not key_id:
                raise ValidationError(f"mutations[{i}].delete.id", "must not be empty")
            removed = result.pop((kind, key_id), None)
            if removed is not None:
                changes.append(
                    registry_pb2.Change(
                        kind=registry_pb2.CHANGE_KIND_DELETE, entity=removed, previous=removed
                    )
                )
        else:
            raise ValidationError(f"mutations[{i}]", "exactly one of put or delete must be set")
    if changes:
        validate_state(result)
    return result, changes
