"""The simulated model repository: what can load, what is loaded, explicit load/unload."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from spillgate.core.engine import EngineConfig
from spillgate.replica.catalog import BEHAVIOUR, EXAMPLES, llm_config, to_proto
from spillgate.replica.config import ReplicaConfig
from spillgate.replica.errors import TritonError, internal, invalid_arg
from spillgate.replica.llm import EngineRunner, LLMBackend, LLMSettings
from spillgate.replica.models import Backend, builtin_backend
from spillgate.replica.stats import ModelStats

VERSION = "1"


@dataclass
class LoadedModel:
    name: str
    version: str
    config: mc.ModelConfig
    backend: Backend
    stats: ModelStats = field(default_factory=ModelStats)
    runner: EngineRunner | None = None


class Repository:
    """Models known to the replica and the ones currently loaded (Triton explicit mode)."""

    def __init__(self, config: ReplicaConfig) -> None:
        self._config = config
        self.loaded: dict[str, LoadedModel] = {}
        self.unavailable: dict[str, str] = {}  # name -> reason (unloaded / failed to load)
        self.slow_factor = 1.0

    def get(self, name: str, version: str) -> LoadedModel:
        """The loaded model for a request, or Triton's lookup error."""
        if version:
            try:
                number = int(version)
            except ValueError:
                raise invalid_arg(
                    f"failed to get model version from specified version string '{version}' "
                    f"(details: stol), version should be an integral value > 0"
                ) from None
            if number <= 0 and number != -1:
                raise invalid_arg(
                    f"invalid model version specified '{version}' , version should be an "
                    f"integral value > 0"
                )
        prefix = f"Request for unknown model: '{name}'"
        model = self.loaded.get(name)
        if model is None:
            if name in self.unavailable:
                raise TritonError(grpc.StatusCode.NOT_FOUND, f"{prefix} has no available versions")
            raise TritonError(grpc.StatusCode.NOT_FOUND, f"{prefix} is not found")
        if version not in ("", "-1", model.version):
            raise TritonError(grpc.StatusCode.NOT_FOUND, f"{prefix} version {version} is not found")
        return model

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) per model; never-loaded models carry only a name."""
        rows = []
        for name in sorted({*self._config.repository(), *self.loaded, *self.unavailable}):
            if name in self.loaded:
                rows.append((name, VERSION, "READY", ""))
            elif name in self.unavailable:
                rows.append((name, VERSION, "UNAVAILABLE", self.unavailable[name]))
            else:
                rows.append((name, "", "", ""))
        return rows

    def _source(
        self, name: str, override: str | None
    ) -> tuple[dict[str, Any], str, LLMSettings | None]:
        """(config dict, behaviour, LLM settings) for a model name and optional override."""
        llm = self._config.llms.get(name)
        if override is not None:
            try:
                data = json.loads(override)
                if not isinstance(data, dict):
                    raise ValueError("not an object")
            except ValueError:
                raise internal(
                    f"failed to load '{name}', failed to poll from model repository"
                ) from None
            data.setdefault("name", name)
            behaviour = str(data.get("backend") or BEHAVIOUR.get(name, "vllm" if llm else ""))
            if behaviour == "vllm" and llm is None:
                llm = LLMSettings(engine=EngineConfig())
            return data, behaviour, llm
        if llm is not None:
            return llm_config(name), "vllm", llm
        if name in EXAMPLES:
            return EXAMPLES[name], BEHAVIOUR[name], None
        raise internal(f"failed to load '{name}', failed to poll from model repository")

    async def load(self, name: str, override: str | None = None) -> LoadedModel:
        """Load (or reload) a model, optionally with a JSON config override.

        A failed reload leaves the previously loaded model serving, like Triton.
        """
        data, behaviour, llm = self._source(name, override)
        try:
            config = to_proto(data)
        except json_format.ParseError:
            raise internal(
                f"failed to load '{name}', failed to poll from model repository"
            ) from None
        try:
            if config.name != name:
                raise invalid_arg(f"config name '{config.name}' does not match the model name")
            runner = None
            backend: Backend
            if behaviour == "vllm":
                assert llm is not None
                runner = EngineRunner(llm.engine, self._config.speed, self._config.seed)
                runner.set_slow_factor(self.slow_factor)
                backend = LLMBackend(config, llm, runner)
            else:
                backend = builtin_backend(config, behaviour)
        except TritonError as exc:
            if name not in self.loaded:
                self.unavailable[name] = exc.message
            raise invalid_arg(f"load failed for model '{name}': {exc.message}\n") from None
        await self.unload(name)
        model = LoadedModel(name, VERSION, config, backend, runner=runner)
        if runner is not None:
            runner.start()
        self.loaded[name] = model
        self.unavailable.pop(name, None)
        return model

    async def unload(self, name: str) -> None:
        """Unload a model; unloading a model that is not loaded succeeds, as in Triton."""
        model = self.loaded.pop(name, None)
        if model is None:
            return
        if model.runner is not None:
            await model.runner.stop()
        await model.backend.close()
        self.unavailable[name] = "unloaded"

    def set_slow_factor(self, factor: float) -> None:
        self.slow_factor = factor
        for model in self.loaded.values():
            if model.runner is not None:
                model.runner.set_slow_factor(factor)
