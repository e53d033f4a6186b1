"""What routes share: the app's state and the caller's key."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from serving.auth import ApiKey, KeyStore
from serving.policy import SitePolicy
from serving.settings import ServingSettings
from serving.store import ModelStore

# Declared for the OpenAPI docs (the "Authorize" button); the check itself is KeyStore.authorize.
_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer fm_...`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or the same key in `X-API-Key`")


@dataclass
class ServerState:
    settings: ServingSettings
    store: ModelStore
    keys: KeyStore
    jobs: object  # serving.head_jobs.HeadJobs
    policy: SitePolicy
    draining: bool = False  # set by serving.server when shutdown starts


def state(request: Request) -> ServerState:
    return request.app.state.fedmeta


# For hot routes that check the key inline (FastAPI's dependency machinery costs ~30 us per request there).
SECURITY_OPENAPI = {"security": [{"HTTPBearer": []}, {"APIKeyHeader": []}]}


def authorize(request: Request, name: str) -> ApiKey:
    return request.app.state.fedmeta.keys.authorize(request.scope["headers"], name)


def role(name: str):
    """A dependency that admits keys with at least role ``name`` and returns the key."""

    async def check(request: Request, _a=Security(_bearer), _b=Security(_header)) -> ApiKey:
        return request.app.state.fedmeta.keys.authorize(request.scope["headers"], name)

    return check
