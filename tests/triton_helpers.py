"""Request builders and a stream wrapper for tests that talk to a replica with tritonclient."""

from __future__ import annotations

import json
import queue
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient


def tensor(name: str, value: np.ndarray[Any, Any], dtype: str, mod: Any = grpcclient) -> Any:
    """An InferInput (of `mod`: tritonclient.grpc or tritonclient.grpc.aio) holding `value`."""
    t = mod.InferInput(name, list(value.shape), dtype)
    t.set_data_from_numpy(value)
    return t


def simple_inputs(dtype: str = "INT32", batch: int = 1, mod: Any = grpcclient) -> list[Any]:
    """Inputs of Triton's `simple` model: INPUT0 = 0..15, INPUT1 = ones, `batch` rows."""
    np_dtype = {"INT32": np.int32, "INT8": np.int8}[dtype]
    a = np.arange(16, dtype=np_dtype).reshape(1, 16).repeat(batch, axis=0)
    b = np.ones((batch, 16), dtype=np_dtype)
    return [tensor("INPUT0", a, dtype, mod), tensor("INPUT1", b, dtype, mod)]


def llm_inputs(
    prompt: str, stream: bool, max_tokens: int, mod: Any = grpcclient, **flags: bool
) -> list[Any]:
    """vLLM-contract inputs generating exactly `max_tokens` tokens (ignore_eos)."""
    params = json.dumps({"max_tokens": max_tokens, "ignore_eos": True}).encode()
    out = [
        tensor("text_input", np.array([prompt.encode()], dtype=np.object_), "BYTES", mod),
        tensor("stream", np.array([stream]), "BOOL", mod),
        tensor("sampling_parameters", np.array([params], dtype=np.object_), "BYTES", mod),
    ]
    for name, value in flags.items():
        out.append(tensor(name, np.array([value]), "BOOL", mod))
    return out


def final_flag(result: Any) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)


class Stream:
    """A tritonclient stream whose callbacks land in a queue."""

    def __init__(self, url: str) -> None:
        self.client: Any = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def get(self) -> tuple[Any, Any]:
        return self.events.get(timeout=30)

    def finish(self, model: str, inputs: list[Any]) -> Any:
        """Send one request and wait for its final response."""
        self.client.async_stream_infer(model, inputs)
        while True:
            result, error = self.get()
            assert error is None, error
            if final_flag(result):
                return result

    def close(self) -> None:
        """Half-close the stream and wait for the server to end it (idempotent)."""
        if self.client is not None:
            self.client.stop_stream()
            self.client.close()
            self.client = None
