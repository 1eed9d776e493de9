"""The replica's gRPC face: Triton's `inference.GRPCInferenceService`, served by grpc.aio.

Only conversion and bookkeeping live here; models compute in `models`/`llm`, the engine
model in `spillgate.core.engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from spillgate.replica.errors import TritonError, internal, invalid_arg
from spillgate.replica.executions import Executions
from spillgate.replica.faults import Faults, refused
from spillgate.replica.models import Params, Request, Response, validate
from spillgate.replica.repository import LoadedModel, Repository
from spillgate.replica.tensors import config_dtype, decode_inputs, encode_outputs

log = logging.getLogger(__name__)

TRITON_VERSION = "2.63.0"
# What a client sees for a bug in the simulator: never the exception text.
_INTERNAL = "internal error in the replica simulator (see its log)"
EXTENSIONS = (
    "classification",
    "sequence",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "system_shared_memory",
    "cuda_shared_memory",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "trace",
    "logging",
)
# Request parameters Triton itself interprets; other `triton_`-prefixed keys are reserved.
_TRITON_PARAMS = {"triton_enable_empty_final_response"}
_SEQUENCE_PARAMS = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"}


def _param_value(p: pb.InferParameter) -> bool | int | float | str:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else ""


def _set_param(target: Any, key: str, value: bool | int | float | str) -> None:
    if isinstance(value, bool):
        target[key].bool_param = value
    elif isinstance(value, int):
        target[key].int64_param = value
    elif isinstance(value, float):
        target[key].double_param = value
    else:
        target[key].string_param = value


def _check_params(params: Params) -> None:
    """Type rules Triton's gRPC frontend applies to request parameters."""
    for key, value in params.items():
        if key.startswith("triton_") and key not in _TRITON_PARAMS:
            raise invalid_arg(
                "parameter keys starting with 'triton_' are reserved for Triton usage. Only the "
                "following keys starting with 'triton_' are allowed: "
                + ", ".join(sorted(_TRITON_PARAMS))
            )
        if key == "sequence_id" and (isinstance(value, bool) or not isinstance(value, int | str)):
            raise invalid_arg(
                "invalid value type for 'sequence_id' parameter, expected int64_param or "
                "string_param."
            )
        if key in ("sequence_start", "sequence_end", *_TRITON_PARAMS) and not isinstance(
            value, bool
        ):
            raise invalid_arg(f"invalid value type for '{key}' parameter, expected bool_param.")
        if key == "priority" and isinstance(value, int) and value < 0:
            raise invalid_arg("invalid value for 'priority', expected value >= 0.")


