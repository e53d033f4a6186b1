"""The OpenAPI document, as strict as the server: every response documented, request schemas from the served model.

The document (``/openapi.json``) and, when ``docs`` is on, the Swagger UI
page (``/docs``, with the document inlined) need a key with the ``predict``
role, like every route but the health probes; there is no ``/redoc``.

- Every error response is documented with the body the server sends,
  ``{"error": "..."}`` (:data:`ERROR_SCHEMA`), never FastAPI's default
  validation-error shape.
- The request schemas of ``/v1/predict`` and ``/v2/models/{name}/infer``
  are built from the served model's schema: the feature names, their types,
  the categories, the tasks, each numeric feature's accepted range and
  the row limit. A body that fits the ``/v1/predict`` schema is accepted
  unless, with ``?strict=true``, a row has a field that is no feature
  (422; by default such fields are left out and named in
  ``ignored_fields``); one that does not fit gets a 4xx. The document
  follows the served version (a promoted head adds a task to the ``tasks``
  enum).
- A numeric feature's ``minimum``/``maximum`` are the bounds the server
  enforces (:func:`serving.store.feature_range`): a power of ten at or
  above the federation's mean +- 1e6 std. The statistics themselves are
  not noised, and exact bounds (mean +- 1e6 std) gave away the mean and
  std to six digits; a power of ten gives away their order of magnitude.
- ``POST /v1/heads`` states what its schema can: a new task needs its
  ``kind``, a known task keeps its kind, neither the task nor the label is
  a feature, and each row holds the features and at most one field more.
- For a model that records its site's mapping, a row of ``/v1/predict`` or
  ``/v1/heads`` (and a v2 tensor) is in either dialect (``anyOf``): the schema's features, or the site's own
  columns, each described as ``site column, mapped to chol (x 38.67)`` with
  its codes; the ``dialect`` parameter is documented then only.
- Rules that JSON Schema cannot state are written in the operation's
  description: in the Open Inference Protocol, one tensor per input, every
  shape's batch the same and each ``data`` holding as many values as its
  ``shape`` (400 otherwise, as the protocol specifies); in a head request,
  the label present in the rows and at least two classes, a label that is
  no other task's, a task name the model's module does not reserve (422).
"""

from __future__ import annotations

import copy

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from starlette.responses import JSONResponse, Response

from serving.deps import authorize
from serving.dialect import Dialect, describe
from serving.store import feature_range

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what was wrong, naming the field and the value"}},
    "additionalProperties": False,
}
ERRORS = {
    400: "malformed request (not JSON, or an inference request whose tensors do not fit the protocol's rules)",
    401: "missing, invalid or revoked API key",
    403: "the key's role is too small for this route, or the site policy forbids the request",
    404: "no such model, version or job",
    409: "conflicts with the registry's state (a version of another site, a tampered version, nothing to roll back to, a job already running)",
    413: "body too large: bytes, rows, or JSON arrays and objects",
    415: "Content-Type is not application/json, or the body is compressed (Content-Encoding)",
    422: "a value that does not fit the schema; the message names the field and the value",
    429: "the head-job queue is full (Retry-After)",
    501: "this server has no training stack (a serving-only install): heads need pip install \"fedmeta[train]\"",
    503: "the registry is busy or the server's key file is unreadable (Retry-After)",
}
BODY_ERRORS = (400, 413, 415, 422)
VERSION_PATTERN = r"^[vV]?[1-9][0-9]{0,17}$"  # always within SQLite's integer range
DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "BYTES"]


