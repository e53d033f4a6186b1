"""The Open Inference Protocol (v2), as KServe and Triton define it, for their clients.

The model name is the site's name. Inputs are the schema's features, one
tensor each (``FP32`` for numeric features, ``BYTES`` for categorical ones,
shape ``[batch]`` or ``[batch, 1]``); outputs are the tasks (``FP32``: class
probabilities ``[batch, C]`` or values ``[batch]``), data flattened in
row-major order as the protocol specifies. Every malformed request gets 400
with ``{"error": ...}`` naming the tensor and the field, as the protocol
asks; no value a client sends reaches numpy or onnxruntime unchecked.
The response's ``parameters`` carry ``outside_training_range`` as JSON text
(protocol parameters are strings, numbers or booleans): the rows with a
numeric value outside the model's training range (:mod:`fedmeta.training_range`).
A model that records its site's mapping also takes tensors named by the
site's own columns, in its codes and units (:mod:`serving.dialect`; the
request parameter ``dialect``, ``auto``, ``site`` or ``schema``, chooses).
"""

from __future__ import annotations

import json
import math

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from serving.bodies import read_json
from serving.deps import SECURITY_OPENAPI, authorize, role, state
from serving.dialect import Dialect, dialect_choice
from serving.errors import ApiError, json_response, shown
from serving.openapi import responses
from serving.store import FLOAT32_MAX, LoadedModel, check_finite

router = APIRouter(tags=["open inference protocol v2"])

_NUMERIC_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64}

INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": {"id": {"type": "string"}, "inputs": {"type": "array"}, "outputs": {"type": "array"}}},
                "example": {
                    "id": "42",
                    "inputs": [
                        {"name": "age", "shape": [2], "datatype": "FP32", "data": [71, 45]},
                        {"name": "ward", "shape": [2], "datatype": "BYTES", "data": ["cardiology", "surgical"]},
                        {"name": "...", "shape": [2], "datatype": "FP32", "data": [0, 0]},
                    ],
                    "outputs": [{"name": "mortality"}],
                },
            }
        },
    },
    "description": "One tensor per input feature, each `shape` `[batch]` or `[batch, 1]` with the same batch, and `data` holding "
    "as many values as its shape says; requests that break these rules, which JSON Schema cannot state, get 400 as the protocol specifies.",
    "responses": {str(code): r for code, r in responses(400, 401, 403, 404, 413, 415, 503).items()},
}


def _model(request: Request, name: str) -> LoadedModel:
    model = state(request).store.current
    if name != model.site:
        raise ApiError(404, f"no model named {name!r}; this server serves {model.site!r}")
    return model


def _tensor_meta(model: LoadedModel) -> tuple[list[dict], list[dict]]:
    schema = model.manifest.schema_
    inputs = [
        {"name": f["name"], "datatype": "BYTES" if f.get("type") == "categorical" else "FP32", "shape": [-1]} for f in schema["features"]
    ]
    outputs = [
        {"name": t.name, "datatype": "FP32", "shape": [-1] if t.kind == "regression" else [-1, len(t.classes or [])]} for t in model.manifest.tasks
    ]
    return inputs, outputs


# The health routes take no key: Kubernetes and KServe probes send none. So they say only live/ready, never which model.
@router.get("/v2/health/live", summary="Liveness (no key needed)", responses=responses(200))
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", summary="Readiness: a verified model is loaded (no key needed)", responses=responses(200))
async def ready(request: Request) -> Response:
    return json_response({"ready": state(request).store.current is not None})


@router.get("/v2/models/{name}", summary="Model metadata: versions, inputs and outputs", responses=responses(200, 401, 403, 404, 503))
async def metadata(name: str, request: Request, _=Depends(role("predict"))) -> Response:
    model = _model(request, name)
    inputs, outputs = _tensor_meta(model)
    return json_response({"name": model.site, "versions": [model.label], "platform": "onnxruntime_onnx", "inputs": inputs, "outputs": outputs})


@router.get("/v2/models/{name}/ready", summary="Model readiness", responses=responses(200, 401, 403, 404, 503))
async def model_ready(name: str, request: Request, _=Depends(role("predict"))) -> Response:
    model = _model(request, name)
    return json_response({"name": model.site, "ready": True})


def _is_count(d: object) -> bool:
    return type(d) is int and d >= 0


def _shape_text(shape: object) -> str:
    """A refused shape as the client wrote it (JSON: ``[true]``, not Python's ``[True]``), when short and flat."""
    if isinstance(shape, list) and len(shape) <= 4 and not any(isinstance(d, (list, dict)) for d in shape):
        text = json.dumps(shape, ensure_ascii=False)
        return text if len(text) <= 60 else text[:57] + "..."
    return shown(shape)


