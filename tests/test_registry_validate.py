"""Incremental write validation agrees with the full check (`validate_state`, the oracle).

`plan_apply` only re-checks what a batch touches and what refers to what it deletes. For
generated valid states and mutation batches it must accept and reject exactly as running
`validate_state` on the whole resulting state would, with the same error type and message.
Ids come from tiny pools so that references, deletes of referenced entities and alias/model
name collisions happen often.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spillgate._proto import common_pb2, registry_pb2
from spillgate.registry.store import (
    ALIAS,
    MODEL,
    PLACEMENT,
    REGION,
    REPLICA,
    VERSION,
    Key,
    StoreError,
    entity_key,
)
from spillgate.registry.validate import (
    _check_entity,
    apply_delta,
    plan_apply,
    plan_delta,
    validate_state,
)

NOW = datetime(2025, 6, 1, tzinfo=UTC)
REGIONS = ["us", "eu", "ap"]
MODELS = ["m", "n", "chat"]  # "chat" is also an alias name: collisions
LABELS = ["v1", "v2"]
ALIASES = ["chat", "canary", "beta"]
POOLS = ["default", "big"]
REPLICAS = ["r0", "r1", "r2", "r3"]
KINDS = [REGION, MODEL, VERSION, ALIAS, PLACEMENT, REPLICA]


def _digest(model: str, label: str) -> str:
    # One content per version id, so re-puts are no-ops rather than immutability errors
    # (those are raised per mutation, before and independently of the state check).
    return "sha256:" + hashlib.sha256(f"{model}@{label}".encode()).hexdigest()


regions = st.builds(
    lambda id, peers: registry_pb2.Entity(
        region=registry_pb2.Region(
            id=id, residency_zone="z", rtt_ms={p: 10.0 for p in peers if p != id}
        )
    ),
    st.sampled_from(REGIONS),
    st.sets(st.sampled_from(REGIONS)),
)
models = st.builds(
    lambda id, fallback: registry_pb2.Entity(
        model=registry_pb2.Model(
            id=id,
            kind=common_pb2.MODEL_KIND_LLM,
            fallback_model=fallback if fallback != id else "",
        )
    ),
    st.sampled_from(MODELS),
    st.sampled_from(["", *MODELS]),
)
versions = st.builds(
    lambda m, v: registry_pb2.Entity(
        version=registry_pb2.Version(model=m, version=v, artifact_digest=_digest(m, v))
    ),
    st.sampled_from(MODELS),
    st.sampled_from(LABELS),
)


def _targets(pairs: list[tuple[str, str]]) -> registry_pb2.AliasTargets:
    weights = [100 // len(pairs)] * len(pairs)
    weights[0] += 100 - sum(weights)
    return registry_pb2.AliasTargets(
        targets=[
            registry_pb2.AliasTarget(model=m, version=v, weight=w)
            for (m, v), w in zip(pairs, weights, strict=True)
        ]
    )


target_lists = st.lists(
    st.tuples(st.sampled_from(MODELS), st.sampled_from(LABELS)), min_size=1, max_size=2
)
aliases = st.builds(
    lambda name, default, per_region: registry_pb2.Entity(
        alias=registry_pb2.Alias(
            name=name,
            default_targets=_targets(default),
            region_targets={r: _targets(t) for r, t in per_region.items()},
        )
    ),
    st.sampled_from(ALIASES),
    target_lists,
    st.dictionaries(st.sampled_from(REGIONS), target_lists, max_size=1),
)
placements = st.builds(
    lambda m, v, r, pool: registry_pb2.Entity(
        placement=registry_pb2.Placement(model=m, version=v, region=r, pool=pool, max_replicas=1)
    ),
    st.sampled_from(MODELS),
    st.sampled_from(LABELS),
    st.sampled_from(REGIONS),
    st.sampled_from(POOLS),
)
replicas = st.builds(
    lambda id, r, loaded: registry_pb2.Entity(
        replica=registry_pb2.Replica(
            id=id,
            region=r,
            endpoint="127.0.0.1:1",
            loaded=[common_pb2.VersionRef(model=m, version=v) for m, v in loaded],
        )
    ),
    st.sampled_from(REPLICAS),
    st.sampled_from(REGIONS),
    st.lists(st.tuples(st.sampled_from(MODELS), st.sampled_from(LABELS)), max_size=1),
)
entities = st.one_of(regions, models, versions, aliases, placements, replicas)


def _all_ids(kind: int) -> list[str]:
    if kind == REGION:
        return REGIONS
    if kind == MODEL:
        return MODELS
    if kind == VERSION:
        return [f"{m}@{v}" for m in MODELS for v in LABELS]
    if kind == ALIAS:
        return ALIASES
    if kind == PLACEMENT:
        return [f"{m}@{v}/{r}/{p}" for m in MODELS for v in LABELS for r in REGIONS for p in POOLS]
    return REPLICAS


keys = st.sampled_from(KINDS).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(_all_ids(k))))
mutations = st.one_of(
    entities.map(lambda e: registry_pb2.Mutation(put=e)),
    keys.map(lambda k: registry_pb2.Mutation(delete=registry_pb2.EntityKey(kind=k[0], id=k[1]))),
)


def _valid_state(items: list[registry_pb2.Entity]) -> dict[Key, registry_pb2.Entity]:
    """The entities (last one per key wins) minus those breaking a rule, to a fixpoint."""
    state = {entity_key(e): e for e in items}
    while True:
        broken = []
        for key, entity in state.items():
            try:
                _check_entity(state, key, entity)
            except StoreError:
                broken.append(key)
        if not broken:
            break
        for key in broken:
            del state[key]
    validate_state(state)
    return state


def _foundation(fallbacks: list[str]) -> list[registry_pb2.Entity]:
    """Every region, model and version of the pools (what other entities refer to)."""
    out = [
        registry_pb2.Entity(region=registry_pb2.Region(id=r, residency_zone="z")) for r in REGIONS
    ]
    out += [
        registry_pb2.Entity(
            model=registry_pb2.Model(
                id=m, kind=common_pb2.MODEL_KIND_LLM, fallback_model=f if f != m else ""
            )
        )
        for m, f in zip(MODELS, fallbacks, strict=True)
    ]
    out += [
        registry_pb2.Entity(
            version=registry_pb2.Version(model=m, version=v, artifact_digest=_digest(m, v))
        )
        for m in MODELS
        for v in LABELS
    ]
    return out


# Start from everything that can be referred to, drop a few of those, add referrers, then
# prune to a valid state: most referrers survive, so deletes and puts hit real references.
states = st.builds(
    lambda fallbacks, drop, rest: _valid_state(
        [e for e in _foundation(fallbacks) if entity_key(e) not in drop] + rest
    ),
    st.lists(st.sampled_from(["", *MODELS]), min_size=len(MODELS), max_size=len(MODELS)),
    st.sets(st.sampled_from([entity_key(e) for e in _foundation(MODELS)]), max_size=4),
    st.lists(st.one_of(aliases, aliases, placements, entities), max_size=15),
)


def _batches(
    state: dict[Key, registry_pb2.Entity],
) -> st.SearchStrategy[list[registry_pb2.Mutation]]:
    """Mutation batches for `state`: random ones, plus deletes of what it holds and models
    named like its aliases (the writes that can break an untouched entity)."""
    choices = [mutations]
    if state:
        choices.append(
            st.sampled_from(sorted(state)).map(
                lambda k: registry_pb2.Mutation(delete=registry_pb2.EntityKey(kind=k[0], id=k[1]))
            )
        )
    names = sorted(key_id for kind, key_id in state if kind == ALIAS)
    if names:
        choices.append(
            st.sampled_from(names).map(
                lambda n: registry_pb2.Mutation(
                    put=registry_pb2.Entity(
                        model=registry_pb2.Model(id=n, kind=common_pb2.MODEL_KIND_LLM)
                    )
                )
            )
        )
    return st.lists(st.one_of(choices), min_size=1, max_size=6)


def _naive_result(
    state: dict[Key, registry_pb2.Entity], batch: list[registry_pb2.Mutation]
) -> dict[Key, registry_pb2.Entity]:
    """The state after `batch`, with no validation at all (versions keep their first put)."""
    result = dict(state)
    for m in batch:
        if m.WhichOneof("mutation") == "put":
            key = entity_key(m.put)
            if key[0] != VERSION or key not in result:
                result[key] = m.put
        else:
            result.pop((m.delete.kind, m.delete.id), None)
    return result


def _canonical(state: dict[Key, registry_pb2.Entity]) -> dict[Key, bytes]:
    out = {}
    for key, entity in state.items():
        copy = registry_pb2.Entity()
        copy.CopyFrom(entity)
        if copy.WhichOneof("entity") == "version":
            copy.version.ClearField("create_time")
        out[key] = copy.SerializeToString(deterministic=True)
    return out


def _outcome(call: object) -> tuple[type[BaseException] | None, str]:
    assert callable(call)
    try:
        call()
    except StoreError as exc:
        return type(exc), str(exc)
    return None, ""


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=states, data=st.data())
def test_incremental_check_matches_full_check(
    state: dict[Key, registry_pb2.Entity], data: st.DataObject
) -> None:
    batch = data.draw(_batches(state))
    naive = _naive_result(state, batch)
    expected = _outcome(lambda: validate_state(naive))
    before = _canonical(state)
    got = _outcome(lambda: plan_apply(state, batch, NOW))
    assert got == expected
    assert _canonical(state) == before, "plan_apply must not modify its input"
    if got[0] is None:
        result, changes = plan_apply(state, batch, NOW)
        assert _canonical(result) == _canonical(naive)
        # The delta a store applies in place gives the same state.
        delta, delta_changes = plan_delta(state, batch, NOW)
        in_place = dict(state)
        apply_delta(in_place, delta)
        assert _canonical(in_place) == _canonical(result)
        assert delta_changes == changes


def test_generated_batches_reach_every_outcome() -> None:
    """The generators must produce accepted writes and both kinds of state errors."""
    seen: set[type[BaseException] | None] = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(state=states, batch=st.lists(mutations, min_size=1, max_size=6))
    def collect(state: dict[Key, registry_pb2.Entity], batch: list[registry_pb2.Mutation]) -> None:
        seen.add(_outcome(lambda: plan_apply(state, batch, NOW))[0])

    collect()
    names = {t.__name__ if t else None for t in seen}
    assert {None, "PreconditionFailed", "ValidationError"} <= names


def _alias(name: str, region: str = "") -> registry_pb2.Entity:
    targets = _targets([("m", "v1")])
    per_region = {region: targets} if region else {}
    return registry_pb2.Entity(
        alias=registry_pb2.Alias(name=name, default_targets=targets, region_targets=per_region)
    )


def _delete(kind: int, id: str) -> registry_pb2.Mutation:
    return registry_pb2.Mutation(delete=registry_pb2.EntityKey(kind=kind, id=id))  # type: ignore[arg-type]


# One case per way an untouched entity can break: (referrer, write, error it must raise).
REFERRER_CASES = [
    (_alias("canary", "eu"), _delete(REGION, "eu"), "alias 'canary' references unknown region"),
    (
        registry_pb2.Entity(
            placement=registry_pb2.Placement(model="m", version="v1", region="eu", pool="p")
        ),
        _delete(REGION, "eu"),
        "placement 'm@v1/eu/p' references unknown region",
    ),
    (
        registry_pb2.Entity(replica=registry_pb2.Replica(id="r0", region="eu", endpoint="h:1")),
        _delete(REGION, "eu"),
        "replica 'r0' references unknown region",
    ),
    (
        registry_pb2.Entity(
            version=registry_pb2.Version(
                model="n", version="v1", artifact_digest=_digest("n", "v1")
            )
        ),
        _delete(MODEL, "n"),
        "version 'n@v1' references unknown model",
    ),
    (
        registry_pb2.Entity(
            model=registry_pb2.Model(id="n", kind=common_pb2.MODEL_KIND_LLM, fallback_model="o")
        ),
        _delete(MODEL, "o"),
        "model 'n' references unknown model",
    ),
    (_alias("canary"), _delete(VERSION, "m@v1"), "alias 'canary' references unknown version"),
    (
        registry_pb2.Entity(
            placement=registry_pb2.Placement(model="m", version="v1", region="us", pool="p")
        ),
        _delete(VERSION, "m@v1"),
        "placement 'm@v1/us/p' references unknown version",
    ),
    (
        _alias("o"),
        registry_pb2.Mutation(
            put=registry_pb2.Entity(
                model=registry_pb2.Model(id="o", kind=common_pb2.MODEL_KIND_LLM)
            )
        ),
        "'o' collides with a model id",
    ),
]


@pytest.mark.parametrize(("referrer", "write", "error"), REFERRER_CASES)
def test_writes_that_break_an_untouched_referrer_are_refused(
    referrer: registry_pb2.Entity, write: registry_pb2.Mutation, error: str
) -> None:
    base = [
        registry_pb2.Entity(region=registry_pb2.Region(id=r, residency_zone="z"))
        for r in ("us", "eu")
    ]
    base += [
        registry_pb2.Entity(model=registry_pb2.Model(id=m, kind=common_pb2.MODEL_KIND_LLM))
        for m in ("m", "n")
    ]
    base.append(
        registry_pb2.Entity(
            version=registry_pb2.Version(
                model="m", version="v1", artifact_digest=_digest("m", "v1")
            )
        )
    )
    if referrer.WhichOneof("entity") == "model":  # its fallback must exist first
        base.append(
            registry_pb2.Entity(model=registry_pb2.Model(id="o", kind=common_pb2.MODEL_KIND_LLM))
        )
    state = {entity_key(e): e for e in [*base, referrer]}
    validate_state(state)
    got = _outcome(lambda: plan_apply(state, [write], NOW))
    assert got == _outcome(lambda: validate_state(_naive_result(state, [write])))
    assert error in got[1]


def test_deleting_a_region_finds_replicas_referring_to_it() -> None:
    state = {
        (REGION, "us"): registry_pb2.Entity(
            region=registry_pb2.Region(id="us", residency_zone="z")
        ),
        **{
            (REPLICA, f"r{i}"): registry_pb2.Entity(
                replica=registry_pb2.Replica(id=f"r{i}", region="us", endpoint="h:1")
            )
            for i in range(100)
        },
    }
    delete = registry_pb2.Mutation(delete=registry_pb2.EntityKey(kind=REGION, id="us"))
    got = _outcome(lambda: plan_apply(state, [delete], NOW))
    assert got == (
        _outcome(lambda: validate_state(_naive_result(state, [delete])))[0],
        "replica 'r0' references unknown region 'us'",
    )
