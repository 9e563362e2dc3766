"""The wire format between gateway and workers: request attributes and the result message.

Requests (`<requests_topic>.<model>`, e.g. `fmnist.requests.fmnist`, no key; see
`requests_topic_for`): the payload is the image as raw uint8 pixels,
C×H×W, row-major, already normalised to the model's input by the gateway. Attributes carry
everything else (all values are strings, as every broker allows):

| attribute      | meaning                                                         |
| -------------- | --------------------------------------------------------------- |
| `request_id`   | the id the client polls; its result carries it too              |
| `shape`        | `C,H,W` of the payload, e.g. `1,28,28`                          |
| `submitted_at` | unix seconds (float) when the gateway accepted the request      |
| `deadline`     | unix seconds after which a worker drops the request as expired  |
| `owner`        | fingerprint of the API key that submitted it (`""` without auth) |
| `metadata`     | JSON object of client strings echoed in the result (optional)   |
| `attempt`      | try number, 1 on first publish; a worker re-queues a request    |
|                | with it raised by one after a model error                       |
| `model`        | the model's name                                                 |
| `model_version`| the version the request was pinned to (only on pinned requests) |
| `gateway`      | id of the gateway that accepted it (only with shared state)     |

Results (`fmnist.results`, no key): one JSON `ResultMessage` per request. A worker may
publish the same request id twice after a redelivery; consumers keep the first. Attributes repeat
what a gateway needs to route a result without decoding it: `request_id`, `owner`, `completed_at`
(unix seconds) and `gateway` when the request carried one.

Neither carries a key: a key is an ordering key, and a request id orders nothing. Without one the
Kafka backend puts a burst of records in one partition's batch (the sticky partitioner) instead of
one small batch per partition. Messages from before (the id as the key) still read the same:
`request_id_from` falls back to the key.

Each model has its own requests topic and worker group, so it scales and shows its backlog on its
own; a request pinned to a version goes to that version's topic (`<requests_topic>.<model>.v-<version>`), which only workers of that version read, in their own group: no
worker ever holds a request it cannot answer, so nothing is handed back and forth.

Models (`fmnist.control`): each worker publishes a `ModelAnnouncement` per model it serves when it
starts, again every heartbeat interval, and once with `status: leaving` when it drains. Gateways
learn the models, versions and live workers from them.

Rollout (`fmnist.rollout`, key = model name): `TrafficWeights` (attribute `kind=weights`), the split of a
model's live traffic between its versions, and `RolloutEvent` (`kind=event`), one decision of a promotion.
Gateways apply the newest weights per model and keep the events as the model's history; shadow workers
read the weights to find every topic that carries a model's live traffic. Readers start from the topic's
beginning, so a new gateway applies the split that is in force.

Shadow results (`fmnist.results.shadow`): a `ResultMessage` per request from a worker started with
`role="shadow"`, which reads a model's live traffic in a group of its own
(`shadow_group_for`) and never answers clients.

Dead letters (`fmnist.deadletter`): the original payload and attributes plus `error_code` and
`error_message` attributes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
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
MODEL_ATTR = "model"
MODEL_VERSION_ATTR = "model_version"
GATEWAY_ATTR = "gateway"
COMPLETED_AT_ATTR = "completed_at"
KIND_ATTR = "kind"  # on the rollout topic: which message the payload is
WEIGHTS_KIND = "weights"
EVENT_KIND = "event"

# A model name is part of topic and group names: Kafka and Pub/Sub both accept these characters.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def check_model_name(name: str) -> str:
    """`name` if it can name a model (letters, digits, `_`, `-`; up to 63); else ValueError."""
    if not MODEL_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"model name {name!r}: use letters, digits, '_' and '-' (at most 63, starting with a "
            "letter or digit); it becomes part of topic names"
        )
    return name


def requests_topic_for(requests_topic: str, model: str, version: str | None = None) -> str:
    """The topic of `model`'s requests (`fmnist.requests.fmnist`), or of those pinned to `version`."""
    topic = f"{requests_topic}.{model}"
    return topic if version is None else f"{topic}.v-{version}"


