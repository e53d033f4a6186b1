"""``/v1/models``: the site's versions, and admin-only promote and rollback.

The registry decides what is served (see :class:`serving.store.ModelStore`):
promote verifies and loads the target first (a version that fails its hash
check is never promoted), writes the promotion to the registry, then syncs
the store to the registry. Everything that touches SQLite or model files
runs in a worker thread, so a slow load or a registry locked by another
writer delays only the admin's own request, never predictions.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from fedmeta.manifest import ManifestError
from fedmeta.registry import RegistryError, parse_version
from serving.auth import ApiKey
from serving.deps import role, state
from serving.errors import ApiError, json_response
from serving.openapi import responses

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


@router.get("/v1/models", summary="The site's model versions, the promoted one, hashes and metrics", responses=responses(200, 401, 403, 503))
async def list_models(request: Request, _=Depends(role("predict"))) -> Response:
    store = state(request).store
    registry = store.home.registry

    def read():
        return registry.current(store.site), [v for v in registry.versions() if v.site == store.site or (v.kind == "base" and v.site is None)]

    promoted, versions = await run_in_threadpool(read)
    serving = store.current
    return json_response(
        {
            "site": store.site,
            "promoted": promoted.label if promoted else None,
            "serving": {"version": serving.label, "sha256": serving.version.sha256},
            "versions": [_describe(v, promoted.version if promoted else None, serving.version.version) for v in versions],
        }
    )


def _version_number(text: str) -> int:
    try:
        return parse_version(text)
    except RegistryError as e:
        raise ApiError(422, f"version: {e}") from None


@router.post("/v1/models/{version}/promote", summary="Serve a version from now on (admin)", responses=responses(200, 401, 403, 404, 409, 422, 503))
async def promote(version: str, request: Request, key: ApiKey = Depends(role("admin"))) -> Response:
    number = _version_number(version)
    store = state(request).store
    registry = store.home.registry

    def work():
        target = registry.get(number)
        if target.site != store.site:
            raise ApiError(409, f"{target.label} is not a model of site {store.site!r}")
        loaded = store.load(target)  # verified before the registry names it
        previous = registry.current(store.site)
        registry.promote(store.site, target.version, actor=f"key:{key.name}")
        store.sync(loaded)
        return target, previous

    try:
        target, previous = await run_in_threadpool(work)
    except RegistryError as e:
        raise ApiError(404 if "no model version" in str(e) else 409, str(e)) from None
    except ManifestError as e:
        raise ApiError(409, f"{version} failed its integrity check and was not promoted: {e}") from None
    return json_response({"promoted": target.label, "previous": previous.label if previous else None, "sha256": target.sha256})


@router.post("/v1/models/rollback", summary="Serve the version promoted before the current one (admin)", responses=responses(200, 401, 403, 409, 503))
async def rollback(request: Request, key: ApiKey = Depends(role("admin"))) -> Response:
    store = state(request).store
    registry = store.home.registry
    actor = f"key:{key.name}"

    def work():
        current = registry.current(store.site)
        target = registry.rollback(store.site, actor=actor)
        try:
            loaded = store.load(target)
        except ManifestError:
            registry.promote(store.site, current.version, actor=actor)  # undo: the registry must name a servable version
            raise
        store.sync(loaded)
        return target, current

    try:
        target, previous = await run_in_threadpool(work)
    except RegistryError as e:
        raise ApiError(409, str(e)) from None
    except ManifestError as e:
        raise ApiError(409, f"the version to roll back to failed its integrity check; nothing changed: {e}") from None
    return json_response({"promoted": target.label, "previous": previous.label if previous else None, "sha256": target.sha256})
