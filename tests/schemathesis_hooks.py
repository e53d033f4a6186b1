"""A schemathesis check for the rules the OpenAPI document states in words only: a schema-valid request is refused for one of them, or not at all.

``positive_data_acceptance`` has to let 400 and 422 through for the
operations that have such rules (it cannot read an error message), so by
itself it would pass a schema that says too little, as it did for three
disagreements in issue 25. This check reads the message: a schema-valid
request refused with 400 or 422 must name a rule from :data:`DOCUMENTED`,
the rules the operations' descriptions give. Loaded with
``SCHEMATHESIS_HOOKS=<this file>``.
"""

import re

import schemathesis

DOCUMENTED = {
    # ?strict=true refuses a row field that is no feature (the query parameter's description).
    "/v1/predict": [r"^rows?(\[\d+\])?: unknown feature\(s\)"],
    # The Open Inference Protocol's own rules: tensors agree with each other and with their shapes.
    "/v2/models/{name}/infer": [
        r"^inputs\[\d+\]: tensor .* is given twice$", r"^inputs: missing tensor ", r"\.shape: must be \[batch\] or \[batch, 1\]",
        r"^inputs\.\w+: shape \[.*\] holds \d+ values, data has \d+$", r"\.shape: batch size \d+ differs from \d+", r"^outputs: an output is listed twice$",
    ],
    # Labels, label columns, reserved names (the operation's description).
    "/v1/heads": [
        r"no row has a value for the label", r"needs labelled rows of at least two classes", r"takes two classes", r"unknown class ",
        r"expected a class value", r"^rows\[\d+\]\.\w+: expected a number", r"is outside the float32 range", r"labels span ",
        r"is already the label of task", r"is a reserved name", r"^rows?(\[\d+\])?: unknown feature\(s\)", r"cannot use label column",
    ],
}


@schemathesis.check
def valid_requests_are_refused_only_for_documented_rules(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code not in (400, 422):
        return None
    try:
        error = response.json().get("error", "")
    except ValueError:
        error = response.text
    rules = DOCUMENTED.get(case.operation.path, [])
    if not any(re.search(rule, error) for rule in rules):
        raise AssertionError(f"a request valid by the document was refused ({response.status_code}) for a rule the document does not state: {error}")
    return None
