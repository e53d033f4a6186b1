"""``POST /v1/predict``: named raw features in, per-task predictions out.

The body is parsed with orjson and checked by the model's compiled row
validator rather than by pydantic: over large nested lists pydantic costs
~2.5x throughput here. Normalization and one-hot encoding happen inside the
ONNX graph, so the rows carry raw values.

Requests that reach the model in the same event-loop turn share one
onnxruntime call (:class:`serving.batching.RunBatcher`): a call costs about
the same for one row as for eight, and each request still gets its own
rows' outputs, bit for bit.

Apps send whole records, so a row's fields that are no feature of the
model (a ``patient_id``) are left out, as ``fedmeta predict`` leaves out
other columns, and the response names them, sorted, in ``ignored_fields``
(names only, never values). ``POST /v1/predict?strict=true`` refuses them
instead (422), for clients that want a misspelt feature caught at once.

A model that records its site's mapping also reads rows in the site's own
columns, codes and units (:mod:`serving.dialect`, which states the rule for
rows that could be in either); ``dialect=auto|site|schema`` chooses.
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from serving.bodies import read_json
from serving.deps import SECURITY_OPENAPI, authorize, state
from serving.dialect import dialect_choice, without_value
from serving.errors import ApiError, json_response, shown
from serving.openapi import responses
from serving.store import LoadedModel

router = APIRouter(tags=["predict"])

EXAMPLE_ROW = {
    "age": 71,
    "sex": "F",
    "admission_type": "emergency",
    "ward": "cardiology",
    "prior_admissions": 2,
    "charlson_index": 4,
    "heart_rate": 96,
    "systolic_bp": 118,
    "creatinine": 1.4,
    "hemoglobin": 11.2,
    "sodium": 136,
    "wbc": 9.8,
}

PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "rows": {"type": "array", "items": {"type": "object"}, "description": "rows of raw feature values, by feature name"},
                        "row": {"type": "object", "description": "a single row (instead of rows)"},
                        "tasks": {"type": "array", "items": {"type": "string"}, "description": "tasks to predict (default: all)"},
                    },
                },
                "examples": {
                    "one row": {"value": {"row": EXAMPLE_ROW}},
                    "many rows, some tasks": {"value": {"rows": [EXAMPLE_ROW, {**EXAMPLE_ROW, "age": 45, "ward": "surgical"}], "tasks": ["mortality"]}},
                },
            }
        },
    },
    "responses": {
        "200": {
            "description": (
                "per-task predictions, with the model version and hash that made them. `outside_training_range` lists the rows "
                "with a numeric value outside the range the model was trained on, and those features "
                "(`[{\"row\": 0, \"features\": [\"age\"]}]`; `[]` when none, `null` for a model that records no range): "
                "such rows are answered, but the model extrapolates there. `ignored_fields` names, sorted, the fields of the rows "
                "that are no feature of the model and were left out (`[]` when none; never their values)"
            ),
            "content": {
                "application/json": {
                    "example": {
                        "model": {"site": "hospital_003", "version": "v3", "sha256": "0df3393c8bca82fd..."},
                        "rows": 1,
                        "predictions": {
                            "mortality": {"classes": ["0", "1"], "labels": ["0"], "probabilities": [[0.83, 0.17]]},
                            "length_of_stay": {"values": [6.4]},
                        },
                        "outside_training_range": [],
                        "ignored_fields": ["patient_id"],
                    }
                }
            },
        },
        **{str(code): r for code, r in responses(401, 403, 413, 415, 422, 503).items()},
    },
    "parameters": [{
        "name": "strict",
        "in": "query",
        "required": False,
        "schema": {"type": "boolean", "default": False},
        "description": "`true`: a row field that is no feature of the model is refused (422) instead of being left out and named in "
                       "`ignored_fields`",
    }],
}
BODY_KEYS = frozenset({"rows", "row", "tasks"})


def strict_mode(request: Request) -> bool:
    """The ``strict`` query parameter: ``true`` or ``false`` (default), nothing else."""
    if not request.scope["query_string"]:  # the common case, without parsing a query string
        return False
    values = request.query_params.getlist("strict")
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("true", "false"):
        raise ApiError(422, f"strict: expected true or false (once), got {', '.join(shown(v) for v in values[:3])}")
    return values[0] == "true"


def dialect_mode(request: Request) -> str:
    """The ``dialect`` query parameter (``auto`` by default), for a model that records a mapping."""
    if not request.scope["query_string"]:
        return "auto"
    values = request.query_params.getlist("dialect")
    if len(values) > 1:
        raise ApiError(422, "dialect: given more than once")
    return dialect_choice(values[0] if values else None, "dialect")


def select_tasks(model: LoadedModel, requested: object) -> list[str]:
    if requested is None:
        return model.tasks
    if not isinstance(requested, list) or not all(isinstance(t, str) for t in requested) or not requested:
        raise ApiError(422, "tasks: expected a non-empty list of task names")
    unknown = [t for t in requested if t not in model.tasks]
    if unknown:
        raise ApiError(422, f"tasks: unknown task(s) {[t[:40] for t in unknown[:5]]}; this model predicts {model.tasks}")
    if len(set(requested)) != len(requested):
        raise ApiError(422, "tasks: a task is listed twice")
    return requested


def render(model: LoadedModel, tasks: list[str], outputs: list[np.ndarray]) -> dict:
    """Class probabilities and labels for classification tasks, values in label units for regression."""
    described = model.task_outputs()
    predictions = {}
    for task, out in zip(tasks, outputs):
        spec = described[task]
        if spec.kind == "regression":
            predictions[task] = {"values": out}
        else:
            classes = spec.classes or [str(i) for i in range(out.shape[1])]
            predictions[task] = {"classes": classes, "labels": [classes[i] for i in out.argmax(1).tolist()], "probabilities": out}
    return predictions


@router.post("/v1/predict", openapi_extra={**PREDICT_OPENAPI, **SECURITY_OPENAPI}, summary="Predict every (or the chosen) task for one or many rows")
async def predict(request: Request) -> Response:
    authorize(request, "predict")
    server = state(request)
    strict = strict_mode(request)
    payload = await read_json(request, server.settings.max_body_bytes, 2 * server.settings.max_rows + 64)
    if not isinstance(payload, dict):
        raise ApiError(422, "body: expected an object with 'rows' (a list of rows) or 'row' (one row)")
    if not payload.keys() <= BODY_KEYS:
        raise ApiError(422, f"body: unknown field(s) {sorted(k[:40] for k in payload.keys() - BODY_KEYS)[:5]}; fields are rows or row, and tasks")
    model = server.store.current  # this request's model, whatever a swap does meanwhile
    if "rows" in payload and "row" in payload:
        raise ApiError(422, "body: give either 'rows' or 'row', not both")
    if "rows" in payload:
        where = "rows"
        rows = payload["rows"]
    elif "row" in payload:
        where = "row"
        rows = [payload["row"]]
    else:
        raise ApiError(422, "body: expected 'rows' (a list of rows) or 'row' (one row)")
    site_ignored = None
    if model.dialect is None:  # a model without a mapping reads rows exactly as before
        feed, n = model.validator.columns(rows, where, strict=strict)
    else:
        rows, site_ignored, site_rows = model.dialect.rows(rows, where, dialect_mode(request), strict)
        try:
            feed, n = model.validator.columns(rows, where, strict=strict)
        except ApiError as e:
            raise without_value(e, site_rows) from None
    tasks = select_tasks(model, payload.get("tasks"))
    outputs, outside = await model.batcher.predict(tasks, feed, n, where)
    request.scope.setdefault("state", {})["predicted"] = (tasks, n, outside)  # what the metrics middleware counts; Starlette's request.state costs ~1 us more
    content = {
        "model": {"site": model.site, "version": model.label, "sha256": model.version.sha256},
        "rows": n,
        "predictions": render(model, tasks, outputs),
        "outside_training_range": outside,
        "ignored_fields": model.validator.ignored_fields(rows) if not site_ignored else sorted({*model.validator.ignored_fields(rows), *site_ignored}),
    }
    return json_response(content)
