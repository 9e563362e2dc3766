"""Operations: health, readiness, Prometheus metrics, /v1/stats, OpenAPI docs, and no torch in the gateway."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.gateway.helpers import (
    fashion_like,
    gateway_settings,
    png_bytes,
    running_gateway,
    worker_running,
)

pytestmark = pytest.mark.timeout(30)


def test_gateway_never_imports_torch() -> None:
    """Importing app.gateway.main and creating the app leaves torch, and ml but its torch-free
    readers, stats and image policy, out of sys.modules."""
    code = (
        "import sys; from app.gateway.main import create_app; from app.settings import Settings; "
        "create_app(Settings(broker_url='memory://x')); "
        "torch_free = {'ml', 'ml.readers', 'ml.runner_stats', 'ml.imaging'}; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') "
        "or (m.split('.')[0] == 'ml' and m not in torch_free));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_healthz_and_readyz_answer_ok_when_connected() -> None:
    """Both probes answer 200 with the gateway id when the broker link is up."""
    settings = gateway_settings(gateway_id="probe-test")
    async with running_gateway(settings) as (_, client):
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert health.status_code == ready.status_code == 200
    assert ready.json() == {"status": "ok", "broker": "ok", "gateway_id": "probe-test"}


async def test_metrics_count_requests_results_and_batches() -> None:
    """/metrics exposes fmnist_ series for requests by route/status, results, batch sizes and in-flight."""
    settings = gateway_settings()
    async with running_gateway(settings) as (_, client), worker_running(settings):
        await client.post(
            "/v1/predictions?wait=5",
            content=png_bytes(fashion_like()),
            headers={"Content-Type": "image/png"},
        )
        await client.get("/v1/predictions/unknown")
        metrics = await client.get("/metrics")
    text = metrics.text
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert (
        'fmnist_http_requests_total{method="POST",route="/v1/predictions",status="200"} 1.0' in text
    )
    assert (
        'fmnist_http_requests_total{method="GET",route="/v1/predictions/{request_id}",status="404"} 1.0'
        in text
    )
    assert 'fmnist_predictions_total{outcome="completed"} 1.0' in text
    assert "fmnist_batch_size_bucket" in text and "fmnist_queue_seconds_bucket" in text
    assert "fmnist_in_flight 0.0" in text
    assert "fmnist_http_request_duration_seconds_bucket" in text


async def test_stats_snapshot_reflects_results() -> None:
    """/v1/stats reports completed counts, batch-size distribution and latency percentiles."""
    settings = gateway_settings()
    async with running_gateway(settings) as (_, client), worker_running(settings):
        for seed in range(3):
            await client.post(
                "/v1/predictions?wait=5",
                content=png_bytes(fashion_like(seed)),
                headers={"Content-Type": "image/png"},
            )
        stats = (await client.get("/v1/stats")).json()
    assert stats["completed"] == 3 and stats["failed"] == 0 and stats["in_flight"] == 0
    assert stats["batch_sizes"] == {"1": 3}
    assert stats["queue_ms"] == {"p50": 0.5, "p99": 0.5}
    assert stats["inference_ms"] == {"p50": 0.25, "p99": 0.25}
    assert set(stats) == {
        "in_flight",
        "completed",
        "failed",
        "throughput_per_s",
        "batch_sizes",
        "queue_ms",
        "inference_ms",
    }


async def test_openapi_documents_every_error_response() -> None:
    """/openapi.json lists the error statuses of the submit route with our error body, and /docs serves."""
    async with running_gateway(gateway_settings()) as (_, client):
        schema = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    submit = schema["paths"]["/v1/predictions"]["post"]
    assert {"200", "202", "400", "401", "403", "413", "415", "422", "429", "431", "503"} <= set(
        submit["responses"]
    )
    assert submit["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    assert "image/png" in submit["requestBody"]["content"]
    assert "/v1/predictions:batch" in schema["paths"] and "/v1/stats" in schema["paths"]
    assert docs.status_code == 200
