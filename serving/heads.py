"""``/v1/heads``: departments request a head for their task; it trains in the background.

A job trains the head on the served model's body with the personalization
code (:func:`fedmeta.personalize.train_head`), exports and registers it as a
new version and, when asked, promotes it and swaps it in. Jobs are bounded:
one runs at a time for the site, ``head_queue_limit`` may wait (more get
429), and a second request for a task that is already queued or running gets
409. Every request is written to the audit log.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.responses import Response

from serving.auth import ApiKey
from serving.deps import read_json, role, state
from serving.errors import ApiError, json_response
from serving.predict import EXAMPLE_ROW
from serving.store import ModelStore

log = logging.getLogger("fedmeta.serving")
router = APIRouter(tags=["heads"])


class HeadRequest(BaseModel):
    """A department's request for a task head."""

    task: str = Field(min_length=1, description="the task: one the federation knows, or a new one")
    kind: Literal["binary", "multiclass", "regression"] | None = Field(None, description="required for a new task")
    label: str | None = Field(None, description="the label field in the rows (default: the task's label, else the task name)")
    classes: list[str] | None = Field(None, description="class values of a new task (default: the values found)")
    rows: list[dict[str, Any]] = Field(min_length=1, description="labelled rows: the schema's features plus the label")
    promote: bool = Field(False, description="serve the new version as soon as it is registered")
    tune_body: bool = Field(False, description="lightly tune the body too (default: frozen, ANIL-style)")
    steps: int = Field(300, ge=1, le=5000)
    seed: int = 0

    model_config = {
        "json_schema_extra": {
            "examples": [{"task": "sepsis", "kind": "binary", "rows": [{**EXAMPLE_ROW, "sepsis": "yes"}, {**EXAMPLE_ROW, "wbc": 6.1, "sepsis": "no"}], "promote": False}]
        }
    }


