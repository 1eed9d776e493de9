"""An LLM model with the vLLM backend's tensor contract, timed by the shared engine model.

`EngineRunner` maps wall time to model time (x speed factor) and feeds engine events to the
requests waiting on them; `LLMBackend` turns a request into engine work and responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from spillgate.core.engine import (
    Engine,
    EngineConfig,
    EngineEvent,
    EngineStats,
    EventKind,
    SeqRequest,
    SubmitResult,
)
from spillgate.core.prefix import block_hashes, tokenize
from spillgate.replica.errors import internal, invalid_arg, unavailable
from spillgate.replica.models import Backend, Request, Response
from spillgate.replica.tensors import OutputTensor

# Words the simulated model "generates": deterministic per prompt, readable in demos.
_VOCAB = [
    "the",
    "quick",
    "routing",
    "mesh",
    "sends",
    "every",
    "request",
    "to",
    "the",
    "closest",
    "pool",
    "that",
    "can",
    "still",
    "meet",
    "its",
    "budget",
    "and",
    "spills",
    "only",
    "when",
    "the",
    "round",
    "trip",
    "fits",
    "while",
    "queues",
    "stay",
    "bounded",
    "and",
    "nothing",
    "is",
    "dropped",
]


@dataclass(frozen=True)
class LLMSettings:
    """How one simulated LLM behaves, beyond the engine timing model."""

    engine: EngineConfig
    default_max_tokens: int = 16  # vLLM SamplingParams default
    max_model_tokens: int = 8192  # prompt + output limit, like vLLM's max_model_len
    natural_tokens_min: int = 8  # output length when the model stops on its own (no ignore_eos)
    natural_tokens_max: int = 256


class EngineRunner:
    """Drives one `Engine` in real time: model ms = wall ms x rate (speed / slow factor)."""

    def __init__(
        self,
        config: EngineConfig,
        speed: float,
        seed: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = Engine(config, random.Random(seed))
        self._clock = clock
        self._speed = speed
        self._rate = speed
        self._wall0 = clock()
        self._model0 = 0.0
        self._queues: dict[str, asyncio.Queue[EngineEvent]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def now(self) -> float:
        return self._model0 + (self._clock() - self._wall0) * 1000.0 * self._rate

    def to_wall_s(self, model_ms: float) -> float:
        return model_ms / 1000.0 / self._rate

    def set_slow_factor(self, factor: float) -> None:
        """Slow mode: model time runs `factor` x slower from now on (continuous)."""
        self._model0, self._wall0 = self.now(), self._clock()
        self._rate = self._speed / max(factor, 1e-6)
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def submit(self, req: SeqRequest) -> tuple[SubmitResult, asyncio.Queue[EngineEvent]]:
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        result = self.engine.submit(req, self.now())
        if result is SubmitResult.ACCEPTED:
            self._queues[req.id] = queue
            self._wake.set()
        return result, queue

    def cancel(self, seq_id: str) -> None:
        if self._queues.pop(seq_id, None) is not None:
            self.engine.cancel(seq_id, self.now())
            self._wake.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def _run(self) -> None:
        while True:
            for event in self.engine.advance(self.now()):
                queue = self._queues.get(event.seq_id)
                if queue is None:
                    continue
                queue.put_nowait(event)
                if event.kind is EventKind.FINISHED:
                    del self._queues[event.seq_id]
            self._wake.clear()
            nxt = self.engine.next_event_time()
            timeout = None if nxt is None else max(0.0, self.to_wall_s(nxt - self.now()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)


_RETURN_FLAGS = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")


def _scalar(request: Request, name: str, default: Any) -> Any:
    arr = request.inputs.get(name)
    if arr is None or arr.size == 0:
        return default
    return arr.reshape(-1)[0]


def _text(values: list[str]) -> np.ndarray[Any, Any]:
    return np.array([v.encode() for v in values], dtype=np.object_)


class LLMBackend(Backend):
    """vLLM-backend-compatible LLM: `text_input` -> `text_output`, streamed or whole."""

    def __init__(self, config: mc.ModelConfig, settings: LLMSettings, runner: EngineRunner):
        super().__init__(config)
        self.settings = settings
        self.runner = runner
        self._seq = 0

    def _sampling(self, request: Request) -> dict[str, Any]:
        raw = _scalar(request, "sampling_parameters", b"{}")
        try:
            params = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise invalid_arg("sampling_parameters must be a JSON object") from None
        if not isinstance(params, dict):
            raise invalid_arg("sampling_parameters must be a JSON object")
        return params

    def _plan(self, prompt: str, params: dict[str, Any]) -> tuple[list[str], int, str]:
        """(prompt tokens, tokens to generate, finish reason)."""
        max_tokens = params.get("max_tokens", self.settings.default_max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise invalid_arg(f"max_tokens must be at least 1, got {max_tokens!r}")
        tokens = tokenize(prompt)
        limit = self.settings.max_model_tokens
        if len(tokens) + max_tokens > limit:
            raise invalid_arg(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(tokens) + max_tokens} tokens ({len(tokens)} in the "
                f"messages, {max_tokens} in the completion)."
            )
        if params.get("ignore_eos", False):
            return tokens, max_tokens, "length"
        digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
        span = self.settings.natural_tokens_max - self.settings.natural_tokens_min + 1
        natural = self.settings.natural_tokens_min + int.from_bytes(digest, "little") % span
        if natural < max_tokens:
            return tokens, natural, "stop"
        return tokens, max_tokens, "length"

    def _word(self, prompt: str, index: int) -> str:
        digest = hashlib.blake2b(f"{index}:{prompt}".encode(), digest_size=4).digest()
        return " " + _VOCAB[int.from_bytes(digest, "little") % len(_VOCAB)]

    def _outputs(
        self, request: Request, text: str, reason: str, n_in: int, n_out: int
    ) -> list[OutputTensor]:
        flags = {k: bool(_scalar(request, k, False)) for k in _RETURN_FLAGS}
        outputs = [self.output("text_output", _text([text]))]
        if flags["return_finish_reason"]:
            outputs.append(self.output("finish_reason", _text([reason])))
        if flags["return_num_input_tokens"]:
            outputs.append(self.output("num_input_tokens", np.array([n_in], np.uint32)))
        if flags["return_num_output_tokens"]:
            outputs.append(self.output("num_output_tokens", np.array([n_out], np.uint32)))
        return outputs

    async def execute(self, request: Request) -> AsyncIterator[Response]:
        raw = _scalar(request, "text_input", b"")
        prompt = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        stream = bool(_scalar(request, "stream", False))
        exclude = _scalar(request, "exclude_input_in_output", None)
        if stream and exclude is not None and not bool(exclude):
            raise internal(
                "Error generating stream: When streaming, `exclude_input_in_output` = False is "
                "not allowed."
            )
        # Like the vLLM backend: the prompt is prepended only when not streaming, by default.
        prepend = not stream if exclude is None else not bool(exclude)
        params = self._sampling(request)
        tokens, n_out, reason = self._plan(prompt, params)
        salt = str(params.get("cache_salt", ""))
        self._seq += 1
        seq_id = f"{request.id or 'req'}#{self._seq}"
        seq = SeqRequest(
            id=seq_id,
            prompt_tokens=len(tokens),
            block_hashes=block_hashes(tokens, self.settings.engine.block_size, salt),
            output_tokens=n_out,
        )
        submitted = self.runner.now()
        result, events = self.runner.submit(seq)
        if result is SubmitResult.QUEUE_FULL:
            raise unavailable("Exceeds maximum queue size")
        if result is SubmitResult.TOO_LARGE:
            raise invalid_arg(
                f"prompt needs more KV cache than model '{self.config.name}' has "
                f"({len(tokens)} prompt + {n_out} output tokens)"
            )
        sent = 0
        words: list[str] = []
        try:
            while True:
                event = await events.get()
                if event.kind is EventKind.STARTED:
                    waited_s = self.runner.to_wall_s(event.time_ms - submitted)
                    request.queue_ns = max(0, int(waited_s * 1e9))
                elif event.kind is EventKind.TOKEN:
                    words.append(self._word(prompt, event.token_index))
                    # Stream deltas; the last token waits for FINISHED to travel as final.
                    if stream and event.token_index < n_out - 1:
                        delta, sent = "".join(words[sent:]), len(words)
                        outputs = self._outputs(request, delta, "None", len(tokens), 1)
                        yield Response(outputs, final=False)
                elif event.kind is EventKind.FINISHED:
                    break
        except BaseException:
            self.runner.cancel(seq_id)
            raise
        if stream:
            text, count = "".join(words[sent:]), len(words) - sent
        else:
            text, count = ("" if not prepend else prompt) + "".join(words), len(words)
        yield Response(self._outputs(request, text, reason, len(tokens), count), final=True)