def worker_group_for(worker_group: str, model: str, version: str | None = None) -> str:
    """The consumer group of `model`'s workers (`workers.fmnist`), or of `version`'s pinned requests."""
    group = f"{worker_group}.{model}"
    return group if version is None else f"{group}.v-{version}"


def shadow_group_for(worker_group: str, model: str, version: str) -> str:
    """The consumer group of `version`'s shadow workers of `model` (`workers.fmnist.shadow-<version>`):
    its own position on the live topics, so it reads a copy of the traffic and takes nothing away."""
    return f"{worker_group}.{model}.shadow-{version}"


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
    model: str | None = None
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


class ModelAnnouncement(BaseModel):
    """A worker's word about one model it serves, on the control topic: sent at start, every
    `heartbeat_s`, and with `status="leaving"` when it drains. Live while heartbeats are fresh."""

    model_config = ConfigDict(frozen=True)

    worker_id: str
    name: str
    version: str = Field(description="content hash of what changes the answers")
    tag: str | None = None
    input_shape: tuple[int, int, int] = Field(description="C, H, W")
    dtype: str = "uint8"
    class_names: tuple[str, ...]
    preprocessing: dict[str, object] = Field(default_factory=dict)
    precision: str = ""
    device: str = ""
    status: Literal["live", "leaving"] = "live"
    role: Literal["serving", "shadow"] = Field(
        "serving", description="`shadow`: reads a copy of live traffic, never answers clients"
    )
    sent_at: float = Field(description="unix seconds, the worker's clock")
    heartbeat_s: float = Field(gt=0, description="the worker announces again within this")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelAnnouncement:
        return cls.model_validate_json(data)


class TrafficWeights(BaseModel):
    """How a model's live traffic splits between its versions, in percent (summing to 100). Empty
    `weights`: no split, every serving version shares the model's topic. The newest message per model
    (by `set_at`) is in force on every gateway."""

    model_config = ConfigDict(frozen=True)

    model: str
    weights: dict[str, int] = Field(default_factory=dict, description="full version id -> percent")
    set_at: float = Field(description="unix seconds")
    set_by: str = Field("", description="who set it: an API key's fingerprint, or `promote`")
    reason: str = ""

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrafficWeights:
        return cls.model_validate_json(data)


class RolloutEvent(BaseModel):
    """One decision of a promotion, with the figures it was taken on; `fmnist models history` shows them."""

    model_config = ConfigDict(frozen=True)

    model: str
    candidate: str = Field(description="full version id of the candidate")
    action: Literal[
        "started", "gate_passed", "gate_failed", "step", "rolled_back", "promoted", "aborted"
    ]
    figures: dict[str, float] = Field(default_factory=dict)
    weights: dict[str, int] = Field(
        default_factory=dict, description="the split after this decision"
    )
    detail: str = ""
    at: float = Field(description="unix seconds")
    by: str = ""

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RolloutEvent:
        return cls.model_validate_json(data)


def request_id_from(attributes: Mapping[str, str], key: str | None) -> str:
    """The request id of a request or result message: its `request_id` attribute, else its key
    (where messages published before the id moved out of the key carry it)."""
    return attributes.get(REQUEST_ID_ATTR) or key or ""


def result_attributes(
    request: Mapping[str, str], completed_at: float, request_id: str
) -> dict[str, str]:
    """A result's attributes, from its request's: what a gateway routes it by without decoding it."""
    attributes = {
        REQUEST_ID_ATTR: request_id,
        OWNER_ATTR: request.get(OWNER_ATTR, ""),
        COMPLETED_AT_ATTR: repr(completed_at),
    }
    if gateway := request.get(GATEWAY_ATTR):
        attributes[GATEWAY_ATTR] = gateway
    return attributes


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