@dataclass
class HeadJob:
    id: str
    task: str
    requested_by: str
    status: str = "queued"  # queued | running | succeeded | failed
    submitted_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    version: str | None = None
    promoted: bool = False
    metrics: dict = field(default_factory=dict)
    note: str | None = None
    error: str | None = None

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class HeadJobs:
    """One worker thread for the site's head jobs, plus a bounded queue."""

    def __init__(self, store: ModelStore, queue_limit: int):
        self.store, self.queue_limit = store, queue_limit
        self.jobs: dict[str, HeadJob] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-job")

    def submit(self, request: HeadRequest, key: ApiKey) -> HeadJob:
        with self._lock:
            active = [j for j in self.jobs.values() if j.status in ("queued", "running")]
            same = [j for j in active if j.task == request.task]
            if same:
                raise ApiError(409, f"a head job for task {request.task!r} is already {same[0].status} (job {same[0].id}); wait for it")
            if len(active) > self.queue_limit:
                raise ApiError(429, f"{len(active)} head jobs are queued or running (limit: 1 running + {self.queue_limit} waiting); retry later", {"Retry-After": "30"})
            job = HeadJob(id=uuid.uuid4().hex[:12], task=request.task, requested_by=key.name)
            self.jobs[job.id] = job
        self.store.home.registry.record(
            f"key:{key.name}", "head_request", self.store.site, self.store.current.version.version,
            {"job": job.id, "task": request.task, "kind": request.kind, "rows": len(request.rows), "promote": request.promote},
        )
        self._executor.submit(self._run, job, request, key)
        return job

    def _run(self, job: HeadJob, request: HeadRequest, key: ApiKey) -> None:
        import pandas as pd

        from fedmeta.data import SchemaError
        from fedmeta.export import ExportError
        from fedmeta.manifest import ManifestError
        from fedmeta.personalize import PersonalizationError, base_of, data_lineage, head_task, load_trained, publish, train_head
        from fedmeta.trained import ModelMismatchError

        job.status = "running"
        store = self.store
        try:
            parent = store.current.version
            home = store.home
            start = load_trained(home, parent)
            frame = pd.DataFrame(request.rows)
            source = f"head request {job.id} rows"
            column = head_task(start.schema, request.task, request.kind, request.label, request.classes, frame, source)
            result = train_head(start, column, frame, source, steps=request.steps, tune_body=request.tune_body, seed=request.seed)
            already = [t.name for t in store.current.manifest.tasks if t.personalized and t.name != request.task]
            published = publish(
                home, result.model, "head", store.site, parent=parent, base=base_of(home, parent), metrics=result.metrics,
                data=data_lineage(None, source="api", job=job.id, rows=result.rows, held_out=result.holdout_rows),
                training={"task": request.task, "kind": column.kind, "steps": request.steps, "tune_body": request.tune_body, "seed": request.seed, "note": result.note},
                personalized_tasks=already + [request.task], promote=request.promote, actor=f"key:{key.name}",
            )
            if published.promoted:
                store.activate(published.version)
            job.version, job.promoted, job.metrics, job.note = published.version.label, published.promoted, result.metrics, result.note
            job.status = "succeeded"
        except (SchemaError, PersonalizationError, ModelMismatchError, ExportError, ManifestError, ValueError) as e:
            job.status, job.error = "failed", str(e)
        except Exception:
            log.exception("head job %s failed", job.id)
            job.status, job.error = "failed", "internal error; the server log has the details"
        finally:
            job.finished_at = time.time()
            log.info("head job %s (%s) %s", job.id, job.task, job.status)

    def get(self, job_id: str) -> HeadJob:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise ApiError(404, f"no head job {job_id!r}") from None

    def shutdown(self) -> None:
        """Finish the running job, drop the queued ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        for job in self.jobs.values():
            if job.status == "queued":
                job.status, job.error = "failed", "cancelled: the server shut down"


HEAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": HeadRequest.model_json_schema(), "example": HeadRequest.model_config["json_schema_extra"]["examples"][0]}},
    },
    "responses": {
        "202": {"description": "accepted: poll status_url", "content": {"application/json": {"example": {"job": "3f2a9c1d7b4e", "status": "queued", "status_url": "/v1/heads/jobs/3f2a9c1d7b4e"}}}},
        "409": {"description": "a job for this task is already queued or running"},
        "429": {"description": "the head-job queue is full"},
    },
}


@router.post("/v1/heads", status_code=202, openapi_extra=HEAD_OPENAPI, summary="Request a head for a department's task (department role)")
async def request_head(request: Request, key: ApiKey = Depends(role("department"))) -> Response:
    server = state(request)
    payload = await read_json(request, server.settings.max_body_bytes)
    try:
        body = HeadRequest.model_validate(payload)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()]
        raise ApiError(422, "; ".join(problems)) from None
    if len(body.rows) > server.settings.head_max_rows:
        raise ApiError(413, f"rows: {len(body.rows)} rows exceed the limit of {server.settings.head_max_rows} per head request")
    model = server.store.current
    validator = model.validator
    label = body.label or next((t["label"] for t in model.manifest.schema_["tasks"] if t["name"] == body.task), body.task)
    features_only = [{k: v for k, v in row.items() if k != label} for row in body.rows]
    _check_rows(validator, features_only, label, body.rows)
    job = server.jobs.submit(body, key)
    return json_response({"job": job.id, "status": job.status, "status_url": f"/v1/heads/jobs/{job.id}"}, 202)


def _check_rows(validator, rows: list[dict], label: str, labelled: list[dict]) -> None:
    """Reject bad rows now, with the row and field named, rather than in a failed job later."""
    validator.columns(rows, "rows", limit=len(rows))
    if not any(row.get(label) is not None for row in labelled):
        raise ApiError(422, f"rows: no row has a value for the label {label!r}")


@router.get("/v1/heads/jobs/{job_id}", summary="Status and metrics of a head job")
async def head_job(job_id: str, request: Request, _=Depends(role("department"))) -> Response:
    return json_response(state(request).jobs.get(job_id).describe())
