"""The Open Inference Protocol's `inference.GRPCInferenceService`, served with `grpc.aio` on the gateway's loop.

Started by `fmnist serve` / `fmnist gateway` beside uvicorn (`FMNIST_GRPC_PORT`; 0 or
`FMNIST_GRPC_ENABLED=false` turns it off). It serves the same `Gateway` as the HTTP app: same auth
(metadata `authorization: Bearer KEY` or `x-api-key`), limits, broker and batching
(`app.gateway.v2.inference`). Inputs may come as `raw_input_contents` or typed contents; outputs go
out as `raw_output_contents`, as Triton sends them.
The generated modules beside this one come from `grpc_predict_v2.proto` (`make proto`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from fastapi import FastAPI

from app.gateway.errors import ApiError
from app.gateway.service import Gateway
from app.gateway.v2 import grpc_predict_v2_pb2 as pb
from app.gateway.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from app.gateway.v2 import inference
from app.gateway.v2.tensors import (
    InputTensor,
    RequestedOutput,
    bad_request,
    check_shape,
    split_bytes_elements,
)
from app.logs import kv

log = logging.getLogger(__name__)

# Room for the protobuf framing around the largest body the REST route takes.
_MESSAGE_OVERHEAD_BYTES = 64 * 1024
_STOP_GRACE_S = 5.0
_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,  # e.g. a version pinned that runs as a shadow
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code_of(error: ApiError) -> grpc.StatusCode:
    """The gRPC status for an HTTP status of the gateway's errors."""
    return _STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The six RPCs of the protocol, over the app's `Gateway`."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.state.gateway
        return gateway

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.gateway.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=inference.SERVER_NAME,
            version=self.app.version,
            extensions=list(inference.EXTENSIONS),
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._owner(context)
            ready = inference.model_ready(self.gateway, request.name, request.version or None)
        except ApiError as exc:
            await self._abort(context, exc)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            self._owner(context)
            meta = inference.model_metadata(self.gateway, request.name, request.version or None)
        except ApiError as exc:
            await self._abort(context, exc)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        gateway = self.gateway
        held = 0
        try:
            owner = self._owner(context)
            # gRPC has read the whole message already; counting it bounds what requests in flight hold.
            gateway.bodies.take(request.ByteSize())
            held = request.ByteSize()
            model = gateway.registry.resolve(request.model_name, request.model_version or None)
            gateway.require_ready()
            inputs = input_tensors(request)
            requested = [RequestedOutput(output.name) for output in request.outputs]
            outputs = await inference.infer(
                gateway, owner, model, inputs, requested, pinned=bool(request.model_version)
            )
        except ApiError as exc:
            gateway.metrics.record_rejection(exc.code)
            await self._abort(context, exc)
        finally:
            gateway.bodies.release(held)
        tensor = pb.ModelInferResponse.InferOutputTensor
        return pb.ModelInferResponse(
            model_name=model.name,
            model_version=model.version,
            id=request.id,
            outputs=[tensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in outputs],
            raw_output_contents=[output.raw() for output in outputs],
        )

    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's owner fingerprint from the metadata (`authorization: Bearer KEY` or `x-api-key`)."""
        keys = self.gateway.api_keys
        if not keys.enabled:
            return keys.owner_of_key(None)
        presented: str | None = None
        for key, value in context.invocation_metadata() or ():
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            if key == "authorization":
                scheme, _, credentials = text.partition(" ")
                if scheme.lower() == "bearer" and credentials.strip():
                    presented = credentials.strip()
            elif key == "x-api-key" and text.strip() and presented is None:
                presented = text.strip()
        return keys.owner_of_key(presented)

    async def _abort(self, context: grpc.aio.ServicerContext, error: ApiError) -> None:
        retry_after = error.headers.get("Retry-After")
        trailing = (("retry-after", retry_after),) if retry_after is not None else ()
        await context.abort(status_code_of(error), error.message, trailing_metadata=trailing)


def input_tensors(request: pb.ModelInferRequest) -> list[InputTensor]:
    """The inputs of a gRPC infer request, from `raw_input_contents` (one per input) or typed contents."""
    raw: Sequence[bytes] = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise bad_request(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input"
        )
    tensors: list[InputTensor] = []
    for index, entry in enumerate(request.inputs):
        shape = check_shape(entry.name, list(entry.shape))
        if raw:
            data = raw[index]
            if entry.datatype == "BYTES":
                elements = split_bytes_elements(entry.name, data)
                tensors.append(InputTensor(entry.name, entry.datatype, shape, elements=elements))
            else:
                tensors.append(InputTensor(entry.name, entry.datatype, shape, raw=data))
            continue
        contents = entry.contents
        if entry.datatype == "BYTES":
            elements = list(contents.bytes_contents)
            tensors.append(InputTensor(entry.name, entry.datatype, shape, elements=elements))
        elif entry.datatype == "FP32":
            tensors.append(
                InputTensor(entry.name, entry.datatype, shape, values=contents.fp32_contents)
            )
        else:  # UINT8 travels in uint_contents; other types are refused downstream
            tensors.append(
                InputTensor(entry.name, entry.datatype, shape, values=contents.uint_contents)
            )
    return tensors


class GrpcServer:
    """The gRPC server of one gateway app: `start()` binds and serves, `stop()` drains and closes."""

    def __init__(self, app: FastAPI, host: str, port: int, max_message_bytes: int) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.port = port
        limit = max_message_bytes + _MESSAGE_OVERHEAD_BYTES
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(app), self._server)

    async def start(self) -> int:
        """Bind and serve; the port it listens on."""
        self.port = self._server.add_insecure_port(f"{self.host}:{self.requested_port}")
        await self._server.start()
        log.info(kv("grpc_serving", address=f"{self.host}:{self.port}"))
        return self.port

    async def stop(self) -> None:
        await self._server.stop(_STOP_GRACE_S)
        log.info(kv("grpc_stopped", address=f"{self.host}:{self.port}"))
