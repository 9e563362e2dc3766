"""Open Inference Protocol (v2) against /v1 on one `fmnist serve`, on the same images in one run.

    .venv/bin/python -m bench.v2 --duration 5 --batch 64 --concurrency 8

Modes, each for `--duration` seconds with `--concurrency` requests in flight (asyncio clients in
this process; the machine's cores are shared with the server, equally for every mode):
  v1-batch     POST /v1/predictions:batch?wait=30, an .npy N×1×28×28 uint8 array
  v2-http      POST /v2/models/fmnist/infer, binary tensor data (UINT8 N×1×28×28 in, binary out)
  v2-grpc      ModelInfer with raw_input_contents (our generated stub, grpc.aio)
  v1-single    POST /v1/predictions?wait=10, one PNG in multipart (as bench/http_single.py sends it)
  v2-grpc-single  ModelInfer with one image
Reported: images/s of answered requests and the goal ratios of issue 16.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.e2e

from app.gateway.v2 import grpc_predict_v2_pb2 as pb
from app.gateway.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from bench.http_single import BOUNDARY, DATA_DIR, multipart_body
from tests.e2e import processes
from tests.e2e.images import load_test_images, png_bytes

Call = Callable[[int], Awaitable[int]]  # request number -> images answered


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def v2_body(batch: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = batch.tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "UINT8",
                    "shape": list(batch.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def grpc_request(batch: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fmnist")
    request.inputs.append(
        pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=batch.shape)
    )
    request.raw_input_contents.append(batch.tobytes())
    return request


async def drive(call: Call, duration: float, concurrency: int) -> float:
    """Images/s answered by `concurrency` loops calling `call` for `duration` seconds."""
    stop = time.perf_counter() + duration
    counts = [0] * concurrency

    async def loop(slot: int) -> None:
        number = slot
        while time.perf_counter() < stop:
            counts[slot] += await call(number)
            number += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(loop(slot) for slot in range(concurrency)))
    return sum(counts) / (time.perf_counter() - started)


async def measure(url: str, grpc_address: str, args: argparse.Namespace) -> dict[str, float]:
    images, _ = load_test_images(DATA_DIR, 1024)
    images = images.reshape(-1, 1, 28, 28)
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    npys = [npy(batch) for batch in batches]
    v2_bodies = [v2_body(batch) for batch in batches]
    grpc_batches = [grpc_request(batch) for batch in batches]
    grpc_singles = [grpc_request(images[i : i + 1]) for i in range(256)]
    single_pngs = [multipart_body([png_bytes(images[i, 0])], "file") for i in range(256)]
    limits = httpx.Limits(max_connections=args.concurrency)
    async with (
        httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http,
        grpc.aio.insecure_channel(grpc_address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def v1_batch(n: int) -> int:
            body = npys[n % len(npys)]
            answer = await http.post(
                "/v1/predictions:batch?wait=30",
                content=body,
                headers={"Content-Type": "application/x-npy"},
            )
            return len(answer.json()["items"]) if answer.status_code == 200 else 0

        async def v2_http(n: int) -> int:
            body, headers = v2_bodies[n % len(v2_bodies)]
            answer = await http.post("/v2/models/fmnist/infer", content=body, headers=headers)
            return len(batches[n % len(batches)]) if answer.status_code == 200 else 0

        async def v2_grpc(n: int) -> int:
            await stub.ModelInfer(grpc_batches[n % len(grpc_batches)])
            return len(batches[n % len(batches)])

        async def v1_single(n: int) -> int:
            answer = await http.post(
                "/v1/predictions?wait=10",
                content=single_pngs[n % 256],
                headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
            )
            return 1 if answer.status_code == 200 else 0

        async def v2_grpc_single(n: int) -> int:
            await stub.ModelInfer(grpc_singles[n % 256])
            return 1

        modes: dict[str, tuple[Call, int]] = {
            "v1-batch": (v1_batch, args.concurrency),
            "v2-http": (v2_http, args.concurrency),
            "v2-grpc": (v2_grpc, args.concurrency),
            "v1-single": (v1_single, args.single_concurrency),
            "v2-grpc-single": (v2_grpc_single, args.single_concurrency),
        }
        results: dict[str, float] = {}
        for name, (call, concurrency) in modes.items():
            await drive(call, 1.0, concurrency)  # warm-up
            results[name] = await drive(call, args.duration, concurrency)
            print(f"{name:>15}: {results[name]:8.0f} images/s", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--single-concurrency", type=int, default=64)
    args = parser.parse_args()
    http_port, grpc_port = processes.free_port(), processes.free_port()
    log_dir = Path("/tmp") / "fmnist-bench-v2"
    log_dir.mkdir(exist_ok=True)
    env = {"FMNIST_PORT": str(http_port), "FMNIST_GRPC_PORT": str(grpc_port)}
    server = processes.fmnist("serve", "serve", log_dir, env).start()
    with processes.stopping(server):
        url = f"http://127.0.0.1:{http_port}"
        server.wait_for_http(f"{url}/readyz", timeout=120)
        results = asyncio.run(measure(url, f"127.0.0.1:{grpc_port}", args))
    print(f"v2-http / v1-batch: {results['v2-http'] / results['v1-batch']:.2f} (goal >= 0.9)")
    print(f"v2-grpc / v1-batch: {results['v2-grpc'] / results['v1-batch']:.2f} (goal >= 0.9)")
    ratio = results["v2-grpc-single"] / results["v1-single"]
    print(f"v2-grpc-single / v1-single: {ratio:.2f} (goal >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
