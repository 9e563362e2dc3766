"""The wire format between gateway and workers: request attributes and the result message.

Requests (`fmnist.requests`, key = request id): the payload is the image as raw uint8 pixels,
C×H×W, row-major, already normalised to the model's input by the gateway. Attributes carry
everything else (all values are strings, as every broker allows):

| attribute      | meaning                                                         |
| -------------- | --------------------------------------------------------------- |
| `request_id`   | the id the client polls; results are keyed by it                |
| `shape`        | `C,H,W` of the payload, e.g. `1,28,28`                          |
| `submitted_at` | unix seconds (float) when the gateway accepted the request      |
| `deadline`     | unix seconds after which a worker drops the request as expired  |
| `owner`        | fingerprint of the API key that submitted it (`""` without auth) |
| `metadata`     | JSON object of client strings echoed in the result (optional)   |
| `attempt`      | try number, 1 on first publish; a worker re-queues a request    |
|                | with it raised by one after a model error                       |

Results (`fmnist.results`, key = request id): one JSON `ResultMessage` per request. A worker may
publish the same request id twice after a redelivery; consumers keep the first.
Dead letters (`fmnist.deadletter`): the original payload and attributes plus `error_code` and
`error_message` attributes.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SHAPE_ATTR = "shape"
REQUEST_ID_ATTR = "request_id"
SUBMITTED_AT_ATTR = "submitted_at"
DEADLINE_ATTR = "deadline"
OWNER_ATTR = "owner"
METADATA_ATTR = "metadata"
ATTEMPT_ATTR = "attempt"
ERROR_CODE_ATTR = "error_code"
ERROR_MESSAGE_ATTR = "error_message"


class ErrorInfo(BaseModel):
    """Why one request failed. `code` is stable and machine-readable."""

    model_config = ConfigDict(frozen=True)

    code: str = Field(examples=["deadline_exceeded"])
    message: str = Field(examples=["request expired after 60.0 s in the queue"])


class ResultMessage(BaseModel):
    """One request's outcome, as workers publish it and gateways serve it."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    status: Literal["completed", "failed"]
    label: int | None = None
    class_name: str | None = None
    probabilities: list[float] | None = None
    model_version: str | None = None
    batch_id: str | None = None
    batch_size: int | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None
    worker_id: str | None = None
    completed_at: float = Field(description="unix seconds when the worker finished it")
    owner: str = ""
    metadata: dict[str, str] = Field(default_factory=dict)
    error: ErrorInfo | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ResultMessage:
        return cls.model_validate_json(data)


def encode_shape(shape: tuple[int, ...]) -> str:
    return ",".join(str(int(d)) for d in shape)


def decode_shape(text: str) -> tuple[int, int, int]:
    """Parse `C,H,W`; raises ValueError on anything else."""
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3 or any(p <= 0 for p in parts):
        raise ValueError(f"shape must be three positive integers C,H,W, got {text!r}")
    return parts


def encode_metadata(metadata: dict[str, str]) -> str:
    return json.dumps(metadata, separators=(",", ":"), sort_keys=True)


def decode_metadata(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("metadata must be a JSON object")
    return {str(k): str(v) for k, v in value.items()}
