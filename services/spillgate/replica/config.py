"""Replica configuration: which models the repository holds, which load at start, timing."""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from spillgate.core.engine import EngineConfig
from spillgate.replica.catalog import EXAMPLES
from spillgate.replica.llm import LLMSettings

DEFAULT_CONFIG = "default.toml"


@dataclass(frozen=True)
class ReplicaConfig:
    speed: float = 1.0  # model time runs this many times faster than wall time
    seed: int = 0  # jitter and fault-injection randomness
    load: tuple[str, ...] = ()  # models loaded at start (others wait for RepositoryModelLoad)
    llms: dict[str, LLMSettings] = field(default_factory=dict)

    def repository(self) -> list[str]:
        """Every model name the repository can load."""
        return sorted({*EXAMPLES, *self.llms})


class ConfigError(ValueError):
    """A replica config file is invalid; the message names the file and the field."""


def _check_types(table: dict[str, Any], defaults: dict[str, Any], where: str) -> None:
    """Each value must have its field's type: TOML `15` is fine for a float, `"15"` is not."""
    for key, value in table.items():
        want = type(defaults[key])
        if want is bool:
            ok = isinstance(value, bool)
        elif want is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
        else:
            ok = isinstance(value, want) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{where}: {key} must be a finite {want.__name__}, got {value!r}")


def _llm(name: str, table: Any, where: str) -> LLMSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [llm.{name}] must be a table")
    engine_keys = {f.name for f in fields(EngineConfig)}
    llm_keys = {f.name for f in fields(LLMSettings)} - {"engine"}
    unknown = sorted(set(table) - engine_keys - llm_keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in [llm.{name}]: {', '.join(unknown)}")
    defaults = {**asdict(EngineConfig()), **asdict(LLMSettings(EngineConfig()))}
    _check_types(table, defaults, f"{where}: [llm.{name}]")
    try:
        engine = EngineConfig(**{k: v for k, v in table.items() if k in engine_keys})
        engine.validate()
        settings = LLMSettings(engine, **{k: v for k, v in table.items() if k in llm_keys})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: [llm.{name}]: {exc}") from None
    if settings.natural_tokens_min < 1 or settings.natural_tokens_max < settings.natural_tokens_min:
        raise ConfigError(f"{where}: [llm.{name}]: need 1 <= natural_tokens_min <= max")
    return settings


def parse(text: str, where: str) -> ReplicaConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"speed", "seed", "load", "llm"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s): {', '.join(unknown)}")
    speed = data.get("speed", 1.0)  # NaN fails the range check too
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0 < speed < math.inf:
        raise ConfigError(f"{where}: speed must be a number > 0, got {speed!r}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"{where}: seed must be an integer, got {seed!r}")
    llm_tables = data.get("llm", {})
    if not isinstance(llm_tables, dict):
        raise ConfigError(f"{where}: [llm.NAME] must be tables")
    llms = {name: _llm(name, table, where) for name, table in llm_tables.items()}
    clash = sorted(set(llms) & set(EXAMPLES))
    if clash:
        raise ConfigError(f"{where}: [llm.{clash[0]}] reuses the name of an example model")
    load = data.get("load", [])
    if not isinstance(load, list) or not all(isinstance(n, str) for n in load):
        raise ConfigError(f"{where}: load must be a list of model names")
    known = {*EXAMPLES, *llms}
    missing = [n for n in load if n not in known]
    if missing:
        raise ConfigError(f"{where}: load names unknown model(s) {missing}; known: {sorted(known)}")
    return ReplicaConfig(float(speed), seed, tuple(load), llms)


def load_config(path: Path | None) -> ReplicaConfig:
    """Read a config file, or the built-in default (demo models) when path is None."""
    if path is None:
        text = resources.files("spillgate.replica").joinpath(DEFAULT_CONFIG).read_text()
        return parse(text, f"<built-in {DEFAULT_CONFIG}>")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, str(path))
