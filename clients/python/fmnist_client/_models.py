"""Typed results: `Prediction` (one request's state or outcome), `ErrorDetail`, and the models a
gateway serves (`ModelInfo`, `ModelVersionInfo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pending", "completed", "failed"]


@dataclass(frozen=True)
class ErrorDetail:
    """Why a request failed: a stable machine-readable `code` and a human `message`."""

    code: str
    message: str


@dataclass(frozen=True)
class Prediction:
    """One request as the service reports it.

    `status` is "pending" until a worker answers, then "completed" (label, class name and
    probabilities are set) or "failed" (`error` is set). Latencies are in milliseconds:
    `queue_ms` from acceptance to the start of the batch, `inference_ms` the batch's forward pass.
    `cursor` is set on results received from `AsyncClient.stream()`.
    """

    request_id: str
    status: Status
    label: int | None = None
    class_name: str | None = None
    probabilities: list[float] | None = None
    model: str | None = None
    model_version: str | None = None
    batch_id: str | None = None
    batch_size: int | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None
    worker_id: str | None = None
    completed_at: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    error: ErrorDetail | None = None
    cursor: int | None = None

    @property
    def done(self) -> bool:
        """True once the request is completed or failed."""
        return self.status != "pending"

    @property
    def service_ms(self) -> float | None:
        """Time spent inside the service (queue + inference), when both are known."""
        if self.queue_ms is None or self.inference_ms is None:
            return None
        return self.queue_ms + self.inference_ms

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prediction:
        """Build from the gateway's `PredictionResponse` JSON (unknown keys are ignored)."""
        error = data.get("error")
        return cls(
            request_id=str(data["request_id"]),
            status=data.get("status", "pending"),
            label=data.get("label"),
            class_name=data.get("class_name"),
            probabilities=data.get("probabilities"),
            model=data.get("model"),
            model_version=data.get("model_version"),
            batch_id=data.get("batch_id"),
            batch_size=data.get("batch_size"),
            queue_ms=data.get("queue_ms"),
            inference_ms=data.get("inference_ms"),
            worker_id=data.get("worker_id"),
            completed_at=data.get("completed_at"),
            metadata=dict(data.get("metadata") or {}),
            error=ErrorDetail(str(error.get("code")), str(error.get("message")))
            if isinstance(error, dict)
            else None,
            cursor=data.get("cursor"),
        )


@dataclass(frozen=True)
class ModelVersionInfo:
    """One version of a model, as its workers announced it."""

    version: str
    tag: str | None
    input_shape: tuple[int, int, int]
    dtype: str
    class_names: list[str]
    preprocessing: dict[str, Any]
    precision: str
    device: str
    live_workers: int
    ready: bool

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelVersionInfo:
        c, h, w = (int(d) for d in data["input_shape"])
        return cls(
            version=str(data["version"]),
            tag=data.get("tag"),
            input_shape=(c, h, w),
            dtype=str(data.get("dtype", "uint8")),
            class_names=[str(n) for n in data.get("class_names", [])],
            preprocessing=dict(data.get("preprocessing") or {}),
            precision=str(data.get("precision", "")),
            device=str(data.get("device", "")),
            live_workers=int(data.get("live_workers", 0)),
            ready=bool(data.get("ready", False)),
        )


@dataclass(frozen=True)
class ModelInfo:
    """A model the service knows: its versions (newest first), readiness and the newest's input."""

    name: str
    default: bool
    ready: bool
    live_workers: int
    input_shape: tuple[int, int, int]
    class_names: list[str]
    versions: list[ModelVersionInfo]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        c, h, w = (int(d) for d in data["input_shape"])
        return cls(
            name=str(data["name"]),
            default=bool(data.get("default", False)),
            ready=bool(data.get("ready", False)),
            live_workers=int(data.get("live_workers", 0)),
            input_shape=(c, h, w),
            class_names=[str(n) for n in data.get("class_names", [])],
            versions=[ModelVersionInfo.from_json(v) for v in data.get("versions", [])],
        )