def responses(*codes: int) -> dict:
    """The ``responses`` of a route: each listed error with the server's error body."""
    out: dict = {}
    for code in codes:
        if code == 200:
            out[200] = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
        else:
            out[code] = {"description": ERRORS[code], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    return out


def _value_schema(feature: dict) -> dict:
    """One value of a feature: a known category, or a number within :func:`serving.store.feature_range` (never null)."""
    if feature.get("type") == "categorical":
        return {"type": "string", "enum": list(feature["categories"])}
    lo, hi = feature_range(feature)
    return {"type": "number", "minimum": lo, "maximum": hi,
            "description": "the power of ten at or above 1e6 standard deviations from the federation's mean bounds it: further out a value "
                           "is refused as a unit or typing error"}


def _row_schema(schema: dict) -> dict:
    properties = {f["name"]: _value_schema(f) for f in schema["features"]}
    # Other fields are allowed: the server leaves them out (and names them in ignored_fields) unless ?strict=true.
    return {"type": "object", "required": [f["name"] for f in schema["features"]], "properties": properties, "additionalProperties": True}


def _site_value_schema(rule, features: dict) -> dict:
    """One value of a site column: its codes (as strings, and as numbers where they read as one) or the target's values, described."""
    feature = features.get(rule.feature)
    described = {"description": describe(rule)}
    if feature is None:  # left out, or a task label: any value
        return described
    if feature.get("type") == "categorical":
        codes = list(dict.fromkeys([*rule.values, *feature["categories"]]))
        numbers = [int(c) for c in codes if c.lstrip("-").isdigit() and str(int(c)) == c]
        return {**described, "enum": [*codes, *numbers]}
    number = {"type": "number"}
    described["description"] += f"; converted, within the bounds of {rule.feature} (422 otherwise)"
    if rule.values:
        return {**described, "anyOf": [number, {"enum": list(rule.values)}]}
    return {**described, **number}


def _site_row_schema(dialect: Dialect, schema: dict) -> dict:
    """A row in the site's dialect: its site columns, features under their own names, one field per feature."""
    features = {f["name"]: f for f in schema["features"]}
    properties = {name: {**_value_schema(f), "description": "schema feature, under its own name"}
                  for name, f in features.items() if name not in dialect.mapping.columns}
    properties.update({column: _site_value_schema(rule, features) for column, rule in dialect.mapping.columns.items()})
    return {
        "title": "row in the site's dialect",
        "type": "object",
        "properties": properties,
        "allOf": [{"oneOf": [{"required": [field]} for field in fields]} for fields in dialect.sources.values()],
        "additionalProperties": True,
    }


def _either_dialect(row: dict, model) -> dict:
    """``row`` (the schema's dialect), or, for a model that records a mapping, that or a row in the site's dialect."""
    if model.dialect is None:
        return row
    return {"anyOf": [{**row, "title": "row in the schema's dialect"}, _site_row_schema(model.dialect, model.manifest.schema_)],
            "description": "a row in the schema's dialect or in the site's own (its columns, codes and units, converted by the model's "
                           "recorded mapping); which one is decided per row, see the dialect parameter"}


def predict_request_schema(model, max_rows: int) -> dict:
    row = _either_dialect(_row_schema(model.manifest.schema_), model)
    return {
        "type": "object",
        "properties": {
            "rows": {"type": "array", "items": row, "minItems": 1, "maxItems": max_rows,
                     "description": "rows of raw feature values, by feature name; other fields are left out and named in `ignored_fields` "
                                    "(refused, 422, with `strict=true`)"},
            "row": {**row, "description": "a single row (instead of rows); other fields as in rows"},
            "tasks": {"type": "array", "items": {"type": "string", "enum": model.tasks}, "minItems": 1, "uniqueItems": True,
                      "description": "tasks to predict (default: all)"},
        },
        "oneOf": [{"required": ["rows"]}, {"required": ["row"]}],
        "additionalProperties": False,
    }


def predict_response_schema(model) -> dict:
    task_outputs = {}
    for t in model.manifest.tasks:
        if t.kind == "regression":
            task_outputs[t.name] = {"type": "object", "required": ["values"], "properties": {"values": {"type": "array", "items": {"type": "number"}}}}
        else:
            task_outputs[t.name] = {"type": "object", "required": ["classes", "labels", "probabilities"], "properties": {
                "classes": {"type": "array", "items": {"type": "string"}}, "labels": {"type": "array", "items": {"type": "string"}},
                "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}
    return {
        "type": "object",
        "required": ["model", "rows", "predictions", "outside_training_range", "ignored_fields"],
        "properties": {
            "model": {"type": "object", "required": ["site", "version", "sha256"], "properties": {
                "site": {"type": "string"}, "version": {"type": "string"}, "sha256": {"type": "string"}}},
            "rows": {"type": "integer", "minimum": 1},
            "predictions": {"type": "object", "properties": task_outputs, "additionalProperties": False},
            "outside_training_range": {
                "type": ["array", "null"],
                "description": "rows with a numeric value outside the model's training range, and those features; null: the model records no range",
                "items": {"type": "object", "required": ["row", "features"], "properties": {
                    "row": {"type": "integer", "minimum": 0}, "features": {"type": "array", "items": {"type": "string"}, "minItems": 1}}},
            },
            "ignored_fields": {"type": "array", "items": {"type": "string"}, "uniqueItems": True,
                               "description": "the rows' fields that are no feature of the model, sorted, left out of the prediction (names only)"},
        },
    }


def _tensor_schema(feature: dict, max_rows: int) -> dict:
    """A feature's tensor: its datatype (BYTES for a categorical feature) and its values, flat or one row a list."""
    value = _value_schema(feature)
    return {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string", "enum": [feature["name"]]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": max_rows}, "minItems": 1, "maxItems": 2},
            "datatype": {"type": "string", "enum": ["BYTES"] if feature.get("type") == "categorical" else [d for d in DATATYPES if d != "BYTES"]},
            "data": {"type": "array", "minItems": 1, "maxItems": max_rows,
                     "items": {"anyOf": [value, {"type": "array", "items": value, "maxItems": max_rows}]}},
            "parameters": {"type": "object"},
        },
    }


