"""``/v1/heads``: departments request a head for their task; it trains in the background.

Everything a job needs is checked when the request arrives, so a job that
is accepted (202) can only fail for a reason the rows could not show in
advance (the head's outputs are not finite, say), never for bad input:

- the task name matches :data:`TASK_NAME_PATTERN` (letters, digits, ``_``
  and ``-``, starting with a letter, at most 64 characters), is not a
  feature's name and not a name the model's module reserves (``forward``,
  ``training``, ...: :func:`reserved_task_names`);
- a known task keeps its kind; a new one states it;
- the label column is not a feature and not another task's label, and is
  present in the rows;
- every row fits the schema, and the labels fit the task: at least two
  classes for classification, finite numbers within float32 range for
  regression.

On a model that records the site's mapping, rows in the site's own dialect
are read through it by :mod:`serving.dialect`'s rule, as ``/v1/predict``
reads them, and the job trains on the canonical rows; the label is no site
column of the mapping (it would be read as a feature), and a new task's
label, which no mapping names, passes as sent.

A job's status is readable by the key that requested it and by admin keys;
any other key gets the 404 an unknown id gets. Promotion is the admin's: a department key's ``promote: true`` gets 403
unless the site policy allows it (:mod:`serving.policy`). The job itself
(:mod:`serving.head_jobs`) registers the version; the registry then decides
what is served.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from serving.auth import RANK, ApiKey
from serving.bodies import read_json
from serving.deps import role, state
from serving.dialect import without_value
from serving.errors import ApiError, json_response, shown
from serving.openapi import responses
from serving.predict import EXAMPLE_ROW, dialect_mode
from serving.store import FLOAT32_MAX, LoadedModel, row_label

router = APIRouter(tags=["heads"])

TASK_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"


def training_installed() -> bool:
    """Whether this install can train a head: a serving-only install (``fedmeta[serve]``) has no torch."""
    return importlib.util.find_spec("torch") is not None


@lru_cache(maxsize=1)
def reserved_task_names() -> frozenset[str]:
    """Names a task head cannot take: the attributes of the torch module that holds the heads."""
    import torch

    return frozenset(dir(torch.nn.ModuleDict()))


class HeadRequest(BaseModel):
    """A department's request for a task head."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"task": "sepsis", "kind": "binary", "rows": [{**EXAMPLE_ROW, "sepsis": "yes"}, {**EXAMPLE_ROW, "wbc": 6.1, "sepsis": "no"}], "promote": False}]
        },
    )

    task: str = Field(pattern=TASK_NAME_PATTERN, description="the task: one the federation knows, or a new one (letters, digits, _ and -)")
    kind: Literal["binary", "multiclass", "regression"] | None = Field(None, description="required for a new task")
    label: str | None = Field(None, pattern=TASK_NAME_PATTERN, description="the label field in the rows (default: the task's label, else the task name)")
    classes: list[str] | None = Field(None, min_length=2, description="class values of a new task (default: the values found)")
    rows: list[dict[str, Any]] = Field(min_length=1, description="labelled rows: the schema's features plus the label")
    promote: bool = Field(False, description="serve the new version as soon as it is registered (admin, or a department if the site policy allows)")
    tune_body: bool = Field(False, description="lightly tune the body too (default: frozen, ANIL-style)")
    steps: int = Field(300, ge=1, le=5000)
    seed: int = Field(0, ge=0, le=2**31 - 1)


def parse_head_request(payload: object, max_rows: int) -> HeadRequest:
    if not isinstance(payload, dict):
        raise ApiError(422, "body: expected a head request object with 'task' and 'rows'")
    rows = payload.get("rows")
    if isinstance(rows, list) and len(rows) > max_rows:
        raise ApiError(413, f"rows: {len(rows)} rows exceed the limit of {max_rows} per head request")
    try:
        return HeadRequest.model_validate(payload)
    except ValidationError as e:
        problems = []
        for err in e.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{where}: {err['msg']}")
        raise ApiError(422, "; ".join(problems)) from None