def _tensor(validator, name: str, tensor: dict, max_rows: int) -> tuple[np.ndarray, int]:
    """One input tensor checked alone (fields, then values, then its count against its shape): its column and its batch size."""
    shape, datatype, data = tensor.get("shape"), tensor.get("datatype"), tensor.get("data")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or not all(_is_count(d) for d in shape) or (len(shape) == 2 and shape[1] != 1):
        raise ApiError(400, f"inputs.{name}.shape: must be [batch] or [batch, 1] with integer sizes, got {_shape_text(shape)}")
    if not isinstance(datatype, str):
        raise ApiError(400, f"inputs.{name}.datatype: expected a string such as 'FP32' or 'BYTES', got {shown(datatype)}")
    if not isinstance(data, list):
        raise ApiError(400, f"inputs.{name}.data: must be a list")
    if shape[0] > max_rows:
        raise ApiError(413, f"inputs.{name}.shape: batch of {shape[0]} rows exceeds the limit of {max_rows}")
    if any(isinstance(v, list) for v in data):  # rows nested one level ([[71], [45]]), as clients send [batch, 1]
        data = [v for row in data for v in (row if isinstance(row, list) else [row])]
    if name in validator.categorical:
        if datatype != "BYTES":
            raise ApiError(400, f"inputs.{name}.datatype: a categorical feature takes datatype BYTES, got {shown(datatype)}")
        unknown_values = [v for v in data if not isinstance(v, str) or v not in validator.categorical[name]]
        if unknown_values:
            raise ApiError(400, f"inputs.{name}.data: unknown category {shown(unknown_values[0])}; known: {sorted(validator.categorical[name])}")
        column = np.array(data, dtype=object)
    else:
        if datatype not in _NUMERIC_TYPES:
            raise ApiError(400, f"inputs.{name}.datatype: a numeric feature takes a numeric datatype such as FP32, got {shown(datatype)}")
        bad = [v for v in data if type(v) not in (int, float)]
        if bad:
            raise ApiError(400, f"inputs.{name}.data: expected numbers, got {shown(bad[0])}")
        outside = next((v for v in data if not math.isfinite(v) or abs(v) > FLOAT32_MAX), None)
        if outside is not None:
            raise ApiError(400, f"inputs.{name}.data: {shown(outside)} is outside the float32 range the model computes in (|x| <= 3.4e38)")
        lo, hi = validator.ranges[name]
        far = next((v for v in data if not lo <= v <= hi), None)
        if far is not None:
            raise ApiError(400, f"inputs.{name}.data: {shown(far)} is more than 1e6 standard deviations from the federation's mean "
                                f"(accepted: {lo:.4g} to {hi:.4g}); check the unit")
        column = np.asarray(data, dtype=np.float32)
    if len(data) != math.prod(shape):
        raise ApiError(400, f"inputs.{name}: shape {shape} holds {math.prod(shape)} values, data has {len(data)}")
    return column, shape[0]


def _site_tensors(dialect: Dialect, by_name: dict[str, dict], max_rows: int) -> dict[str, dict]:
    """Tensors named by site columns, as the feature tensors the mapping makes of them (checked as such afterwards)."""
    unknown = sorted(set(by_name) - dialect.known)
    if unknown:
        raise ApiError(400, f"inputs: unknown tensor(s) {[u[:40] for u in unknown[:5]]}; neither a feature nor a site column of the model's mapping")
    columns, batch = {}, None
    for name, tensor in by_name.items():
        shape, data = tensor.get("shape"), tensor.get("data")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or not all(_is_count(d) for d in shape) or (len(shape) == 2 and shape[1] != 1):
            raise ApiError(400, f"inputs.{name}.shape: must be [batch] or [batch, 1] with integer sizes, got {_shape_text(shape)}")
        if shape[0] > max_rows:
            raise ApiError(413, f"inputs.{name}.shape: batch of {shape[0]} rows exceeds the limit of {max_rows}")
        if not isinstance(data, list) or any(isinstance(v, dict) for v in data):
            raise ApiError(400, f"inputs.{name}.data: must be a list of values")
        if any(isinstance(v, list) for v in data):
            data = [v for row in data for v in (row if isinstance(row, list) else [row])]
        if len(data) != math.prod(shape) or any(isinstance(v, (list, dict)) for v in data):
            raise ApiError(400, f"inputs.{name}: shape {shape} holds {math.prod(shape)} values, data has {len(data)}")
        if batch is not None and shape[0] != batch:
            raise ApiError(400, f"inputs.{name}.shape: batch size {shape[0]} differs from {batch} of the other inputs")
        batch, columns[name] = shape[0], data
    for feature, fields in dialect.sources.items():
        if not any(f in columns for f in fields):
            raise ApiError(400, f"inputs: missing tensor for feature {feature!r} (site column {' or '.join(map(repr, fields))})")
    try:
        features = dialect.convert(columns, "inputs")
    except ApiError as e:
        raise ApiError(400, e.message) from None  # the protocol's status for a malformed request
    return {
        name: {"name": name, "shape": [batch], "datatype": "BYTES" if name in dialect.categorical else "FP64", "data": values}
        for name, values in features.items()
    }


