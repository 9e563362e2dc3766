"""The v2 gRPC service in-process (our generated stubs) over the real app, memory broker, stand-in worker."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from app.gateway.v2 import grpc_predict_v2_pb2 as pb
from app.gateway.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from app.gateway.v2.grpc_server import GrpcServer
from app.gateway.v2.tensors import split_bytes_elements
from app.settings import Settings
from tests.gateway.helpers import fashion_like, gateway_settings, running_gateway, worker_running

pytestmark = pytest.mark.timeout(30)
REPO = Path(__file__).resolve().parents[3]
V2 = REPO / "app" / "gateway" / "v2"


@contextlib.asynccontextmanager
async def grpc_stub(settings: Settings) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with running_gateway(settings) as (app, _):
        server = GrpcServer(app, "127.0.0.1", 0, settings.max_batch_upload_bytes)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield pb_grpc.GRPCInferenceServiceStub(channel)
        finally:
            await server.stop()


def pixels(*seeds: int) -> np.ndarray:
    return np.stack([fashion_like(seed)[None] for seed in seeds])


def infer_request(images: np.ndarray, *, raw: bool) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="UINT8", shape=list(images.shape)
    )
    request = pb.ModelInferRequest(model_name="fmnist", id="g1")
    if raw:
        request.raw_input_contents.append(images.tobytes())
    else:
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    request.inputs.append(tensor)
    return request


def labels_of(response: pb.ModelInferResponse) -> list[int]:
    index = [output.name for output in response.outputs].index("label")
    return np.frombuffer(response.raw_output_contents[index], "<i8").tolist()


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed_contents"])
async def test_model_infer_goes_through_the_workers(raw: bool) -> None:
    """ModelInfer with raw or typed contents returns the worker's labels as raw outputs."""
    settings = gateway_settings()
    async with grpc_stub(settings) as stub, worker_running(settings):
        response = await stub.ModelInfer(infer_request(pixels(2, 9), raw=raw))
    assert response.id == "g1"
    assert labels_of(response) == [2, 9]
    names_index = [output.name for output in response.outputs].index("class_name")
    names = split_bytes_elements("class_name", response.raw_output_contents[names_index])
    assert names == [b"class-2", b"class-9"]


async def test_metadata_and_readiness() -> None:
    """ServerLive, ServerReady, ModelReady and ModelMetadata describe the default model."""
    async with grpc_stub(gateway_settings()) as stub:
        live = await stub.ServerLive(pb.ServerLiveRequest())
        ready = await stub.ServerReady(pb.ServerReadyRequest())
        model_ready = await stub.ModelReady(pb.ModelReadyRequest(name="fmnist"))
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="fmnist"))
    assert (live.live, ready.ready, model_ready.ready) == (True, True, True)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "UINT8", [-1, 1, 28, 28])
    ]


async def test_unknown_model_is_not_found() -> None:
    """An unknown model is NOT_FOUND with the registry's message."""
    async with grpc_stub(gateway_settings()) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "fmnist" in (raised.value.details() or "")


async def test_api_key_travels_in_metadata() -> None:
    """With keys on, no key is UNAUTHENTICATED and `authorization: Bearer KEY` is accepted."""
    settings = gateway_settings(api_keys=["k1"])
    request = infer_request(pixels(5), raw=True)
    async with grpc_stub(settings) as stub, worker_running(settings):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(request)
        response = await stub.ModelInfer(request, metadata=(("authorization", "Bearer k1"),))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert labels_of(response) == [5]


async def test_overload_is_resource_exhausted_with_retry_after() -> None:
    """Past FMNIST_MAX_PENDING_REQUESTS, ModelInfer is RESOURCE_EXHAUSTED with a retry-after trailer."""
    async with grpc_stub(gateway_settings(max_pending_requests=1)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request(pixels(1, 2), raw=True))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "1") in tuple(raised.value.trailing_metadata() or ())


async def test_a_message_past_the_body_budget_is_unavailable_with_retry_after() -> None:
    """gRPC requests count against FMNIST_MAX_BODY_BYTES_IN_FLIGHT as HTTP bodies do: past it, UNAVAILABLE."""
    async with grpc_stub(gateway_settings(max_body_bytes_in_flight=64)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request(pixels(1, 2), raw=True))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "FMNIST_MAX_BODY_BYTES_IN_FLIGHT" in (raised.value.details() or "")
    assert ("retry-after", "1") in tuple(raised.value.trailing_metadata() or ())


def test_generated_code_is_what_make_proto_writes(tmp_path: Path) -> None:
    """Regenerating from grpc_predict_v2.proto (the Makefile's command) gives the checked-in files."""
    makefile = (REPO / "Makefile").read_text()
    command = next(
        line.split(":=", 1)[1].split()
        for line in makefile.splitlines()
        if line.startswith("PROTO_COMMAND")
    )
    assert command[:3] == ["python", "-m", "grpc_tools.protoc"]
    out = [arg.replace("=.", f"={tmp_path}") if arg.endswith("_out=.") else arg for arg in command]
    subprocess.run([sys.executable, *out[1:]], cwd=REPO, check=True)
    for name in (
        "grpc_predict_v2_pb2.py",
        "grpc_predict_v2_pb2.pyi",
        "grpc_predict_v2_pb2_grpc.py",
    ):
        generated = tmp_path / "app" / "gateway" / "v2" / name
        assert generated.read_text() == (V2 / name).read_text(), f"{name}: run `make proto`"