def check_head_request(model: LoadedModel, body: HeadRequest, dialect: str = "auto") -> dict:
    """Everything the job will need, checked now (blocking: pandas; run it in a thread). Returns the job's plan.

    On a model that records a mapping, rows in the site's dialect are read through it as ``/v1/predict`` reads them
    (:mod:`serving.dialect`, ``dialect`` chooses), the label beside the features; the plan's ``rows`` are then the
    canonical rows the job trains on.
    """
    import pandas as pd

    from fedmeta.data import Schema, SchemaError
    from fedmeta.personalize import PersonalizationError, head_task

    schema = Schema.model_validate(model.manifest.schema_)
    features = [f.name for f in schema.features]
    if body.task in features:
        raise ApiError(422, f"task: {body.task!r} is a feature of the schema; a task needs a name of its own")
    if body.task in reserved_task_names():
        raise ApiError(422, f"task: {body.task!r} is a reserved name (the model's modules use it); choose another")
    known = {t.name: t for t in schema.tasks}
    if body.task in known and body.kind is not None and body.kind != known[body.task].kind:
        raise ApiError(422, f"task: task {body.task!r} is {known[body.task].kind} in the federation schema, not {body.kind}")
    if body.task not in known and body.kind is None:
        raise ApiError(422, f"kind: task {body.task!r} is new to the federation: give its kind (binary, multiclass or regression)")
    label = body.label or (known[body.task].label if body.task in known else body.task)
    if label in features:
        raise ApiError(422, f"label: {label!r} is a feature of the schema, not a label column")
    other = next((t.name for t in schema.tasks if t.label == label and t.name != body.task), None)
    if other is not None:
        raise ApiError(422, f"label: column {label!r} is already the label of task {other!r}")
    rows, site_rows = body.rows, frozenset()
    if model.dialect is not None:  # a model without a mapping reads rows exactly as before
        rule = model.dialect.mapping.columns.get(label)
        if rule is not None and rule.feature != label:
            read = f"mapped to {rule.feature!r}" if rule.feature else "left out"
            raise ApiError(422, f"label: {label!r} is a site column of the model's mapping ({read}); a label column needs a name of its own")
        rows, _, site_rows = model.dialect.rows(body.rows, "rows", dialect, strict=True, label_column=label)
    features_only = [{k: v for k, v in row.items() if k != label} for row in rows]
    try:
        model.validator.columns(features_only, "rows", limit=len(features_only))
    except ApiError as e:
        raise without_value(e, site_rows) from None
    labels = [row.get(label) for row in rows]
    if all(v is None for v in labels):
        raise ApiError(422, f"rows: no row has a value for the label {label!r}")
    task = known.get(body.task)
    kind = task.kind if task else body.kind
    _check_labels(labels, label, body.task, kind, task.classes if task else body.classes, {i for i in range(len(rows)) if row_label("rows", i) in site_rows})
    frame = pd.DataFrame(rows)
    try:
        column = head_task(schema, body.task, body.kind, body.label, body.classes, frame, "rows")
    except (PersonalizationError, SchemaError) as e:
        raise ApiError(422, f"task: {str(e).splitlines()[0][:300]}") from None
    plan = {"task": column.model_dump(mode="json"), "label": label}
    if site_rows:
        plan["rows"] = rows
    return plan


