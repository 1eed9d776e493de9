"""`forward._piece` reads Triton's raw output bytes itself; it must agree with tritonclient's
own decoding (`as_numpy`, the fallback) on every response shape the vLLM contract allows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2
from tritonclient.grpc._infer_result import InferResult
from tritonclient.utils import serialize_byte_tensor

from spillgate.gateway.forward import Piece, _piece


def _piece_numpy(result: InferResult) -> Piece:
    """The oracle: tritonclient's own decoding of the same outputs."""
    text = result.as_numpy("text_output")
    n_out = result.as_numpy("num_output_tokens")
    final = result.get_response().parameters["triton_final_response"].bool_param
    reason = result.as_numpy("finish_reason") if final else None
    n_in = result.as_numpy("num_input_tokens") if final else None
    return Piece(
        text=text[0].decode() if text is not None and len(text) else "",
        output_tokens=int(n_out[0]) if n_out is not None and len(n_out) else 0,
        final=final,
        finish_reason=reason[0].decode() if reason is not None and len(reason) else "",
        input_tokens=int(n_in[0]) if n_in is not None and len(n_in) else 0,
    )


def _response(
    text: str | None, n_out: int | None, reason: str | None, n_in: int | None, final: bool,
    count_type: str = "UINT32",
) -> service_pb2.ModelInferResponse:  # fmt: skip
    response = service_pb2.ModelInferResponse(model_name="llm", id="r")
    response.parameters["triton_final_response"].bool_param = final

    def add(name: str, datatype: str, raw: bytes) -> None:
        out = response.outputs.add(name=name, datatype=datatype, shape=[1])
        assert out.name == name
        response.raw_output_contents.append(raw)

    dtype = {"UINT32": np.uint32, "INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64}
    for name, value in (("text_output", text), ("finish_reason", reason)):
        if value is not None:
            add(name, "BYTES", serialize_byte_tensor(np.array([value.encode()], np.object_)).item())
    for name, number in (("num_output_tokens", n_out), ("num_input_tokens", n_in)):
        if number is not None:
            add(name, count_type, np.array([number], dtype[count_type]).tobytes())
    return response


@given(
    text=st.none() | st.text(max_size=40),
    n_out=st.none() | st.integers(0, 2**31 - 1),
    reason=st.none() | st.sampled_from(["stop", "length", ""]),
    n_in=st.none() | st.integers(0, 2**31 - 1),
    final=st.booleans(),
    count_type=st.sampled_from(["UINT32", "INT32", "INT64", "UINT64"]),
)
def test_raw_decoding_agrees_with_tritonclient(
    text: str | None, n_out: int | None, reason: str | None, n_in: int | None, final: bool,
    count_type: str,
) -> None:  # fmt: skip
    result = InferResult(_response(text, n_out, reason, n_in, final, count_type))
    assert _piece(result) == _piece_numpy(result)


def test_a_token_and_the_final_response() -> None:
    token = InferResult(_response("héllo", 1, None, None, False))
    assert _piece(token) == Piece("héllo", 1, False)
    last = InferResult(_response("", 3, "length", 12, True))
    assert _piece(last) == Piece("", 3, True, "length", 12)


def test_outputs_in_the_typed_contents_fields_are_read_too() -> None:
    response = service_pb2.ModelInferResponse(model_name="llm")
    response.parameters["triton_final_response"].bool_param = True
    text = response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"typed")
    count = response.outputs.add(name="num_output_tokens", datatype="UINT32", shape=[1])
    count.contents.uint_contents.append(7)
    assert _piece(InferResult(response)) == Piece("typed", 7, True)


@pytest.mark.parametrize("raw", [b"", b"\x05\x00"])
def test_truncated_raw_outputs_read_as_empty(raw: bytes) -> None:
    response = service_pb2.ModelInferResponse(model_name="llm")
    response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(raw)
    assert _piece(InferResult(response)).text == ""
