"""Fleet spec files: what `spillgate up` runs (pure: parse and validate, no processes).

A fleet spec is a registry spec (``[[region]]``, ``[[model]]``, ``[[version]]``,
``[[alias]]``, ``[[placement]]``; parsed by ``registry.spec.parse_spec``) plus what only a
local fleet needs::

    [fleet]
    speed = 10.0              # replica simulators: model time / wall time
    replica_config = "r.toml" # simulator models and timing (default: the built-in one)
    lease_ms = 3000           # replica registry leases (heartbeats every third of it)
    startup_timeout_s = 60    # per start-up phase
    emulate_rtt = true        # inter-region hops are delayed by the region RTT (Envoy's
                              # fault filter on the mesh; the gateway itself without Envoy)
    envoy = true              # run the control plane and an ingress + mesh Envoy per region
    model = "chat"            # what `spillgate chat` asks for
    tenant = "dev"            # tenant of the dev API key

    [sla]
    budget_ms = { critical = 1200, high = 1200, normal = 1200, low = 5000, batch = 30000 }

    [[region]]
    id = "us"
    residency_zone = "us"
    rtt_ms = { eu = 80.5 }
    replicas = 4              # simulator replicas started in this region
    admissions = 1            # admission instances (several need Envoy: the region's mesh
                              # ring-hashes x-session-id onto one of them)

Each replica of a region loads every version placed in that region (``[[placement]]``)
and is registered with those versions. Endpoints and replicas are not written in the spec:
`spillgate up` fills them in. Every error names the table, index and field.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from spillgate._proto import registry_pb2
from spillgate.fleet import _toml
from spillgate.registry import spec as registry_spec
from spillgate.replica import config as replica_config

DEFAULT_SPEC = "default.toml"
PRIORITIES = ("critical", "high", "normal", "low", "batch")
_FLEET_KEYS = {
    "speed",
    "replica_config",
    "lease_ms",
    "startup_timeout_s",
    "emulate_rtt",
    "envoy",
    "model",
    "tenant",
}
_TOP = {"fleet", "sla", "region", "model", "version", "alias", "placement"}
_FILLED_IN = (
    "gateway_endpoint",
    "gateway_http_endpoint",
    "admission_endpoint",
    "admission_endpoints",
)
MAX_REPLICAS_PER_REGION = 64
MAX_ADMISSIONS_PER_REGION = 8


class FleetSpecError(ValueError):
    """A fleet spec is invalid; the message names the file, table and field."""


@dataclass(frozen=True)
class RegionPlan:
    """One region as the fleet runs it."""

    id: str
    replicas: int
    versions: tuple[tuple[str, str], ...]  # (model, version) placed here: what replicas load
    triton_models: tuple[str, ...]  # their Triton model names, what the simulators load
    admissions: int = 1  # admission instances


@dataclass(frozen=True)
class FleetSpec:
    """A validated fleet spec."""

    source: str  # file name or "<built-in default.toml>", for messages
    regions: tuple[RegionPlan, ...]
    entities: tuple[registry_pb2.Entity, ...]  # the registry part, regions without endpoints
    speed: float = 1.0
    lease_ms: int = 3000
    startup_timeout_s: float = 60.0
    emulate_rtt: bool = True
    model: str = "chat"
    tenant: str = "dev"
    budgets_ms: Mapping[str, float] = field(default_factory=dict)
    replica_base: Mapping[str, Any] = field(default_factory=dict)  # raw replica TOML
    envoy: bool = True

    def replica_config_text(self, region: str) -> str:
        """The replica TOML for `region`'s simulators: the base with this speed and load."""
        plan = next(r for r in self.regions if r.id == region)
        doc = {**self.replica_base, "speed": self.speed, "load": list(plan.triton_models)}
        return _toml.dumps(doc)

    def region_entity(self, region: str) -> registry_pb2.Entity:
        """A copy of the spec's region entity (callers add the endpoints)."""
        for e in self.entities:
            if e.WhichOneof("entity") == "region" and e.region.id == region:
                copy = registry_pb2.Entity()
                copy.CopyFrom(e)
                return copy
        raise KeyError(region)

    def budget_ms(self, priority: str) -> float:
        return float(self.budgets_ms.get(priority, 0.0))