def _check_labels(labels: list, label: str, task: str, kind: str, classes: list[str] | None, hidden: set[int] = frozenset()) -> None:
    """The labels fit the task; a problem with a row in ``hidden`` (one read through the site's mapping) leaves its value out."""
    where = "rows" if len(labels) > 1 else "row"

    def got(i: int, v: object) -> str:
        return "" if i in hidden else f", got {shown(v)}"

    if kind == "regression":
        for i, v in enumerate(labels):
            if v is None:
                continue
            if type(v) not in (int, float):
                raise ApiError(422, f"{row_label('rows', i)}.{label}: expected a number{got(i, v)}")
            if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
                value = "its value" if i in hidden else shown(v)
                raise ApiError(422, f"{row_label('rows', i)}.{label}: {value} is outside the float32 range the model computes in (|x| <= 3.4e38)")
        values = [float(v) for v in labels if v is not None]
        spread = (max(values) - min(values)) if values else 0.0
        if not math.isfinite(spread) or spread > FLOAT32_MAX:
            raise ApiError(422, f"{where}: the {label!r} labels span {spread:.3g}, more than float32 can hold; rescale them")
        return
    present = set()
    for i, v in enumerate(labels):
        if v is None:
            continue
        if type(v) not in (str, int):
            raise ApiError(422, f"{row_label('rows', i)}.{label}: expected a class value (string or integer){got(i, v)}")
        text = str(v)
        if classes is not None and text not in classes:
            value = "" if i in hidden else f" {shown(v)}"
            raise ApiError(422, f"{row_label('rows', i)}.{label}: unknown class{value}; classes: {list(classes)}")
        present.add(text)
    if len(present) < 2:
        raise ApiError(422, f"{where}: task {task!r} needs labelled rows of at least two classes; found {sorted(present)[:5]}")
    found = len(classes) if classes is not None else len(present)
    if kind == "binary" and found != 2:
        raise ApiError(422, f"{where}: binary task {task!r} takes two classes; the rows have {found} ({sorted(present)[:5]}); use kind multiclass")


HEAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": HeadRequest.model_json_schema(), "example": HeadRequest.model_config["json_schema_extra"]["examples"][0]}},
    },
}
ACCEPTED = {
    "description": "accepted: poll status_url",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["job", "status", "status_url"],
                "properties": {"job": {"type": "string"}, "status": {"type": "string"}, "status_url": {"type": "string"}},
            },
            "example": {"job": "3f2a9c1d7b4e", "status": "queued", "status_url": "/v1/heads/jobs/3f2a9c1d7b4e"},
        }
    },
}


@router.post(
    "/v1/heads", status_code=202, openapi_extra=HEAD_OPENAPI, summary="Request a head for a department's task (department role)",
    description="Besides the schema, which the served model fills in (features, known tasks and their kinds), the rows must label the task "
    "with at least two classes (binary: exactly two; the given `classes` only; regression: numbers within float32), the label must be no "
    "other task's label, the row fields no feature but the label, and the task name not one the model's module reserves (`forward`, "
    "`training`, ...); 422 otherwise, naming the rule. On a model that records the site's mapping, rows may be in the site's own dialect, "
    "read as `/v1/predict` reads them (the `dialect` query parameter chooses), the label passing under its own name unless the mapping names it.",
    responses={**responses(401, 403, 409, 413, 415, 422, 429, 501, 503), 202: ACCEPTED},
)
async def request_head(request: Request, key: ApiKey = Depends(role("department"))) -> Response:
    if not training_installed():
        raise ApiError(501, 'heads: this server is a serving-only install; training a head needs the training extra: pip install "fedmeta[train]"')
    server = state(request)
    payload = await read_json(request, server.settings.max_body_bytes, 4 * server.settings.head_max_rows + 64)
    body = parse_head_request(payload, server.settings.head_max_rows)
    if body.promote and RANK[key.role] < RANK["admin"] and not server.policy.heads.department_may_promote:
        raise ApiError(403, "promote: promotion is the admin's; the job will register the version and an admin promotes it "
                            "(or the site policy sets heads.department_may_promote)")
    model = server.store.current
    plan = await run_in_threadpool(check_head_request, model, body, "auto" if model.dialect is None else dialect_mode(request))
    job = await run_in_threadpool(server.jobs.submit, body, plan, key, model)
    return json_response({"job": job.id, "status": job.status, "status_url": f"/v1/heads/jobs/{job.id}"}, 202)


JOB_RESPONSE = {
    "description": "the job's status; `version` and `metrics` once it succeeded, `error` if it failed or was cancelled",
    "content": {"application/json": {"schema": {"type": "object", "required": ["id", "task", "status"], "properties": {
        "id": {"type": "string"}, "task": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
    }}}},
}


@router.get("/v1/heads/jobs/{job_id}", summary="Status and metrics of a head job (the key that requested it, or admin)",
            responses={**responses(401, 403, 404, 422), 200: JOB_RESPONSE})
async def head_job(job_id: str, request: Request, key: ApiKey = Depends(role("department"))) -> Response:
    return json_response(state(request).jobs.visible(job_id, key).describe())

