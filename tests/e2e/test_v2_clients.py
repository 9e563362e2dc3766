"""Unmodified tritonclient (HTTP, gRPC) and kserve (REST, gRPC) clients against a real service.

Each client runs with its defaults in its own process (`tests/e2e/v2_clients.py`), reads metadata,
checks readiness and classifies 500 real Fashion-MNIST test images at the shipped model's accuracy:
on `fmnist serve` (embedded broker) and on `fmnist gateway` + workers over Kafka (Tansu).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import processes
from tests.e2e.conftest import PROCESS_START_TIMEOUT_S, Stack

pytestmark = pytest.mark.timeout(300)
IMAGES = 500
CLIENTS = ["triton-http", "triton-grpc", "kserve-rest", "kserve-grpc"]
REPO = Path(__file__).resolve().parents[2]


def run_client(client: str, http_url: str, grpc_address: str, data_dir: Path) -> dict:
    argv = [sys.executable, "-m", "tests.e2e.v2_clients", client, http_url, grpc_address]
    done = subprocess.run(
        [*argv, str(data_dir), str(IMAGES)], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def accuracy(seen: dict) -> float:
    return sum(a == b for a, b in zip(seen["labels"], seen["truth"], strict=True)) / IMAGES


@pytest.fixture(scope="module")
def served(e2e_log_dir: Path, e2e_checkpoint: Path) -> Iterator[tuple[str, str]]:
    """`fmnist serve` with HTTP and gRPC on free ports: (HTTP URL, gRPC address)."""
    http_port, grpc_port = processes.free_port(), processes.free_port()
    env = {
        "FMNIST_PORT": str(http_port),
        "FMNIST_GRPC_PORT": str(grpc_port),
        "FMNIST_MODEL_PATH": str(e2e_checkpoint),
    }
    server = processes.fmnist("serve-v2", "serve", e2e_log_dir, env).start()
    with processes.stopping(server):
        url = f"http://127.0.0.1:{http_port}"
        server.wait_for_http(f"{url}/readyz", timeout=PROCESS_START_TIMEOUT_S)
        server.wait_for_port(grpc_port)
        yield url, f"127.0.0.1:{grpc_port}"


@pytest.mark.parametrize("client", CLIENTS)
def test_client_classifies_test_images_on_serve(
    client: str, served: tuple[str, str], fashion_mnist_dir: Path
) -> None:
    """The client sees a live, ready model and classifies 500 test images above 90% on `fmnist serve`."""
    seen = run_client(client, *served, fashion_mnist_dir)
    assert (seen["live"], seen["ready"], seen["model_ready"]) == (True, True, True)
    assert accuracy(seen) > 0.9


def test_triton_metadata_describes_the_model(
    served: tuple[str, str], fashion_mnist_dir: Path
) -> None:
    """tritonclient.http reads the model's input and outputs as the metadata route declares them."""
    seen = run_client("triton-http", *served, fashion_mnist_dir)
    metadata = seen["metadata"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "label", "class_name"]
    assert seen["class_names"][0] == "Ankle boot"  # the first test image


@pytest.mark.parametrize("client", CLIENTS)
def test_client_classifies_test_images_on_kafka(
    client: str, kafka_stack: Stack, fashion_mnist_dir: Path
) -> None:
    """Through a gateway and two workers on Kafka (Tansu), the client classifies above 90%."""
    gateway = kafka_stack.gateways["gateway"]
    match = re.search(r"event=grpc_serving address=127\.0\.0\.1:(\d+)", gateway.log_text())
    assert match is not None, "the gateway did not start its gRPC service"
    seen = run_client(
        client, kafka_stack.gateway_url(), f"127.0.0.1:{match.group(1)}", fashion_mnist_dir
    )
    assert accuracy(seen) > 0.9


def test_api_doc_example_runs(served: tuple[str, str]) -> None:
    """The tritonclient example of docs/api.md runs as written against the service."""
    text = (REPO / "docs" / "api.md").read_text()
    example = text.split("<!-- v2-example:start -->", 1)[1].split("<!-- v2-example:end -->", 1)[0]
    code = example.split("```python", 1)[1].split("```", 1)[0]
    code = code.replace("localhost:8000", served[0].removeprefix("http://"))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\['\w", done.stdout), done.stdout
