"""Convert between Triton's wire tensors and numpy, validating like Triton does.

Inputs arrive either as `raw_input_contents` (what tritonclient sends) or as typed
`InferTensorContents`; outputs always go back as raw contents, which every client reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from spillgate.replica.errors import invalid_arg

# Wire datatype name -> numpy dtype (BYTES is an object array of `bytes`).
NP_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}

# No message can carry more elements than this (the gRPC message limit is far lower).
_MAX_ELEMENTS = 2**31

# InferTensorContents field holding each datatype when sent typed instead of raw.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def config_dtype(data_type: int) -> str:
    """`TYPE_INT32` (model config enum) -> `INT32` (wire name); `TYPE_STRING` -> `BYTES`."""
    name = mc.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


@dataclass(frozen=True)
class OutputTensor:
    name: str
    value: np.ndarray[Any, Any]
    datatype: str


def _decode(tensor: Any, raw: bytes | None, model: str) -> np.ndarray[Any, Any]:
    dtype = tensor.datatype
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise invalid_arg(
            f"All input dimensions should be specified for input '{tensor.name}' for model "
            f"'{model}', got [{','.join(str(d) for d in shape)}]"
        )
    count = math.prod(shape)  # Python ints: no silent 64-bit wrap-around
    if count > _MAX_ELEMENTS:
        raise invalid_arg(f"input '{tensor.name}' for model '{model}' has too many elements")
    if dtype not in NP_DTYPES:
        raise invalid_arg(f"invalid datatype '{dtype}' for input '{tensor.name}'")
    if raw is not None:
        if dtype == "BYTES":
            try:
                values = deserialize_bytes_tensor(raw)
            except Exception:
                raise invalid_arg(
                    f"element byte size indicator exceeds the end of the buffer for input "
                    f"'{tensor.name}' for model '{model}'"
                ) from None
            if values.size != count:
                raise invalid_arg(
                    f"expected {count} string elements for inference input '{tensor.name}' "
                    f"for model '{model}', got {values.size}"
                )
            decoded: np.ndarray[Any, Any] = values.reshape(shape)
            return decoded
        itemsize = np.dtype(NP_DTYPES[dtype]).itemsize
        if len(raw) != count * itemsize:
            raise invalid_arg(
                f"input byte size mismatch for input '{tensor.name}' for model '{model}'. "
                f"Expected {count * itemsize}, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=NP_DTYPES[dtype]).reshape(shape)
    field = getattr(tensor.contents, _CONTENTS_FIELD.get(dtype, "bytes_contents"))
    if dtype == "FP16" or len(field) != count:
        raise invalid_arg(
            f"unexpected number of elements in contents for input '{tensor.name}' for "
            f"model '{model}'. Expected {count}, got {len(field)}"
        )
    if dtype == "BYTES":
        return np.array(list(field), dtype=np.object_).reshape(shape)
    return np.array(list(field), dtype=NP_DTYPES[dtype]).reshape(shape)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, tuple[str, np.ndarray[Any, Any]]]:
    """name -> (wire datatype, array) for every input of the request."""
    raws: Sequence[bytes] = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise invalid_arg(
            f"expected {len(request.inputs)} raw input contents, got {len(raws)} "
            f"for model '{request.model_name}'"
        )
    out: dict[str, tuple[str, np.ndarray[Any, Any]]] = {}
    for i, tensor in enumerate(request.inputs):
        raw = raws[i] if raws else None
        out[tensor.name] = (tensor.datatype, _decode(tensor, raw, request.model_name))
    return out


def encode_outputs(
    response: pb.ModelInferResponse, outputs: Sequence[OutputTensor], requested: Sequence[str]
) -> None:
    """Append outputs (only the requested ones, all when none were named) as raw contents."""
    for out in outputs:
        if requested and out.name not in requested:
            continue
        tensor = response.outputs.add()
        tensor.name = out.name
        tensor.datatype = out.datatype
        tensor.shape.extend(out.value.shape)
        if out.datatype == "BYTES":
            flat = serialize_byte_tensor(out.value)
            response.raw_output_contents.append(flat.item() if flat.size else b"")
        else:
            arr = np.ascontiguousarray(out.value, dtype=NP_DTYPES[out.datatype])
            response.raw_output_contents.append(arr.tobytes())
