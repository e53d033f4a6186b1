"""``/v1/models``: the site's versions, and admin-only promote and rollback with an atomic swap."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from fedmeta.manifest import ManifestError
from fedmeta.registry import RegistryError, parse_version
from serving.auth import ApiKey
from serving.deps import role, state
from serving.errors import ApiError, json_response

router = APIRouter(tags=["models"])


def _describe(version, promoted: int | None, serving: int) -> dict:
    return {
        "version": version.label,
        "kind": version.kind,
        "parent": f"v{version.parent}" if version.parent else None,
        "sha256": version.sha256,
        "created_at": version.created_at,
        "created_by": version.created_by,
        "metrics": version.metrics,
        "promoted": version.version == promoted,
        "serving": version.version == serving,
    }


@router.get("/v1/models", summary="The site's model versions, the promoted one, hashes and metrics")
async def list_models(request: Request, _=Depends(role("predict"))) -> Response:
    server = state(request)
    registry = server.store.home.registry
    site = server.store.site
    promoted = registry.current(site)
    serving = server.store.current
    versions = [v for v in registry.versions() if v.site == site or (v.kind == "base" and v.site is None)]
    return json_response(
        {
            "site": site,
            "promoted": promoted.label if promoted else None,
            "serving": {"version": serving.label, "sha256": serving.version.sha256},
            "versions": [_describe(v, promoted.version if promoted else None, serving.version.version) for v in versions],
        }
    )


@router.post("/v1/models/{version}/promote", summary="Serve a version from now on (admin)")
async def promote(version: str, request: Request, key: ApiKey = Depends(role("admin"))) -> Response:
    server = state(request)
    store = server.store
    try:
        target = store.home.registry.get(parse_version(version))
        if target.site != store.site:
            raise ApiError(409, f"{target.label} is not a model of site {store.site!r}")
        previous = store.current.label
        store.activate(target)  # loads and verifies first: a bad file is never promoted
        store.home.registry.promote(store.site, target.version, actor=f"key:{key.name}")
    except RegistryError as e:
        raise ApiError(404 if "no model version" in str(e) else 409, str(e)) from None
    except ManifestError as e:
        raise ApiError(409, f"{version} failed its integrity check and was not promoted: {e}") from None
    return json_response({"promoted": target.label, "previous": previous, "sha256": target.sha256})


@router.post("/v1/models/rollback", summary="Serve the version promoted before the current one (admin)")
async def rollback(request: Request, key: ApiKey = Depends(role("admin"))) -> Response:
    store = state(request).store
    registry = store.home.registry
    current = store.current.version
    previous = current.label
    try:
        target = registry.rollback(store.site, actor=f"key:{key.name}")
    except RegistryError as e:
        raise ApiError(409, str(e)) from None
    try:
        store.activate(target)
    except ManifestError as e:
        registry.promote(store.site, current.version, actor=f"key:{key.name}")  # undo: the registry must name what is served
        raise ApiError(409, f"{target.label} failed its integrity check; still serving {previous}: {e}") from None
    return json_response({"promoted": target.label, "previous": previous, "sha256": target.sha256})
