"""Operational routes: `/healthz` (liveness), `/readyz` (broker link), `/metrics` (Prometheus), `/v1/stats`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.gateway.deps import GatewayDep, get_owner
from app.gateway.errors import error_responses
from app.gateway.models import HealthResponse, StatsResponse
from app.gateway.service import RETRY_AFTER_BROKER_S

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz(gateway: GatewayDep) -> HealthResponse:
    """200 while the process serves HTTP, whatever the broker does (restart only if this fails)."""
    return HealthResponse(status="ok", broker=gateway.broker_status, gateway_id=gateway.gateway_id)


@router.get(
    "/readyz",
    response_model=HealthResponse,
    summary="Readiness",
    responses={
        503: {
            "model": HealthResponse,
            "description": "The broker is unreachable or the results consumer is down.",
        }
    },
)
async def readyz(gateway: GatewayDep) -> JSONResponse:
    """200 when the broker is reachable and the results consumer runs; 503 (with Retry-After) otherwise."""
    ready = gateway.ready
    body = HealthResponse(
        status="ok" if ready else "unavailable",
        broker=gateway.broker_status,
        gateway_id=gateway.gateway_id,
    )
    headers = None if ready else {"Retry-After": str(RETRY_AFTER_BROKER_S)}
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503, headers=headers)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
            "description": "Series prefixed `fmnist_`.",
        }
    },
)
async def metrics(gateway: GatewayDep) -> Response:
    """Every series of this gateway, in the Prometheus text format."""
    return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/stats",
    response_model=StatsResponse,
    summary="Live statistics",
    responses=error_responses(401, 403),
    dependencies=[Depends(get_owner)],
)
async def stats(gateway: GatewayDep) -> StatsResponse:
    """In-flight count, results, throughput and batching as seen by this gateway (the demo page polls it)."""
    return StatsResponse.model_validate(gateway.metrics.stats_snapshot())
