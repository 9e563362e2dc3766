"""FastAPI dependencies as `Annotated` aliases: settings, the gateway runtime, and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from app.gateway.service import Gateway
from app.settings import Settings

# Dependencies are `async def` on purpose: FastAPI runs sync ones in a thread pool, one thread hop
# per dependency per request, which profiles showed as a tenth of the gateway's event-loop time.


def get_gateway_of(connection: HTTPConnection) -> Gateway:
    """The app's gateway runtime (created by `create_app`, started by its lifespan)."""
    gateway: Gateway = connection.app.state.gateway
    return gateway


async def get_gateway(connection: HTTPConnection) -> Gateway:
    """The app's gateway runtime, as a dependency (`GatewayDep`)."""
    return get_gateway_of(connection)


async def get_app_settings(connection: HTTPConnection) -> Settings:
    """The settings the app was created with (tests pass their own to `create_app`)."""
    settings: Settings = connection.app.state.settings
    return settings


def caller_of(connection: HTTPConnection) -> tuple[Gateway, str]:
    """The app's gateway and the caller's owner fingerprint ("" with auth off); 401/403 when a key
    is required. The submit routes, the hot path, call it directly rather than as dependencies."""
    gateway = get_gateway_of(connection)
    return gateway, gateway.api_keys.owner_of(connection)


async def get_owner(connection: HTTPConnection) -> str:
    """The caller's owner fingerprint, as a dependency (`OwnerDep`)."""
    return caller_of(connection)[1]


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
OwnerDep = Annotated[str, Depends(get_owner)]
