"""Response bodies of the HTTP API (for OpenAPI), and the fast builders the routes use to emit them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.gateway.errors import ErrorDetail
from app.gateway.results import StoredResult, Submission
from app.protocol import ErrorInfo


class Links(BaseModel):
    self: str = Field(examples=["/v1/predictions/5f0c6d2e9a8b4c1d8e7f6a5b4c3d2e1f"])


class PredictionResponse(BaseModel):
    """One prediction: `pending` until a worker answers, then `completed` (or `failed` with `error`)."""

    request_id: str = Field(examples=["5f0c6d2e9a8b4c1d8e7f6a5b4c3d2e1f"])
    status: Literal["pending", "completed", "failed"] = Field(examples=["completed"])
    label: int | None = Field(None, examples=[9], description="Index of the most probable class.")
    class_name: str | None = Field(None, examples=["Ankle boot"])
    probabilities: list[float] | None = Field(
        None,
        description="One probability per class, in class order.",
        examples=[[0.0, 0.0, 0.0, 0.0, 0.0, 0.001, 0.0, 0.002, 0.0, 0.997]],
    )
    model: str | None = Field(None, examples=["fmnist"], description="The model that answered.")
    model_version: str | None = Field(
        None, examples=["3f9a1c0b7d2e"], description="Its version (content hash)."
    )
    batch_id: str | None = Field(None, description="Id of the forward pass that computed it.")
    batch_size: int | None = Field(None, examples=[64], description="Images in that forward pass.")
    queue_ms: float | None = Field(None, description="Time waiting for the batch to form.")
    inference_ms: float | None = Field(None, description="Time of the batch's forward pass.")
    worker_id: str | None = None
    completed_at: float | None = Field(
        None, description="Unix seconds when the worker finished it."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="Echo of `X-Fmnist-Metadata`."
    )
    error: ErrorInfo | None = None
    links: Links


class BatchItemError(BaseModel):
    """An image of a batch that was refused; the other images were accepted."""

    index: int = Field(examples=[3], description="Position of the file in the request.")
    error: ErrorDetail


class BatchResponse(BaseModel):
    """One item per uploaded file, in order."""

    items: list[PredictionResponse | BatchItemError]


class StatsResponse(BaseModel):
    """A snapshot for dashboards (the demo page polls it)."""

    in_flight: int
    completed: int
    failed: int
    throughput_per_s: float = Field(description="Results per second over the last 10 s.")
    batch_sizes: dict[str, int] = Field(
        description="Batches seen, by size.", examples=[{"1": 3, "64": 40}]
    )
    queue_ms: dict[str, float | None] = Field(examples=[{"p50": 2.1, "p99": 6.5}])
    inference_ms: dict[str, float | None] = Field(examples=[{"p50": 1.4, "p99": 3.0}])


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    broker: str = Field(description="`ok`, or why the broker link is down.")
    gateway_id: str


_NULL_RESULT_FIELDS = {
    "label": None,
    "class_name": None,
    "probabilities": None,
    "model": None,
    "model_version": None,
    "batch_id": None,
    "batch_size": None,
    "queue_ms": None,
    "inference_ms": None,
    "worker_id": None,
    "completed_at": None,
}


def result_body(stored: StoredResult) -> dict[str, Any]:
    """`PredictionResponse` for a stored result, as a plain dict (no model validation on the hot path)."""
    result = stored.result
    return {
        "request_id": result.request_id,
        "status": result.status,
        "label": result.label,
        "class_name": result.class_name,
        "probabilities": result.probabilities,
        "model": result.model,
        "model_version": result.model_version,
        "batch_id": result.batch_id,
        "batch_size": result.batch_size,
        "queue_ms": result.queue_ms,
        "inference_ms": result.inference_ms,
        "worker_id": result.worker_id,
        "completed_at": result.completed_at,
        "metadata": result.metadata,
        "error": None
        if result.error is None
        else {"code": result.error.code, "message": result.error.message},
        "links": {"self": f"/v1/predictions/{result.request_id}"},
    }


def pending_body(request_id: str, submission: Submission | None) -> dict[str, Any]:
    """`PredictionResponse` for a request without a result yet."""
    return {
        "request_id": request_id,
        "status": "pending",
        **_NULL_RESULT_FIELDS,
        "metadata": submission.metadata if submission is not None else {},
        "error": None,
        "links": {"self": f"/v1/predictions/{request_id}"},
    }