def _stream_error(msg: pb.ModelInferRequest, text: str) -> pb.ModelStreamInferResponse:
    # Errors raised before a request is issued carry only the request id, like Triton's.
    err = pb.ModelStreamInferResponse(error_message=text)
    err.infer_response.id = msg.id
    return err


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: TritonError) -> None:
    await context.abort(error.code, error.message)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Triton's inference service, backed by the simulated repository."""

    def __init__(
        self, repository: Repository, faults: Faults, executions: Executions | None = None
    ) -> None:
        self.repo = repository
        self.faults = faults
        self.executions = executions or Executions()
        self.ready = True

    # -- health and metadata -------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            self.repo.get(request.name, request.version)
        except TritonError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="triton", version=TRITON_VERSION, extensions=list(EXTENSIONS)
        )

    async def _model(self, request: Any, context: Any) -> LoadedModel:
        try:
            return self.repo.get(request.name, request.version)
        except TritonError as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        model = await self._model(request, context)
        cfg = model.config
        batch = [-1] if cfg.max_batch_size > 0 else []
        resp = pb.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform=cfg.platform or cfg.backend
        )
        for src, dst in ((cfg.input, resp.inputs), (cfg.output, resp.outputs)):
            for t in src:
                dst.add(name=t.name, datatype=config_dtype(t.data_type), shape=[*batch, *t.dims])
        return resp

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        model = await self._model(request, context)
        return pb.ModelConfigResponse(config=model.config)

    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        if request.name:
            models = [await self._model(request, context)]
        else:
            models = [self.repo.loaded[n] for n in sorted(self.repo.loaded)]
        resp = pb.ModelStatisticsResponse()
        for m in models:
            s = m.stats
            entry = resp.model_stats.add(
                name=m.name,
                version=m.version,
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
            )
            st = entry.inference_stats
            st.success.count, st.success.ns = s.success_count, s.success_ns
            st.fail.count, st.fail.ns = s.fail_count, s.fail_ns
            st.queue.count, st.queue.ns = s.success_count, s.queue_ns
            st.compute_infer.count, st.compute_infer.ns = s.success_count, s.compute_ns
        return resp

    # -- repository ------------------------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        resp = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.repo.index():
            if request.ready and state != "READY":
                continue
            resp.models.add(name=name, version=version, state=state, reason=reason)
        return resp

    async def RepositoryModelLoad(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        override = None
        try:
            if request.repository_name:
                raise TritonError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    "'repository_name' specification is not supported",
                )
            for key, value in request.parameters.items():
                if key == "config":
                    if value.WhichOneof("parameter_choice") != "string_param":
                        raise invalid_arg(
                            "invalid value type for load parameter 'config', expected string_param."
                        )
                    override = value.string_param
                elif key.startswith("file:"):
                    if value.WhichOneof("parameter_choice") != "bytes_param":
                        raise invalid_arg(
                            f"invalid value type for load parameter '{key}', expected bytes_param."
                        )
                else:
                    raise invalid_arg(f"unrecognized load parameter '{key}'.")
            files = [k for k in request.parameters if k.startswith("file:")]
            if files and override is None:
                # Model files replace the repository's, so the config must come with them.
                raise internal(
                    f"failed to load '{request.model_name}', failed to poll from model repository"
                )
            await self.repo.load(request.model_name, override)
        except TritonError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            await self.repo.unload(request.model_name)
        except TritonError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # -- shared memory: a CPU simulator registers none ------------------------------------

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        if request.name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Unable to find system shared memory region: '{request.name}'",
            )
        return pb.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "system shared memory is not supported by the spillgate replica simulator",
        )

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        if request.name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Unable to find cuda shared memory region: '{request.name}'",
            )
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"failed to register CUDA shared memory region: '{request.name}', GPUs not supported",
        )

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return pb.CudaSharedMemoryUnregisterResponse()

    # -- inference ---------------------------------------------------------------------------

    def _prepare(self, msg: pb.ModelInferRequest) -> tuple[LoadedModel, Request, Params]:
        model = self.repo.get(msg.model_name, msg.model_version)
        params: Params = {k: _param_value(v) for k, v in msg.parameters.items()}
        _check_params(params)
        if "sequence_id" in msg.parameters and msg.parameters["sequence_id"].WhichOneof(
            "parameter_choice"
        ) not in ("int64_param", "string_param"):
            raise invalid_arg(
                "invalid value type for 'sequence_id' parameter, expected int64_param or "
                "string_param."
            )
        decoded = decode_inputs(msg)
        requested = [o.name for o in msg.outputs]
        arrays, batch = validate(model.config, decoded, requested, msg.id)
        req = Request(
            model=model.name,
            id=msg.id,
            inputs=arrays,
            outputs=requested,
            parameters={k: v for k, v in params.items() if k not in _SEQUENCE_PARAMS},
            batch_size=batch,
        )
        if model.backend.sequence:
            cid = params.get("sequence_id", 0)
            if cid in (0, ""):
                raise invalid_arg(
                    f"[request id: {msg.id or '<id_unknown>'}] inference request to model "
                    f"'{model.name}' must specify a non-zero or non-empty correlation ID"
                )
            req.correlation_id = cid if isinstance(cid, int | str) else 0
            req.sequence_start = bool(params.get("sequence_start", False))
            req.sequence_end = bool(params.get("sequence_end", False))
        return model, req, params

    def _to_wire(self, model: LoadedModel, req: Request, resp: Response) -> pb.ModelInferResponse:
        out = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=req.id)
        encode_outputs(out, resp.outputs, req.outputs)
        for key, value in resp.parameters.items():
            _set_param(out.parameters, key, value)
        return out

    async def _run(
        self, msg: pb.ModelInferRequest, stream: bool
    ) -> AsyncIterator[tuple[LoadedModel, Request, Response]]:
        """Validate, apply faults, execute; keeps statistics. Raises TritonError."""
        model, req, _ = self._prepare(msg)
        if model.backend.decoupled and not stream:
            raise TritonError(
                grpc.StatusCode.UNIMPLEMENTED,
                "ModelInfer RPC doesn't support models with decoupled transaction policy",
            )
        stats = model.stats
        start = time.monotonic_ns()
        stats.pending += 1
        stats.in_flight += 1
        started = ok = False
        reason = "OTHER"
        try:
            reason = "BACKEND"
            await self.faults.before_inference()
            stats.pending -= 1
            started = True
            self.executions.record(req.id)
            async for resp in model.backend.execute(req):
                yield model, req, resp
            ok = True
        except TritonError as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                reason = "REJECTED"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            reason = "CANCELED"
            raise
        finally:
            if not started:
                stats.pending -= 1
            stats.in_flight -= 1
            elapsed = time.monotonic_ns() - start
            now_ms = int(time.time() * 1000)
            if ok:
                stats.success(req.batch_size, elapsed, req.queue_ns, now_ms)
            else:
                stats.failure(elapsed, now_ms, reason)

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        if self.faults.refuses():
            await _abort(context, refused())
        result: pb.ModelInferResponse | None = None
        try:
            async for model, req, resp in self._run(request, stream=False):
                result = self._to_wire(model, req, resp)
        except TritonError as exc:
            await _abort(context, exc)
        except Exception:
            log.exception("model %r failed", request.model_name)
            await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL)
        assert result is not None
        return result

    async def _stream_one(
        self,
        msg: pb.ModelInferRequest,
        out: asyncio.Queue[pb.ModelStreamInferResponse | None],
        after: asyncio.Event | None,
        done: asyncio.Event,
    ) -> None:
        """Run one stream request. Non-decoupled requests answer in request order (`after`
        is the previous such request's `done`), as Triton's stream handler does."""
        empty_final = bool(
            msg.parameters["triton_enable_empty_final_response"].bool_param
            if "triton_enable_empty_final_response" in msg.parameters
            else False
        )
        held: list[pb.ModelStreamInferResponse] = []

        def emit(item: pb.ModelStreamInferResponse) -> None:
            if after is None or after.is_set():
                out.put_nowait(item)
            else:
                held.append(item)

        try:
            async for model, req, resp in self._run(msg, stream=True):
                if resp.final and not resp.outputs and not empty_final:
                    continue
                wire = self._to_wire(model, req, resp)
                wire.parameters["triton_final_response"].bool_param = resp.final
                emit(pb.ModelStreamInferResponse(infer_response=wire))
        except TritonError as exc:
            emit(_stream_error(msg, exc.message))
        except Exception:
            log.exception("model %r failed", msg.model_name)
            emit(_stream_error(msg, _INTERNAL))
        finally:
            if after is not None:
                await after.wait()
            for item in held:
                out.put_nowait(item)
            done.set()

    async def ModelStreamInfer(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        if self.faults.refuses():
            # Read the request first, then refuse: aborting while the client is still
            # sending it makes the client see INTERNAL ("Failed execute_batch") instead of
            # this UNAVAILABLE.
            await anext(aiter(request_iterator), None)
            await _abort(context, refused())
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        broken: list[str] = []

        async def read() -> None:
            try:
                await read_requests()
            except Exception:  # an undecodable message ends the stream, not the server
                log.warning("ModelStreamInfer: unreadable request message", exc_info=True)
                broken.append("unable to parse a ModelStreamInfer request message")
            finally:
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                out.put_nowait(None)

        async def read_requests() -> None:
            ordered: asyncio.Event | None = None  # `done` of the last non-decoupled request
            async for msg in request_iterator:
                done = asyncio.Event()
                model = self.repo.loaded.get(msg.model_name)
                if model is not None and model.backend.decoupled:
                    after = None
                else:
                    after, ordered = ordered, done
                task = asyncio.ensure_future(self._stream_one(msg, out, after, done))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await out.get()) is not None:
                yield item
            if broken:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, broken[0])
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


async def serve(
    repository: Repository, faults: Faults, host: str, port: int, max_message_bytes: int
) -> tuple[grpc.aio.Server, int, InferenceServicer]:
    """Start the gRPC server; returns it with the bound port."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    server = grpc.aio.server(options=options)
    servicer = InferenceServicer(repository, faults)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(
        "inference.GRPCInferenceService", health_pb2.HealthCheckResponse.SERVING
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            reflection.SERVICE_NAME,
            "grpc.health.v1.Health",
        ),
        server,
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio raises instead of returning 0 when the port is taken
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    await server.start()
    return server, bound, servicer