def _number(where: str, value: object, *, integer: bool = False, minimum: float = 0.0) -> float:
    """A finite number (`integer`: an int >= minimum; else a number > minimum)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise FleetSpecError(f"{where} must be {kind}, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or (number < minimum if integer else number <= minimum):
        bound = f">= {minimum:g}" if integer else f"> {minimum:g}"
        raise FleetSpecError(f"{where} must be {kind} {bound}, got {value!r}")
    return number


def _string(where: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise FleetSpecError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _tables(doc: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    tables = doc.get(kind, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise FleetSpecError(f"{kind}: must be an array of tables ([[{kind}]])")
    return [dict(t) for t in tables]


def _replica_base(fleet: Mapping[str, Any], base_dir: Path | None) -> tuple[dict[str, Any], str]:
    path = fleet.get("replica_config")
    if path is None:
        res = resources.files("spillgate.replica").joinpath(replica_config.DEFAULT_CONFIG)
        return tomllib.loads(res.read_text()), f"<built-in replica {replica_config.DEFAULT_CONFIG}>"
    file = Path(_string("fleet.replica_config", path))
    if not file.is_absolute() and base_dir is not None:
        file = base_dir / file
    try:
        text = file.read_text()
    except OSError as exc:
        raise FleetSpecError(f"fleet.replica_config: cannot read {file}: {exc.strerror}") from None
    try:
        return tomllib.loads(text), str(file)
    except tomllib.TOMLDecodeError as exc:
        raise FleetSpecError(f"fleet.replica_config: {file}: not valid TOML: {exc}") from None


def _parse(doc: dict[str, Any], source: str, base_dir: Path | None) -> FleetSpec:
    unknown = sorted(set(doc) - _TOP)
    if "replica" in unknown:
        raise FleetSpecError(
            "[[replica]] tables are not allowed: `spillgate up` starts and registers the "
            "replicas; set `replicas = N` in each [[region]]"
        )
    if unknown:
        raise FleetSpecError(
            f"unknown table(s) {', '.join(unknown)}; a fleet spec has {', '.join(sorted(_TOP))}"
        )
    fleet = doc.get("fleet", {})
    if not isinstance(fleet, dict):
        raise FleetSpecError("fleet: must be a table ([fleet])")
    bad = sorted(set(fleet) - _FLEET_KEYS)
    if bad:
        raise FleetSpecError(
            f"fleet: unknown key(s) {', '.join(bad)} (known: {', '.join(sorted(_FLEET_KEYS))})"
        )
    speed = _number("fleet.speed", fleet.get("speed", 1.0))
    lease_ms = int(
        _number("fleet.lease_ms", fleet.get("lease_ms", 3000), integer=True, minimum=300)
    )
    startup = _number("fleet.startup_timeout_s", fleet.get("startup_timeout_s", 60.0))
    emulate = fleet.get("emulate_rtt", True)
    if not isinstance(emulate, bool):
        raise FleetSpecError(f"fleet.emulate_rtt must be true or false, got {emulate!r}")
    envoy = fleet.get("envoy", True)
    if not isinstance(envoy, bool):
        raise FleetSpecError(f"fleet.envoy must be true or false, got {envoy!r}")
    model = _string("fleet.model", fleet.get("model", "chat"))
    tenant = _string("fleet.tenant", fleet.get("tenant", "dev"))

    sla = doc.get("sla", {})
    if not isinstance(sla, dict) or set(sla) - {"budget_ms"}:
        raise FleetSpecError("sla: must be a table with one key, budget_ms")
    raw_budgets = sla.get("budget_ms", {})
    if not isinstance(raw_budgets, dict):
        raise FleetSpecError("sla.budget_ms must be a table: { normal = 1200, ... }")
    budgets: dict[str, float] = {}
    for name, ms in raw_budgets.items():
        if name not in PRIORITIES:
            raise FleetSpecError(
                f"sla.budget_ms.{name}: unknown priority (one of: {', '.join(PRIORITIES)})"
            )
        budgets[name] = _number(f"sla.budget_ms.{name}", ms)

    # Fleet-only region fields come off before the registry parser sees the tables.
    regions = _tables(doc, "region")
    if not regions:
        raise FleetSpecError("region: a fleet needs at least one [[region]]")
    counts: dict[str, int] = {}
    admissions: dict[str, int] = {}
    for i, table in enumerate(regions):
        rid = _string(f"region[{i}].id", table.get("id"))
        if rid in counts:
            raise FleetSpecError(f"region[{i}].id: duplicate region {rid!r}")
        for key in _FILLED_IN:
            if key in table:
                raise FleetSpecError(f"region[{i}].{key}: leave it out; `spillgate up` fills it in")
        if not table.get("residency_zone"):
            raise FleetSpecError(f"region[{i}].residency_zone: must be set (e.g. {rid!r})")
        counts[rid] = int(
            _number(f"region[{i}].replicas", table.pop("replicas", 1), integer=True, minimum=0)
        )
        if counts[rid] > MAX_REPLICAS_PER_REGION:
            raise FleetSpecError(
                f"region[{i}].replicas: at most {MAX_REPLICAS_PER_REGION}, got {counts[rid]}"
            )
        admissions[rid] = int(
            _number(f"region[{i}].admissions", table.pop("admissions", 1), integer=True, minimum=1)
        )
        if admissions[rid] > MAX_ADMISSIONS_PER_REGION:
            raise FleetSpecError(
                f"region[{i}].admissions: at most {MAX_ADMISSIONS_PER_REGION}, "
                f"got {admissions[rid]}"
            )
        if admissions[rid] > 1 and not envoy:
            raise FleetSpecError(
                f"region[{i}].admissions: {admissions[rid]} instances need fleet.envoy = true "
                "(the region's mesh Envoy ring-hashes sessions onto them)"
            )
    for i, table in enumerate(regions):
        rtt = table.get("rtt_ms", {})
        if not isinstance(rtt, dict):
            raise FleetSpecError(f"region[{i}].rtt_ms must be a table: {{ peer = ms, ... }}")
        for peer in rtt:
            if peer not in counts or peer == table["id"]:
                raise FleetSpecError(
                    f"region[{i}].rtt_ms.{peer}: not another region of this fleet "
                    f"({', '.join(r for r in counts if r != table['id']) or 'none'})"
                )
        missing = [p for p in counts if p != table["id"] and p not in rtt]
        if missing:
            raise FleetSpecError(
                f"region[{i}].rtt_ms: missing the RTT to {', '.join(missing)} "
                "(overflow needs it to fit the round trip into the budget)"
            )

    registry_doc = {k: regions if k == "region" else _tables(doc, k) for k in registry_spec.KINDS}
    registry_doc.pop("replica")
    try:
        entities = registry_spec.parse_spec(_toml.dumps(registry_doc))
    except registry_spec.SpecError as exc:
        raise FleetSpecError(str(exc)) from None

    models = {e.model.id: e.model for e in entities if e.WhichOneof("entity") == "model"}
    versions = {
        (e.version.model, e.version.version): e.version
        for e in entities
        if e.WhichOneof("entity") == "version"
    }
    aliases = {e.alias.name for e in entities if e.WhichOneof("entity") == "alias"}
    for i, m in enumerate(e.model for e in entities if e.WhichOneof("entity") == "model"):
        if m.fallback_model and m.fallback_model not in models:
            raise FleetSpecError(f"model[{i}].fallback_model: unknown model {m.fallback_model!r}")
    for i, ref in enumerate(versions):
        if ref[0] not in models:
            raise FleetSpecError(f"version[{i}].model: unknown model {ref[0]!r}")
    if model not in aliases and model not in models and model.split("@")[0] not in models:
        raise FleetSpecError(f"fleet.model: {model!r} is neither an alias nor a model")

    base, base_name = _replica_base(fleet, base_dir)
    placed: dict[str, list[tuple[str, str]]] = {r: [] for r in counts}
    placements = [e.placement for e in entities if e.WhichOneof("entity") == "placement"]
    for i, p in enumerate(placements):
        if p.region not in counts:
            raise FleetSpecError(f"placement[{i}].region: unknown region {p.region!r}")
        if (p.model, p.version) not in versions:
            raise FleetSpecError(
                f"placement[{i}]: unknown version {p.model}@{p.version} (add a [[version]])"
            )
        if (p.model, p.version) not in placed[p.region]:
            placed[p.region].append((p.model, p.version))
    plans: list[RegionPlan] = []
    for rid, n in counts.items():
        if n and not placed[rid]:
            raise FleetSpecError(
                f"region {rid!r} runs {n} replica(s) but no [[placement]] puts a version there"
            )
        triton = tuple(dict.fromkeys(versions[v].triton_model_name or v[0] for v in placed[rid]))
        plans.append(RegionPlan(rid, n, tuple(placed[rid]), triton, admissions[rid]))
    spec = FleetSpec(
        source,
        tuple(plans),
        tuple(entities),
        speed,
        lease_ms,
        startup,
        emulate,
        model,
        tenant,
        budgets,
        base,
        envoy,
    )
    for plan in plans:
        if not plan.replicas:
            continue
        try:
            replica_config.parse(spec.replica_config_text(plan.id), base_name)
        except replica_config.ConfigError as exc:
            raise FleetSpecError(f"replicas of region {plan.id!r}: {exc}") from None
    return spec


def parse_fleet_spec(
    text: str, source: str = "<fleet spec>", base_dir: Path | None = None
) -> FleetSpec:
    """Parse and validate a fleet spec; raises FleetSpecError (message starts with `source`).

    `base_dir` resolves a relative `fleet.replica_config`.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FleetSpecError(f"{source}: not valid TOML: {exc}") from None
    try:
        return _parse(doc, source, base_dir)
    except FleetSpecError as exc:
        raise FleetSpecError(f"{source}: {exc}") from None


def load_fleet_spec(path: Path | None) -> FleetSpec:
    """Read a fleet spec file, or the built-in default when `path` is None."""
    if path is None:
        text = resources.files("spillgate.fleet").joinpath(DEFAULT_SPEC).read_text()
        return parse_fleet_spec(text, f"<built-in {DEFAULT_SPEC}>")
    try:
        text = path.read_text()
    except OSError as exc:
        raise FleetSpecError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_fleet_spec(text, str(path), path.parent)
