"""Route `GET /v1/models/{name}/shadow`: how each shadow candidate of a model compares with the live version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field

from app.gateway.deps import GatewayDep, get_owner
from app.gateway.errors import ApiError, error_responses

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(get_owner)])


class Percentiles(BaseModel):
    p50: float | None = Field(description="Milliseconds; null before any sample.")
    p99: float | None


class CandidateComparison(BaseModel):
    """One candidate version against the live version, over the requests this gateway joined."""

    version: str = Field(examples=["4c1d9e0a7b22"], description="The candidate's full version id.")
    samples: int = Field(description="Requests both answered (or failed) in the window.")
    agreement: float | None = Field(
        examples=[0.93], description="Share with the same top-1 class; null before any sample."
    )
    disagreement: dict[str, dict[str, int]] = Field(
        examples=[{"Shirt": {"T-shirt/top": 4}}],
        description="Live class -> candidate class -> requests, where they differ.",
    )
    labelled: int = Field(description="Samples whose request carried a `label` in its metadata.")
    live_accuracy: float | None
    candidate_accuracy: float | None
    live_latency_ms: Percentiles = Field(description="Forward-pass time, as workers report it.")
    candidate_latency_ms: Percentiles
    dropped: int = Field(description="Answers dropped while waiting for their other side.")
    since: float = Field(description="Unix seconds when this gateway began the comparison.")


class ShadowReport(BaseModel):
    model: str = Field(examples=["fmnist"])
    candidates: list[CandidateComparison]


@router.get(
    "/models/{name}/shadow",
    response_model=ShadowReport,
    summary="Compare shadow candidates with the live version",
    responses=error_responses(401, 403, 404),
)
async def get_shadow_report(
    gateway: GatewayDep,
    name: Annotated[str, Path(max_length=128, description="The model's name.")],
) -> ShadowReport:
    """Agreement, per-class disagreement, accuracy on labelled requests and latency of each shadow
    candidate (`fmnist worker --shadow`), newest first; an empty list when none runs. 404
    `model_not_found` for an unknown model."""
    candidates = gateway.shadow.candidates(name)
    if not candidates and not gateway.registry.versions(name):
        known = ", ".join(gateway.registry.names()) or "none yet"
        raise ApiError(404, "model_not_found", f"no model {name!r}; known models: {known}")
    return ShadowReport(
        model=name, candidates=[CandidateComparison.model_validate(c) for c in candidates]
    )
