"""Registry spec files: the declarative TOML form of registry entities (pure, no I/O).

A spec has one array of tables per entity kind, with the proto field names of
registry.proto; enums take their short lower-case names (``kind = "llm"``,
``backend = "triton-vllm"``, ``state = "ready"``) and alias target lists may be written
directly as arrays::

    [[region]]
    id = "us"
    residency_zone = "us"
    location = { latitude_deg = 38.9, longitude_deg = -77.0 }
    rtt_ms = { eu = 80, apac = 150 }

    [[model]]
    id = "llm-large"
    kind = "llm"
    max_context_tokens = 8192
    max_output_tokens = 1024
    fallback_model = "llm-small"

    [[version]]
    model = "llm-large"
    version = "v1"
    artifact_digest = "sha256:<64 hex>"
    triton_model_name = "llm-large"

    [[alias]]
    name = "chat"
    default_targets = [{ model = "llm-large", version = "v1", weight = 100 }]
    region_targets = { eu = [{ model = "llm-large", version = "v1", weight = 100 }] }

    [[placement]]
    model = "llm-large"
    version = "v1"
    region = "us"
    pool = "default"
    min_replicas = 1
    max_replicas = 4

Parsing checks shape only (unknown tables and fields, types, enum names); the registry
validates references and rules when the spec is applied.
"""

from __future__ import annotations

import tomllib
from typing import Any

from google.protobuf import json_format

from spillgate._proto import common_pb2, registry_pb2

# Spec table name -> Entity oneof field, in dependency order (what a reader expects to see).
KINDS = ("region", "model", "version", "alias", "placement", "replica")

# Enum-typed fields: spec field -> (enum descriptor prefix, enum type).
_ENUMS: dict[tuple[str, str], tuple[str, Any]] = {
    ("model", "kind"): ("MODEL_KIND_", common_pb2.ModelKind),
    ("replica", "backend"): ("BACKEND_KIND_", common_pb2.BackendKind),
    ("replica", "state"): ("REPLICA_STATE_", common_pb2.ReplicaState),
}


class SpecError(ValueError):
    """A spec file is malformed; the message names the table, index and field."""


def enum_short_name(prefix: str, full: str) -> str:
    """ "MODEL_KIND_LLM" -> "llm", "BACKEND_KIND_TRITON_VLLM" -> "triton-vllm"."""
    return full.removeprefix(prefix).lower().replace("_", "-")


def _enum_value(where: str, prefix: str, enum: Any, value: object) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{where}: must be a string")
    full = prefix + value.upper().replace("-", "_")
    names = [n for n in enum.keys() if not n.endswith("_UNSPECIFIED")]  # noqa: SIM118
    if full not in names:
        allowed = ", ".join(enum_short_name(prefix, n) for n in names)
        raise SpecError(f"{where}: unknown value {value!r} (one of: {allowed})")
    return full


def _targets(value: object) -> object:
    # Allow `default_targets = [ ... ]` for `default_targets = { targets = [ ... ] }`.
    return {"targets": value} if isinstance(value, list) else value


def _entity(kind: str, index: int, table: object) -> registry_pb2.Entity:
    where = f"{kind}[{index}]"
    if not isinstance(table, dict):
        raise SpecError(f"{where}: must be a table ([[{kind}]])")
    body = dict(table)
    for (enum_kind, field), (prefix, enum) in _ENUMS.items():
        if enum_kind == kind and field in body:
            body[field] = _enum_value(f"{where}.{field}", prefix, enum, body[field])
    if kind == "alias":
        if "default_targets" in body:
            body["default_targets"] = _targets(body["default_targets"])
        if isinstance(body.get("region_targets"), dict):
            body["region_targets"] = {r: _targets(t) for r, t in body["region_targets"].items()}
    entity = registry_pb2.Entity()
    try:
        json_format.ParseDict(body, getattr(entity, kind))
    except json_format.ParseError as exc:
        # ParseError texts name the message and field ("... has no field named ...").
        raise SpecError(f"{where}: {exc}") from None
    return entity


def parse_spec(text: str) -> list[registry_pb2.Entity]:
    """The entities a spec describes, kinds in dependency order, each kind in file order.

    Raises SpecError for TOML syntax errors, unknown top-level tables and malformed
    entities. Tables of other tools (e.g. a fleet file's `[fleet]`) are not allowed here:
    pass only the registry part.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - set(KINDS))
    if unknown:
        raise SpecError(
            f"unknown table(s) {', '.join(unknown)}; a registry spec has {', '.join(KINDS)}"
        )
    entities: list[registry_pb2.Entity] = []
    for kind in KINDS:
        tables = doc.get(kind, [])
        if not isinstance(tables, list):
            raise SpecError(f"{kind}: must be an array of tables ([[{kind}]])")
        entities += (_entity(kind, i, t) for i, t in enumerate(tables))
    return entities


def to_spec_dict(entity: registry_pb2.Entity) -> dict[str, Any]:
    """One entity as a spec table (the inverse of parsing; used for JSON output)."""
    kind = entity.WhichOneof("entity")
    if kind is None:
        return {}
    message = getattr(entity, kind)
    body: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    for (enum_kind, field), (prefix, _) in _ENUMS.items():
        if enum_kind == kind and field in body:
            body[field] = enum_short_name(prefix, body[field])
    return body