def _site_tensor_schema(column: str, rule, features: dict, max_rows: int) -> dict:
    """A site column's tensor (a model that records a mapping): any datatype, its values as :func:`_site_value_schema` says."""
    value = _site_value_schema(rule, features)
    return {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "description": value["description"],
        "properties": {
            "name": {"type": "string", "enum": [column]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": max_rows}, "minItems": 1, "maxItems": 2},
            "datatype": {"type": "string", "enum": DATATYPES},
            "data": {"type": "array", "minItems": 1, "maxItems": max_rows,
                     "items": {"anyOf": [value, {"type": "array", "items": value, "maxItems": max_rows}]}},
            "parameters": {"type": "object"},
        },
    }


def infer_request_schema(model, max_rows: int) -> dict:
    schema = model.manifest.schema_
    tensors = [_tensor_schema(f, max_rows) for f in schema["features"]]
    parameters: dict = {"type": "object"}
    if model.dialect is not None:
        features = {f["name"]: f for f in schema["features"]}
        site = [_site_tensor_schema(c, rule, features, max_rows) for c, rule in model.dialect.mapping.columns.items() if c not in features]
        tensors += site  # a site column named as a feature shares the feature's tensor name; its description is in the row schema
        parameters["properties"] = {"dialect": {"type": "string", "enum": ["auto", "site", "schema"], "default": "auto", "description": DIALECT_TEXT}}
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "items": {"oneOf": tensors}, "minItems": 1},
            "outputs": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "enum": model.tasks}, "parameters": {"type": "object"}}}},
            "parameters": parameters,
        },
    }


DIALECT_TEXT = (
    "`auto`: a row holding a site column that is no schema feature is read through the model's recorded mapping, any other row "
    "as the schema's features; a row whose only site columns are also schema features that the mapping converts is refused, "
    "as it could be either. `site` or `schema` says which"
)


def head_request_schema(base: dict, model, max_rows: int) -> dict:
    """``base`` (the head request's generic schema) with what the served model decides: features, known tasks and their kinds.

    A known task keeps its kind (or omits it); a new one needs it: the
    server's 422 ``kind: task 'x' is new to the federation`` as a schema.
    """
    schema = model.manifest.schema_
    features = [f["name"] for f in schema["features"]]
    known = {t["name"]: t["kind"] for t in schema["tasks"]}
    kinds = base["properties"]["kind"]["anyOf"][0]["enum"]
    out = copy.deepcopy(base)
    properties = out["properties"]
    properties["task"]["not"] = {"enum": features}
    properties["label"]["anyOf"][0]["not"] = {"enum": features}
    row = _row_schema(schema)
    row["maxProperties"] = len(features) + 1  # the label; the server refuses any other field (422)
    properties["rows"] = {**properties["rows"], "items": _either_dialect(row, model), "maxItems": max_rows}
    out["anyOf"] = [
        *({"properties": {"task": {"enum": [name]}, "kind": {"enum": [kind, None]}}} for name, kind in known.items()),
        {"required": ["kind"], "properties": {"task": {"not": {"enum": list(known)}}, "kind": {"type": "string", "enum": kinds}}},
    ]
    return out


