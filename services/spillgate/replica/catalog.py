"""Triton's standard example models, as their `config.pbtxt` declares them.

Each entry is the model configuration Triton reports for the model (ModelConfig RPC) and the
simulator backend that computes it. The tensor names, shapes and dtypes are the ones the
stock Triton client examples use, so those examples run unmodified against the simulator.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc


def _io(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": dtype, "dims": dims}


def _add_sub(name: str, dtype: str, platform: str = "onnxruntime_onnx") -> dict[str, Any]:
    return {
        "name": name,
        "platform": platform,
        "max_batch_size": 8,
        "input": [_io("INPUT0", dtype, [16]), _io("INPUT1", dtype, [16])],
        "output": [_io("OUTPUT0", dtype, [16]), _io("OUTPUT1", dtype, [16])],
    }


def _control(name: str, kind: str) -> dict[str, Any]:
    return {"name": name, "control": [{"kind": kind, "int32_false_true": [0, 1]}]}


EXAMPLES: dict[str, dict[str, Any]] = {
    "simple": _add_sub("simple", "TYPE_INT32"),
    "simple_int8": _add_sub("simple_int8", "TYPE_INT8"),
    "simple_string": _add_sub("simple_string", "TYPE_STRING", "tensorflow_graphdef"),
    "simple_identity": {
        "name": "simple_identity",
        "platform": "tensorflow_savedmodel",
        "max_batch_size": 8,
        "input": [_io("INPUT0", "TYPE_STRING", [-1])],
        "output": [_io("OUTPUT0", "TYPE_STRING", [-1])],
    },
    "simple_sequence": {
        "name": "simple_sequence",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        "sequence_batching": {
            "max_sequence_idle_microseconds": "5000000",
            "control_input": [
                _control("START", "CONTROL_SEQUENCE_START"),
                _control("READY", "CONTROL_SEQUENCE_READY"),
            ],
        },
        "input": [_io("INPUT", "TYPE_INT32", [1])],
        "output": [_io("OUTPUT", "TYPE_INT32", [1])],
    },
    "simple_dyna_sequence": {
        "name": "simple_dyna_sequence",
        "backend": "dyna_sequence",
        "max_batch_size": 8,
        "sequence_batching": {
            "max_sequence_idle_microseconds": "10000000",
            "oldest": {"max_candidate_sequences": 1024, "max_queue_delay_microseconds": "10000"},
            "control_input": [
                _control("START", "CONTROL_SEQUENCE_START"),
                _control("END", "CONTROL_SEQUENCE_END"),
                _control("READY", "CONTROL_SEQUENCE_READY"),
                {
                    "name": "CORRID",
                    "control": [{"kind": "CONTROL_SEQUENCE_CORRID", "data_type": "TYPE_UINT64"}],
                },
            ],
        },
        "input": [_io("INPUT", "TYPE_INT32", [1])],
        "output": [_io("OUTPUT", "TYPE_INT32", [1])],
    },
    "repeat_int32": {
        "name": "repeat_int32",
        "backend": "repeat",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": [
            _io("IN", "TYPE_INT32", [-1]),
            _io("DELAY", "TYPE_UINT32", [-1]),
            _io("WAIT", "TYPE_UINT32", [1]),
        ],
        "output": [_io("OUT", "TYPE_INT32", [1]), _io("IDX", "TYPE_UINT32", [1])],
    },
}


# Which simulator behaviour computes each example (configs loaded with an override pick one
# through their `backend` field: add_sub, identity, sequence, dyna_sequence, repeat, vllm).
BEHAVIOUR = {
    "simple": "add_sub",
    "simple_int8": "add_sub",
    "simple_string": "add_sub",
    "simple_identity": "identity",
    "simple_sequence": "sequence",
    "simple_dyna_sequence": "dyna_sequence",
    "repeat_int32": "repeat",
}


def llm_config(name: str) -> dict[str, Any]:
    """The vLLM backend's tensor contract (triton-inference-server/vllm_backend)."""
    return {
        "name": name,
        "backend": "vllm",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "input": [
            _io("text_input", "TYPE_STRING", [1]),
            {**_io("stream", "TYPE_BOOL", [1]), "optional": True},
            {**_io("sampling_parameters", "TYPE_STRING", [1]), "optional": True},
            {**_io("exclude_input_in_output", "TYPE_BOOL", [1]), "optional": True},
            {**_io("return_finish_reason", "TYPE_BOOL", [1]), "optional": True},
            {**_io("return_num_input_tokens", "TYPE_BOOL", [1]), "optional": True},
            {**_io("return_num_output_tokens", "TYPE_BOOL", [1]), "optional": True},
        ],
        "output": [
            _io("text_output", "TYPE_STRING", [-1]),
            _io("finish_reason", "TYPE_STRING", [-1]),
            _io("num_input_tokens", "TYPE_UINT32", [1]),
            _io("num_output_tokens", "TYPE_UINT32", [-1]),
        ],
        "instance_group": [{"count": 1, "kind": "KIND_MODEL"}],
    }


def to_proto(config: dict[str, Any]) -> mc.ModelConfig:
    """Parse a config dict (JSON form of ModelConfig) into the protobuf Triton reports."""
    msg = mc.ModelConfig()
    json_format.ParseDict(config, msg)
    return msg
