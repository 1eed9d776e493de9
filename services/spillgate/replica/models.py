"""Simulated model backends: validate a request against the model config, then compute.

A backend turns one validated request into responses: exactly one for ordinary models,
zero or more followed by a final flag for decoupled ones. The server adapter owns the wire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from spillgate.replica.errors import invalid_arg
from spillgate.replica.tensors import OutputTensor, config_dtype

Params = dict[str, bool | int | float | str]


@dataclass
class Request:
    """One inference request, decoded and validated against the model's config."""

    model: str
    id: str
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: list[str]
    parameters: Params
    batch_size: int = 1
    correlation_id: int | str = 0
    sequence_start: bool = False
    sequence_end: bool = False
    queue_ns: int = 0  # time spent waiting for an engine slot (set by the backend)


@dataclass
class Response:
    outputs: list[OutputTensor] = field(default_factory=list)
    parameters: Params = field(default_factory=dict)
    final: bool = True


def _dims_match(expected: list[int], got: tuple[int, ...]) -> bool:
    if len(expected) != len(got):
        return False
    return all(e == -1 or e == g for e, g in zip(expected, got, strict=True))


def _fmt(shape: list[int] | tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def validate(
    config: mc.ModelConfig,
    decoded: dict[str, tuple[str, np.ndarray[Any, Any]]],
    requested: list[str],
    request_id: str = "",
) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
    """Check outputs, inputs, batch, dtypes and shapes in the order Triton's normalizer does.

    Returns the input arrays and the batch size (1 for models without batching).
    """
    name = config.name
    tag = f"[request id: {request_id or '<id_unknown>'}] "
    declared_outputs = {o.name for o in config.output}
    for out in requested:
        if out not in declared_outputs:
            raise invalid_arg(f"unexpected inference output '{out}' for model '{name}'")
    declared = {i.name: i for i in config.input}
    required = [i.name for i in config.input if not i.optional]
    missing = [r for r in required if r not in decoded]
    count_ok = len(required) <= len(decoded) <= len(declared)
    if count_ok:
        for given in decoded:
            if given not in declared:
                raise invalid_arg(f"unexpected inference input '{given}' for model '{name}'")
    if not count_ok or missing:
        if len(required) == len(declared):
            expected = f"expected {len(required)} inputs"
        else:
            expected = f"expected number of inputs between {len(required)} and {len(declared)}"
        raise invalid_arg(
            f"{tag}{expected} but got {len(decoded)} inputs for model '{name}'. Got inputs "
            f"{list(decoded)}, but missing required inputs {missing}. Please provide all "
            f"required inputs."
        )
    batch = 0
    if config.max_batch_size > 0:
        for input_name, (_, arr) in decoded.items():
            if arr.ndim == 0:
                raise invalid_arg(
                    f"{tag}input '{input_name}' has no shape but model requires batch "
                    f"dimension for '{name}'"
                )
            if batch and arr.shape[0] != batch:
                raise invalid_arg(
                    f"{tag}input '{input_name}' batch size does not match other inputs for '{name}'"
                )
            batch = int(arr.shape[0])
        if batch < 1 or batch > config.max_batch_size:
            raise invalid_arg(
                f"{tag}inference request batch-size must be <= {config.max_batch_size} for '{name}'"
            )
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for input_name, (dtype, arr) in decoded.items():
        spec = declared[input_name]
        want = config_dtype(spec.data_type)
        if dtype != want:
            raise invalid_arg(
                f"{tag}inference input '{input_name}' data-type is '{dtype}', but model "
                f"'{name}' expects '{want}'"
            )
        shape = tuple(arr.shape)[1:] if config.max_batch_size > 0 else tuple(arr.shape)
        if not _dims_match(list(spec.dims), shape):
            full = [-1, *spec.dims] if config.max_batch_size > 0 else list(spec.dims)
            note = (
                " NOTE: Setting a non-zero max_batch_size in the model config requires a batch "
                "dimension to be prepended to each input shape. If you want to specify the full "
                "shape including the batch dim in your input dims config, try setting "
                "max_batch_size to zero. See the model configuration docs for more info on "
                "max_batch_size."
                if config.max_batch_size > 0
                else ""
            )
            raise invalid_arg(
                f"{tag}unexpected shape for input '{input_name}' for model '{name}'. Expected "
                f"{_fmt(full)}, got {_fmt(arr.shape)}.{note}"
            )
        arrays[input_name] = arr
    return arrays, max(batch, 1)


class Backend:
    """Computes a model. Subclasses override `execute`."""

    def __init__(self, config: mc.ModelConfig) -> None:
        self.config = config
        self.decoupled = config.model_transaction_policy.decoupled
        self.sequence = config.HasField("sequence_batching")
        # Looked up once: outputs are built on every response (every token for an LLM).
        self._output_dtypes = {o.name: config_dtype(o.data_type) for o in config.output}

    async def execute(self, request: Request) -> AsyncIterator[Response]:
        raise NotImplementedError
        yield Response()  # pragma: no cover

    async def close(self) -> None:
        """Release what the backend holds (called on unload)."""

    def output(self, name: str, value: np.ndarray[Any, Any]) -> OutputTensor:
        return OutputTensor(name, value, self._output_dtypes[name])


class AddSub(Backend):
    """`simple`, `simple_int8`, `simple_string`: OUTPUT0 = IN0 + IN1, OUTPUT1 = IN0 - IN1."""

    async def execute(self, request: Request) -> AsyncIterator[Response]:
        a, b = request.inputs["INPUT0"], request.inputs["INPUT1"]
        if a.dtype == np.object_:
            try:
                x, y = a.astype(np.int64), b.astype(np.int64)
            except (ValueError, OverflowError):
                raise invalid_arg(
                    f"unable to parse the string inputs of model '{self.config.name}' as integers"
                ) from None
            total = np.array([str(v).encode() for v in (x + y).flat], dtype=np.object_)
            diff = np.array([str(v).encode() for v in (x - y).flat], dtype=np.object_)
            yield Response(
                [
                    self.output("OUTPUT0", total.reshape(a.shape)),
                    self.output("OUTPUT1", diff.reshape(a.shape)),
                ]
            )
            return
        # Fixed-width types wrap around on overflow, as the compiled model does.
        yield Response(
            [
                self.output("OUTPUT0", (a + b).astype(a.dtype)),
                self.output("OUTPUT1", (a - b).astype(a.dtype)),
            ]
        )


class Identity(Backend):
    """`simple_identity`: OUTPUT0 = INPUT0."""

    async def execute(self, request: Request) -> AsyncIterator[Response]:
        yield Response([self.output("OUTPUT0", request.inputs["INPUT0"])])


class Sequence(Backend):
    """`simple_sequence` / `simple_dyna_sequence`, as the stock sequence clients expect them.

    OUTPUT = INPUT + 1 on the sequence's START request, else INPUT; the dyna variant also adds
    the correlation id on the END request. The sequence batcher's rules still apply: a
    sequence must begin with START, and one idle longer than the configured timeout is gone.
    """

    def __init__(self, config: mc.ModelConfig, dyna: bool) -> None:
        super().__init__(config)
        self.dyna = dyna
        self.active: dict[int | str, float] = {}  # correlation id -> last seen (monotonic s)
        idle_us = config.sequence_batching.max_sequence_idle_microseconds or 1_000_000
        self.idle_s = idle_us / 1e6

    async def execute(self, request: Request) -> AsyncIterator[Response]:
        now = time.monotonic()
        for key in [k for k, seen in self.active.items() if now - seen > self.idle_s]:
            del self.active[key]
        cid = request.correlation_id
        if not request.sequence_start and cid not in self.active:
            raise invalid_arg(
                f"inference request for sequence {cid} to model '{self.config.name}' must "
                f"specify the START flag on the first request of the sequence"
            )
        if request.sequence_end:
            self.active.pop(cid, None)
        else:
            self.active[cid] = now
        result = request.inputs["INPUT"].astype(np.int64) + int(request.sequence_start)
        if self.dyna and request.sequence_end:
            result += int(cid) if isinstance(cid, int) else 0
        yield Response([self.output("OUTPUT", result.astype(np.int32))])


class Repeat(Backend):
    """`repeat_int32` (decoupled): one response per element of IN, each after DELAY[i] ms.

    OUT = IN[i], IDX = i. The request is held at least WAIT ms; the final flag travels alone,
    after the last data response (Triton drops it unless the client asked for it).
    """

    async def execute(self, request: Request) -> AsyncIterator[Response]:
        start = time.monotonic()
        values = request.inputs["IN"].reshape(-1)
        delays = request.inputs["DELAY"].reshape(-1)
        if request.inputs["WAIT"].size != 1:
            raise invalid_arg("unexpected size for WAIT input")
        wait = int(request.inputs["WAIT"].reshape(-1)[0])
        if delays.size != values.size:
            raise invalid_arg(
                f"expected IN and DELAY shape to match, got {list(values.shape)} and "
                f"{list(delays.shape)}"
            )
        for i, value in enumerate(values):
            await asyncio.sleep(float(delays[i]) / 1000.0)
            yield Response(
                [
                    self.output("OUT", np.array([value], dtype=np.int32)),
                    self.output("IDX", np.array([i], dtype=np.uint32)),
                ],
                final=False,
            )
        await asyncio.sleep(max(0.0, wait / 1000.0 - (time.monotonic() - start)))
        yield Response(final=True)


def builtin_backend(config: mc.ModelConfig, behaviour: str) -> Backend:
    """The simulator backend computing `behaviour` for this config."""
    if behaviour == "add_sub":
        return AddSub(config)
    if behaviour == "identity":
        return Identity(config)
    if behaviour in ("sequence", "dyna_sequence"):
        return Sequence(config, dyna=behaviour == "dyna_sequence")
    if behaviour == "repeat":
        if config.max_batch_size != 0:
            raise invalid_arg("repeat backend only supports models with max_batch_size == 0")
        return Repeat(config)
    raise invalid_arg(
        f"unable to find backend '{behaviour}' (the simulator serves: add_sub, identity, "
        f"sequence, dyna_sequence, repeat, vllm)"
    )