def _strict_errors(operation: dict) -> None:
    for code, response in list(operation.get("responses", {}).items()):
        status = int(code)
        if status >= 400:
            response["content"] = {"application/json": {"schema": ERROR_SCHEMA}}
            response["description"] = ERRORS.get(status, response.get("description", ""))


def _set_body(operation: dict, schema: dict) -> None:
    content = operation["requestBody"]["content"]["application/json"]
    content["schema"] = schema


def site_openapi(app: FastAPI, model, max_rows: int, head_max_rows: int) -> dict:
    """The document for ``model`` (FastAPI's, with the strict schemas and error bodies put in)."""
    spec = copy.deepcopy(get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes))
    paths = spec["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            if operation.get("security"):
                operation.setdefault("responses", {}).update({str(c): {} for c in (401, 403, 503) if str(c) not in operation["responses"]})
            if "requestBody" in operation:
                operation["responses"].update({str(c): {} for c in BODY_ERRORS if str(c) not in operation["responses"]})
            _strict_errors(operation)
    predict = paths["/v1/predict"]["post"]
    _set_body(predict, predict_request_schema(model, max_rows))
    predict["responses"]["200"]["content"]["application/json"]["schema"] = predict_response_schema(model)
    _set_body(paths["/v2/models/{name}/infer"]["post"], infer_request_schema(model, max_rows))
    heads = paths["/v1/heads"]["post"]
    _set_body(heads, head_request_schema(heads["requestBody"]["content"]["application/json"]["schema"], model, head_max_rows))
    if model.dialect is not None:  # both routes read rows in either dialect, by the same rule
        for operation in (predict, heads):
            operation.setdefault("parameters", []).append({"name": "dialect", "in": "query", "required": False, "description": DIALECT_TEXT,
                                                           "schema": {"type": "string", "enum": ["auto", "site", "schema"], "default": "auto"}})
    for path in ("/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/infer"):
        for operation in paths[path].values():
            operation["parameters"] = [{"name": "name", "in": "path", "required": True, "description": "the site's name",
                                        "schema": {"type": "string", "enum": [model.site]}}]
    for operation in paths["/v1/models/{version}/promote"].values():
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "version":
                parameter["schema"] = {"type": "string", "pattern": VERSION_PATTERN, "description": "v3 or 3"}
    for name in ("HTTPValidationError", "ValidationError"):
        spec.get("components", {}).get("schemas", {}).pop(name, None)
    return spec


def install(app: FastAPI, current_model, max_rows: int, head_max_rows: int, docs: bool) -> None:
    """Serve :func:`site_openapi` for the model being served (rebuilt when the served version changes) to ``predict`` keys.

    The app must be built with ``openapi_url``, ``docs_url`` and ``redoc_url``
    set to None: FastAPI's own routes for them take no key.
    """
    cache: dict = {}

    def openapi() -> dict:
        model = current_model()
        if cache.get("version") != model.version.version:
            cache.update(version=model.version.version, spec=site_openapi(app, model, max_rows, head_max_rows))
        return cache["spec"]

    app.openapi = openapi

    @app.get("/openapi.json", include_in_schema=False)
    async def document(request: Request) -> Response:
        authorize(request, "predict")
        return JSONResponse(app.openapi())

    if docs:
        @app.get("/docs", include_in_schema=False)
        async def swagger_ui(request: Request) -> Response:
            authorize(request, "predict")
            # Inlined: the page's own fetch of /openapi.json would carry no key.
            return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title}: API", swagger_ui_parameters={"spec": app.openapi()})
