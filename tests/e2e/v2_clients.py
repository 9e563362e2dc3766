"""Run one real Open Inference Protocol client against a running service; print what it saw as JSON.

    python -m tests.e2e.v2_clients CLIENT HTTP_URL GRPC_ADDRESS DATA_DIR COUNT [BATCH]

CLIENT: triton-http, triton-grpc, kserve-rest or kserve-grpc, each with its default settings. Each
runs in its own process: tritonclient and kserve register the same protobuf names
(`inference.ModelInferRequest`, …) in protobuf's default pool, and one process cannot import both.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.e2e.images import load_test_images

MODEL = "fmnist"


def triton(kind: str, url: str, images: np.ndarray, batch: int) -> dict[str, Any]:
    if kind == "http":
        import tritonclient.http as client
    else:
        import tritonclient.grpc as client  # type: ignore[no-redef]
    server = client.InferenceServerClient(url=url)
    metadata = server.get_model_metadata(MODEL)
    if kind == "grpc":
        from google.protobuf.json_format import MessageToDict

        metadata = MessageToDict(metadata)
    labels: list[int] = []
    names: list[str] = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch].reshape(-1, 1, 28, 28)
        tensor = client.InferInput("input", list(chunk.shape), "UINT8")
        tensor.set_data_from_numpy(chunk)
        result = server.infer(MODEL, [tensor])
        labels += result.as_numpy("label").tolist()
        names += [name.decode() for name in result.as_numpy("class_name").tolist()]
    return {
        "live": server.is_server_live(),
        "ready": server.is_server_ready(),
        "model_ready": server.is_model_ready(MODEL),
        "metadata": metadata,
        "labels": labels,
        "class_names": names,
    }


async def kserve(kind: str, url: str, images: np.ndarray, batch: int) -> dict[str, Any]:
    from kserve import InferInput, InferRequest

    if kind == "rest":
        from kserve import InferenceRESTClient, RESTConfig

        client: Any = InferenceRESTClient(RESTConfig(protocol="v2"))
        base = url
        live = await client.is_server_live(base)
        ready = await client.is_server_ready(base)
        model_ready = await client.is_model_ready(base, MODEL)
    else:
        from kserve import InferenceGRPCClient

        client = InferenceGRPCClient(url)
        live = await client.is_server_live()
        ready = await client.is_server_ready()
        model_ready = await client.is_model_ready(MODEL)
    labels: list[int] = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch].reshape(-1, 1, 28, 28)
        tensor = InferInput("input", list(chunk.shape), "UINT8")
        tensor.set_data_from_numpy(chunk)
        request = InferRequest(model_name=MODEL, infer_inputs=[tensor])
        if kind == "rest":
            response = await client.infer(base, request, model_name=MODEL)
        else:
            response = await client.infer(request)
        output = next(o for o in response.outputs if o.name == "label")
        labels += np.asarray(output.as_numpy()).reshape(-1).tolist()
    await client.close()
    return {"live": live, "ready": ready, "model_ready": model_ready, "labels": labels}


def main(argv: list[str]) -> int:
    client, http_url, grpc_address, data_dir, count = argv[:5]
    batch = int(argv[5]) if len(argv) > 5 else 64
    images, truth = load_test_images(Path(data_dir), int(count))
    family, kind = client.split("-")
    host = http_url.removeprefix("http://")
    if family == "triton":
        seen = triton(kind, host if kind == "http" else grpc_address, images, batch)
    else:
        seen = asyncio.run(
            kserve(kind, http_url if kind == "rest" else grpc_address, images, batch)
        )
    seen["truth"] = truth.tolist()
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
