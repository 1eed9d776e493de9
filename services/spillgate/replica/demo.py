"""`spillgate generate`: stream a completion from a Triton LLM model with stock tritonclient."""

from __future__ import annotations

import json
import queue
import sys
import time
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def generate(url: str, model: str, prompt: str, max_tokens: int) -> int:
    """Print the streamed text as it arrives, then the token counts and timings."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    inputs = []
    for name, dtype, value in (
        ("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
        ("stream", "BOOL", np.array([True])),
        (
            "sampling_parameters",
            "BYTES",
            np.array([json.dumps({"max_tokens": max_tokens}).encode()], dtype=np.object_),
        ),
        ("return_finish_reason", "BOOL", np.array([True])),
        ("return_num_input_tokens", "BOOL", np.array([True])),
        ("return_num_output_tokens", "BOOL", np.array([True])),
    ):
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    start = time.perf_counter()
    first: float | None = None
    n_out = 0
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(model, inputs, request_id="generate-1")
        while True:
            result, error = results.get(timeout=60)
            if error is not None:
                print(f"\nspillgate generate: {error}", file=sys.stderr)
                return 1
            first = first or time.perf_counter()
            text = result.as_numpy("text_output")
            sys.stdout.write(text[0].decode())
            sys.stdout.flush()
            n_out += int(result.as_numpy("num_output_tokens")[0])  # a delta per response
            final = result.get_response().parameters["triton_final_response"].bool_param
            if final:
                reason = result.as_numpy("finish_reason")[0].decode()
                n_in = int(result.as_numpy("num_input_tokens")[0])
                break
    except (InferenceServerException, queue.Empty) as exc:
        print(f"\nspillgate generate: {exc}", file=sys.stderr)
        return 1
    finally:
        client.stop_stream()
        client.close()
    total = (time.perf_counter() - start) * 1000
    ttft = ((first or start) - start) * 1000
    print(
        f"\n[{model}: {n_in} prompt + {n_out} output tokens, finish={reason}, "
        f"ttft {ttft:.0f} ms, total {total:.0f} ms]"
    )
    return 0
