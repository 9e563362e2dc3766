"""Routes of a model's rollout: `PUT /v1/models/{name}/weights` (admin) and
`GET`/`POST /v1/models/{name}/history` (posting is admin), on the rollout topic (`app.gateway.rollout`)."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection

from app.gateway.deps import GatewayDep, get_gateway_of, get_owner
from app.gateway.errors import ApiError, error_responses
from app.gateway.rollout import HistoryEntry, resolve_weights, rollout_message
from app.gateway.service import Gateway
from app.logs import kv
from app.protocol import RolloutEvent, TrafficWeights

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["models"])

ModelName = Annotated[str, Path(max_length=128, description="The model's name.")]


async def get_admin(connection: HTTPConnection) -> str:
    """The admin caller's owner fingerprint ("" with no key configured); 401/403 otherwise."""
    return get_gateway_of(connection).api_keys.admin_of(connection)


AdminDep = Annotated[str, Depends(get_admin)]


class WeightsRequest(BaseModel):
    """A new split of a model's live traffic."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, int] = Field(
        examples=[{"c90190025781": 90, "v2": 10}],
        description="Version (full id, unique prefix or tag) -> percent, summing to 100; `{}` clears "
        "the split.",
    )
    reason: str = Field("", max_length=1000, examples=["canary of v2"])


class WeightsResponse(BaseModel):
    """The split now in force on this gateway (the others apply it within a second)."""

    model: str
    weights: dict[str, int] = Field(description="Full version id -> percent.")
    set_at: float = Field(description="Unix seconds.")


class EventRequest(BaseModel):
    """A rollout decision to record: a `RolloutEvent` without `at`/`by`, which the gateway stamps."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The model; defaults to the one in the path.")
    candidate: str = Field(description="Full version id of the candidate.")
    action: Literal[
        "started", "gate_passed", "gate_failed", "step", "rolled_back", "promoted", "aborted"
    ]
    figures: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)
    weights: dict[str, int] = Field(default_factory=dict)
    detail: str = Field("", max_length=10_000)


class WeightsEntry(TrafficWeights):
    """A weights change, as the history shows it."""

    kind: Literal["weights"] = "weights"


class EventEntry(RolloutEvent):
    """A rollout decision, as the history shows it."""

    kind: Literal["event"] = "event"


class History(BaseModel):
    model: str
    events: list[WeightsEntry | EventEntry] = Field(description="Oldest first.")


def _known_model(gateway: Gateway, name: str) -> None:
    """404 `model_not_found` unless a worker announced `name`."""
    if not gateway.registry.versions(name):
        known = ", ".join(gateway.registry.names()) or "none yet"
        raise ApiError(404, "model_not_found", f"no model {name!r}; known models: {known}")


async def _publish(gateway: Gateway, entry: HistoryEntry) -> None:
    """Put `entry` on the rollout topic, then apply it here at once; 503 when the broker refuses."""
    pubsub = gateway.require_ready()
    data, key, attributes = rollout_message(entry)
    try:
        await pubsub.publish(gateway.settings.rollout_topic, data, key=key, attributes=attributes)
    except Exception as exc:  # any broker failure: the change is not made, the caller may retry
        raise ApiError(
            503,
            "broker_unavailable",
            f"the rollout topic did not take the change ({exc}); retry later",
            headers={"Retry-After": "2"},
        ) from None
    gateway.rollout.apply(entry)


@router.put(
    "/models/{name}/weights",
    response_model=WeightsResponse,
    summary="Set a model's traffic weights",
    responses=error_responses(401, 403, 404, 422, 503),
)
async def put_weights(
    gateway: GatewayDep, admin: AdminDep, name: ModelName, body: WeightsRequest
) -> WeightsResponse:
    """Split the model's unpinned traffic between its versions by percent (admin); every gateway
    applies it. 422 `invalid_weights` for an unknown or ambiguous version, a negative percent or a
    total other than 100."""
    _known_model(gateway, name)
    weights = resolve_weights(name, body.weights, gateway.registry.versions(name))
    entry = TrafficWeights(
        model=name, weights=weights, set_at=time.time(), set_by=admin, reason=body.reason
    )
    await _publish(gateway, entry)
    log.info(kv("traffic_weights_set", model=name, by=admin, reason=body.reason))
    return WeightsResponse(model=name, weights=weights, set_at=entry.set_at)


@router.get(
    "/models/{name}/history",
    response_model=History,
    summary="A model's rollout history",
    dependencies=[Depends(get_owner)],
    responses=error_responses(401, 403, 404),
)
async def get_history(gateway: GatewayDep, name: ModelName) -> History:
    """The model's weights changes and rollout decisions, oldest first (the newest
    `FMNIST_ROLLOUT_HISTORY_SIZE`)."""
    entries = gateway.rollout.history(name)
    if not entries:
        _known_model(gateway, name)
    return History(model=name, events=[_shown(entry) for entry in entries])


def _shown(entry: HistoryEntry) -> WeightsEntry | EventEntry:
    if isinstance(entry, TrafficWeights):
        return WeightsEntry.model_validate(entry.model_dump())
    return EventEntry.model_validate(entry.model_dump())


@router.post(
    "/models/{name}/history",
    response_model=EventEntry,
    status_code=201,
    summary="Record a rollout decision",
    responses=error_responses(401, 403, 404, 422, 503),
)
async def post_history(
    gateway: GatewayDep, admin: AdminDep, name: ModelName, body: EventRequest
) -> EventEntry:
    """Record one decision of a promotion on the rollout topic (admin); the gateway stamps `at` and `by`."""
    if body.model is not None and body.model != name:
        raise ApiError(
            422, "invalid_event", f"the event is for model {body.model!r}, the path for {name!r}"
        )
    if not gateway.rollout.history(name):
        _known_model(gateway, name)
    event = RolloutEvent(**body.model_dump(exclude={"model"}), model=name, at=time.time(), by=admin)
    await _publish(gateway, event)
    return EventEntry.model_validate(event.model_dump())