def _feed(model: LoadedModel, inputs: object, max_rows: int, choice: str = "auto") -> tuple[dict[str, np.ndarray], int]:
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "inputs: expected a non-empty list of tensors")
    by_name = {}
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ApiError(400, f"inputs[{i}]: expected an object with name, shape, datatype and data")
        if tensor["name"] in by_name:
            raise ApiError(400, f"inputs[{i}]: tensor {shown(tensor['name'])} is given twice")
        by_name[tensor["name"]] = tensor
    if model.dialect is not None:  # a model without a mapping reads tensors exactly as before
        try:
            site = model.dialect.in_site_dialect(by_name.keys(), "inputs", choice, 'add "parameters": {"dialect": "site"} (or "schema")')
        except ApiError as e:
            raise ApiError(400, e.message) from None
        if site:
            by_name = _site_tensors(model.dialect, by_name, max_rows)
    validator = model.validator
    unknown = sorted(set(by_name) - validator.known)
    if unknown:
        raise ApiError(400, f"inputs: unknown tensor(s) {[u[:40] for u in unknown[:5]]}; inputs are {validator.features}")
    # Each tensor's own fields and values first, then how the tensors fit together: a fuzzer that sends one
    # tensor reaches the value checks, so a schema that allows a value the server refuses is found.
    feed, batches = {}, {}
    for name, tensor in by_name.items():
        feed[name], batches[name] = _tensor(validator, name, tensor, max_rows)
    missing = next((name for name in validator.features if name not in feed), None)
    if missing is not None:
        raise ApiError(400, f"inputs: missing tensor {missing!r}")
    batch = None
    for name in validator.features:
        if batch is None:
            batch = batches[name]
        elif batches[name] != batch:
            raise ApiError(400, f"inputs.{name}.shape: batch size {batches[name]} differs from {batch} of the other inputs")
    if not batch:
        raise ApiError(400, "inputs: the batch is empty")
    return feed, batch


@router.post("/v2/models/{name}/infer", openapi_extra={**INFER_OPENAPI, **SECURITY_OPENAPI}, summary="Inference with v2 tensors")
async def infer(name: str, request: Request) -> Response:
    authorize(request, "predict")
    server = state(request)
    model = _model(request, name)
    tensors = len(model.validator.features) if model.dialect is None else len(model.dialect.known)  # site columns may outnumber features
    payload = await read_json(request, server.settings.max_body_bytes, (tensors + 4) * (server.settings.max_rows + 4))
    if not isinstance(payload, dict):
        raise ApiError(400, "body: expected an inference request object with 'inputs'")
    if "id" in payload and not isinstance(payload["id"], str):
        raise ApiError(400, f"id: expected a string, got {shown(payload['id'])}")
    choice = "auto"
    if model.dialect is not None and isinstance(payload.get("parameters"), dict):
        try:
            choice = dialect_choice(payload["parameters"].get("dialect"), "parameters.dialect")
        except ApiError as e:
            raise ApiError(400, e.message) from None
    feed, batch = _feed(model, payload.get("inputs"), server.settings.max_rows, choice)
    requested = payload.get("outputs")
    if requested is None:
        tasks = model.tasks
    else:
        if not isinstance(requested, list) or not requested or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
            raise ApiError(400, "outputs: expected a non-empty list of objects with a name")
        tasks = [o["name"] for o in requested]
        unknown = [t for t in tasks if t not in model.tasks]
        if unknown:
            raise ApiError(400, f"outputs: unknown output(s) {[t[:40] for t in unknown[:5]]}; outputs are {model.tasks}")
        if len(set(tasks)) != len(tasks):
            raise ApiError(400, "outputs: an output is listed twice")
    results = model.run(tasks, feed)
    try:
        check_finite(tasks, results, "rows", batch)
    except ApiError as e:
        raise ApiError(400, e.message.replace("rows[", "inputs: row ", 1).replace("]:", ":", 1)) from None
    outside = model.outside_training_range(feed, batch)
    request.state.predicted = (tasks, batch, outside)
    response = {
        "model_name": model.site,
        "model_version": model.label,
        "outputs": [{"name": t, "datatype": "FP32", "shape": list(r.shape), "data": r.ravel()} for t, r in zip(tasks, results)],
    }
    if outside is not None:  # v2 parameters hold strings, numbers or booleans: the list travels as JSON text
        response["parameters"] = {"outside_training_range": json.dumps(outside, separators=(",", ":"))}
    if "id" in payload:
        response["id"] = payload["id"]
    return json_response(response)


async def infer_endpoint(request: Request) -> Response:
    """``infer`` as a plain Starlette endpoint (see ``serving.app.FastRoute``)."""
    return await infer(request.path_params["name"], request)
