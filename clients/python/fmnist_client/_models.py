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
class LiveStats:
    """One version's results that the answering gateway routed in the last `window_s` seconds."""

    window_s: float
    requests: int
    failed: int
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LiveStats:
        return cls(
            window_s=float(data.get("window_s", 0.0)),
            requests=int(data.get("requests", 0)),
            failed=int(data.get("failed", 0)),
            error_rate=float(data.get("error_rate", 0.0)),
            p50_ms=_optional_float(data.get("p50_ms")),
            p99_ms=_optional_float(data.get("p99_ms")),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


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
    live: LiveStats | None = None  # None from a gateway without rollout figures

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
            live=LiveStats.from_json(data["live"]) if data.get("live") else None,
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
    weights: dict[str, int] = field(
        default_factory=dict
    )  # full version id -> percent; {}: no split

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
            weights=_weights(data.get("weights")),
        )


def _weights(data: Any) -> dict[str, int]:
    return {str(version): int(percent) for version, percent in (data or {}).items()}


@dataclass(frozen=True)
class TrafficWeights:
    """A split of a model's live traffic between its versions, in percent ({}: no split)."""

    model: str
    weights: dict[str, int]
    set_at: float
    set_by: str = ""
    reason: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrafficWeights:
        return cls(
            model=str(data["model"]),
            weights=_weights(data.get("weights")),
            set_at=float(data["set_at"]),
            set_by=str(data.get("set_by", "")),
            reason=str(data.get("reason", "")),
        )


@dataclass(frozen=True)
class RolloutEvent:
    """One decision of a rollout (a gate, a step, a promotion or rollback) with its figures."""

    model: str
    candidate: str
    action: str
    figures: dict[str, float]
    weights: dict[str, int]
    detail: str
    at: float
    by: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutEvent:
        return cls(
            model=str(data["model"]),
            candidate=str(data["candidate"]),
            action=str(data["action"]),
            figures={str(k): float(v) for k, v in (data.get("figures") or {}).items()},
            weights=_weights(data.get("weights")),
            detail=str(data.get("detail", "")),
            at=float(data["at"]),
            by=str(data.get("by", "")),
        )


def history_entry(data: dict[str, Any]) -> TrafficWeights | RolloutEvent:
    """One item of `GET /v1/models/{name}/history`, by its `kind`."""
    if data.get("kind") == "weights":
        return TrafficWeights.from_json(data)
    return RolloutEvent.from_json(data)
