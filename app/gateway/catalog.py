"""Routes `GET /v1/models` and `GET /v1/models/{name}`: the models workers announced, their versions and
readiness, the traffic weights in force and each version's live figures on this gateway."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field

from app.gateway.deps import GatewayDep, get_owner
from app.gateway.errors import ApiError, error_responses
from app.gateway.registry import ModelRegistry, ModelVersion
from app.gateway.rollout import LiveStats, RolloutState

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(get_owner)])


class VersionInfo(BaseModel):
    """One version of a model, as its workers announced it."""

    version: str = Field(examples=["c90190025781"], description="Content hash.")
    tag: str | None = Field(None, examples=["v2"])
    input_shape: list[int] = Field(examples=[[1, 28, 28]], description="C, H, W.")
    dtype: str = Field(examples=["uint8"])
    class_names: list[str]
    preprocessing: dict[str, object]
    precision: str = Field(examples=["fp32"])
    device: str = Field(examples=["cpu"])
    live_workers: int
    ready: bool
    role: Literal["serving", "shadow"] = Field(
        "serving", description="`shadow`: reads a copy of live traffic, never answers clients."
    )
    shadow_workers: int = 0
    live: LiveStats


class ModelInfo(BaseModel):
    """A model: its versions (newest first) and whether any has a live worker."""

    name: str = Field(examples=["fmnist"])
    default: bool = Field(description="`POST /v1/predictions` goes to this model.")
    ready: bool
    live_workers: int
    input_shape: list[int] = Field(description="The newest version's C, H, W.")
    class_names: list[str] = Field(description="The newest version's classes.")
    versions: list[VersionInfo]
    weights: dict[str, int] = Field(
        examples=[{"c90190025781": 90, "d4e5f6a7b8c9": 10}],
        description="The split of unpinned traffic in force, full version id -> percent; {} = none.",
    )


class ModelList(BaseModel):
    default: str | None = Field(examples=["fmnist"])
    models: list[ModelInfo]


def _version_info(version: ModelVersion, live: LiveStats) -> VersionInfo:
    return VersionInfo(
        version=version.version,
        tag=version.tag,
        input_shape=list(version.input_shape),
        dtype=version.dtype,
        class_names=list(version.class_names),
        preprocessing=dict(version.preprocessing),
        precision=version.precision,
        device=version.device,
        live_workers=version.live_workers,
        ready=version.ready,
        role=version.role,
        shadow_workers=version.shadow_workers,
        live=live,
    )


def model_info(registry: ModelRegistry, rollout: RolloutState, name: str) -> ModelInfo | None:
    """What the registry knows of `name`, or None."""
    versions = registry.versions(name)
    if not versions:
        return None
    live = [v for v in versions if v.ready]
    newest = (live or versions)[0]
    return ModelInfo(
        name=name,
        default=name == registry.default_name,
        ready=bool(live),
        live_workers=sum(v.live_workers for v in versions),
        input_shape=list(newest.input_shape),
        class_names=list(newest.class_names),
        versions=[_version_info(v, rollout.live(name, v.version)) for v in versions],
        weights=rollout.weights(name),
    )


@router.get(
    "/models", response_model=ModelList, summary="List models", responses=error_responses(401, 403)
)
async def list_models(gateway: GatewayDep) -> ModelList:
    """Every model a worker announced: versions, input shape, classes, live workers and readiness."""
    registry = gateway.registry
    infos = [model_info(registry, gateway.rollout, name) for name in registry.names()]
    return ModelList(
        default=registry.default_name or None, models=[i for i in infos if i is not None]
    )


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    summary="Describe a model",
    responses=error_responses(401, 403, 404),
)
async def get_model(
    gateway: GatewayDep,
    name: Annotated[str, Path(max_length=128, description="The model's name.")],
) -> ModelInfo:
    """One model; 404 `model_not_found` listing the known ones."""
    info = model_info(gateway.registry, gateway.rollout, name)
    if info is None:
        known = ", ".join(gateway.registry.names()) or "none yet"
        raise ApiError(404, "model_not_found", f"no model {name!r}; known models: {known}")
    return info
