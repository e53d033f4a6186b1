"""A site's mapping from its own columns, codes and units to the federation schema (``mapping.json``).

The file is the contract between ``fedmeta schema match`` (which proposes it),
the person who reviews it, and every place a site reads rows::

    {"schema_digest": "...",
     "columns": {"<site column>": {"feature": "<schema feature or task label>" | null,
                                   "scale": 1.0, "offset": 0.0,
                                   "values": {"<site value>": "<schema value>"},
                                   "confidence": 0.0-1.0, "review": false, "evidence": "..."}}}

A numeric value maps to ``value * scale + offset``; a site value listed in
``values`` is replaced by its schema value first; a column mapped to ``null``
is dropped; a column the mapping does not name is kept under its own name (a
site already in the schema's dialect needs no mapping at all).

:func:`check` and :func:`apply` are pure functions of the mapping and a
frame, so the same rule holds in training, personalization and prediction.
Their messages name the file, the column and the feature, never a cell's
value (the values are the site's and may be a patient's).

>>> m = Mapping(columns={"Sex": ColumnMapping(feature="sex", values={"M": "1", "F": "0"}),
...                      "chol_mmol": ColumnMapping(feature="chol", scale=38.67)})
>>> apply(m, pd.DataFrame({"Sex": ["F", "M"], "chol_mmol": [5.0, 6.0]})).round(2).to_dict("list")
{'sex': ['0', '1'], 'chol': [193.35, 232.02]}
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedmeta.data.near_miss import did_you_mean
from fedmeta.data.schema import Schema, SchemaError, SchemaProblems
from fedmeta.files import atomic_write_text

#: The file a site folder's mapping is read from (beside its ``train.csv``, or its data file).
MAPPING_FILE = "mapping.json"


class MappingError(SchemaError):
    """A mapping file that cannot be read, or a site's rows that a mapping does not fit."""


class ColumnMapping(BaseModel):
    """Where one site column goes: a schema feature or task label (``None``: dropped), and how its values convert."""

    model_config = ConfigDict(extra="forbid")

    feature: str | None
    scale: float = 1.0
    offset: float = 0.0
    values: dict[str, str] = Field(default_factory=dict)
    confidence: float = Field(default=1.0, ge=0.0, le=1.0)
    review: bool = False
    evidence: str = ""

    @field_validator("scale", "offset")
    @classmethod
    def _finite(cls, v: float, info) -> float:
        if not math.isfinite(v) or (info.field_name == "scale" and v == 0):
            raise ValueError(f"{info.field_name} must be a finite number{' other than 0' if info.field_name == 'scale' else ''}, got {v}")
        return v

    @property
    def converts(self) -> bool:
        """Whether numeric values change (``scale`` or ``offset`` other than 1 and 0)."""
        return self.scale != 1.0 or self.offset != 0.0


class Mapping(BaseModel):
    """A site's ``mapping.json``: the schema it was made for (its :meth:`Schema.digest`) and one entry per site column."""

    model_config = ConfigDict(extra="forbid")

    schema_digest: str | None = None
    columns: dict[str, ColumnMapping] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Mapping":
        """Read a mapping file; :class:`MappingError` in one line naming the file and the field."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise MappingError(f"mapping file not found: {path}") from None
        except OSError as e:
            raise MappingError(f"cannot read mapping file {path}: {e.strerror}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            problems = []
            for err in e.errors(include_url=False, include_input=False):
                where = ".".join(str(p) for p in err["loc"]) or "(top level)"
                msg = err["msg"] if err["type"] != "json_invalid" else f"not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})"
                problems.append(f"{where}: {msg}")
            raise MappingError(f"invalid mapping {path}: {'; '.join(problems)}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    def digest(self) -> str:
        """SHA-256 of the mapping's canonical JSON (keys sorted): what a site reports instead of the mapping itself."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def target(self, column: str) -> str | None:
        """The schema column a site column ends up as: its mapped feature, else (not in the mapping) its own name."""
        return self.columns[column].feature if column in self.columns else column


def _has_booleans(column: pd.Series) -> bool:
    return pd.api.types.is_bool_dtype(column) or (column.dtype == object and column.map(lambda v: isinstance(v, (bool, np.bool_))).any())


def site_values(column: pd.Series) -> pd.Series:
    """A column's present values as the strings ``values`` is keyed by.

    ``1.0`` read from a CSV is ``1``; a cell pandas reads as a boolean (``true``, ``True``, ``TRUE``) is ``true``
    or ``false``, whatever its case in the file.

    >>> site_values(pd.Series([True, False, None])).tolist(), site_values(pd.Series([1.0, 2.5])).tolist()
    (['true', 'false'], ['1', '2.5'])
    """
    present = column[column.notna()]
    if _has_booleans(present):
        return present.map(lambda v: str(bool(v)).lower() if isinstance(v, (bool, np.bool_)) else str(v))
    as_str = present.astype(str)
    if pd.api.types.is_float_dtype(present):
        as_str = as_str.str.removesuffix(".0")
    return as_str


def _keyed(values: dict[str, str], column: pd.Series) -> dict[str, str]:
    """``values`` keyed as :func:`site_values` keys ``column``: for a column read as booleans, ``TRUE`` and ``True`` are ``true``."""
    if values and _has_booleans(column):
        return {(k.lower() if k.lower() in ("true", "false") else k): v for k, v in values.items()}
    return values


def _recoded(column: pd.Series, values: dict[str, str]) -> pd.Series:
    """``column`` with each site value listed in ``values`` replaced by its schema value; empty cells stay empty."""
    if not values:
        return column
    values = _keyed(values, column)
    keys = site_values(column)
    hit = keys.isin(values.keys())
    if not hit.any():
        return column
    out = column.astype(object).copy()
    out[keys.index[hit]] = keys[hit].map(values)
    return out


def apply(mapping: Mapping, frame: pd.DataFrame) -> pd.DataFrame:
    """The site's rows in the schema's dialect: columns renamed, categories recoded, units converted, ``null`` columns dropped.

    Columns the mapping names but ``frame`` lacks are skipped (a test file without the label column).
    Raises :class:`MappingError` if two columns would end up under one name (:func:`check` names them first).
    """
    out: dict[str, pd.Series] = {}
    origin: dict[str, str] = {}
    for column in frame.columns:
        name = str(column)
        target = mapping.target(name)
        if target is None:
            continue
        if target in out:
            raise MappingError(f"columns {origin[target]!r} and {name!r} both become {target!r}; map one of them to null")
        series = frame[column]
        rule = mapping.columns.get(name)
        if rule is not None:
            series = _recoded(series, rule.values)
            if rule.converts:
                numbers = pd.to_numeric(series, errors="coerce")
                bad = int((numbers.isna() & series.notna()).sum())
                if bad:
                    raise MappingError(f"column {name!r} (to {target!r}): {bad} value(s) are not numbers, so scale and offset cannot apply")
                series = numbers * rule.scale + rule.offset
        out[target], origin[target] = series.rename(target), name
    return pd.DataFrame(out, index=frame.index)


def _labels(schema: Schema) -> dict[str, str]:
    """``{label column: task}``."""
    return {t.label: t.name for t in schema.tasks}


def check(mapping: Mapping, frame: pd.DataFrame, schema: Schema, source: str, *, need_labels: bool = True) -> list[str]:
    """Every way ``mapping`` does not fit ``frame`` (read from ``source``) and ``schema``, one line each.

    Found: a schema digest that differs; a target that is neither a feature nor a task label; two
    columns for one feature; a feature no column reaches; with ``need_labels``, a file that reaches
    no task's label; a site value of a categorical feature or class label with no schema value; a
    numeric column whose values do not parse. A column the mapping does not name counts as mapped
    to itself. Lines name the file, the column and the feature, never a cell's value.
    """
    lines = []
    if mapping.schema_digest and mapping.schema_digest != schema.digest():
        lines.append(
            f"{source}: mapping made for schema {mapping.schema_digest[:12]}, but the federation's schema {schema.name!r} is "
            f"{schema.digest()[:12]}; run fedmeta schema match again, or use the schema it was made for"
        )
    features = {f.name: f for f in schema.features}
    labels = _labels(schema)
    known = list(features) + list(labels)
    columns = [str(c) for c in frame.columns]
    for column, rule in mapping.columns.items():
        if rule.feature is not None and rule.feature not in features and rule.feature not in labels:
            lines.append(
                f"{source}: column {column!r} maps to {rule.feature!r}, which is neither a feature nor a task label of schema "
                f"{schema.name!r}{did_you_mean([rule.feature], known)}"
            )
    reached: dict[str, list[str]] = {}
    for column in columns:
        target = mapping.target(column)
        if target in features or target in labels:
            reached.setdefault(target, []).append(column)
    for target, sources in reached.items():
        if len(sources) > 1:
            kind = "feature" if target in features else "task label"
            lines.append(f"{source}: columns {', '.join(map(repr, sources))} all map to {kind} {target!r}; map all but one to null")
    for name in features:
        if name in reached:
            continue  # a file already in the schema's dialect (its own column named as the feature) is fine too
        absent = [column for column, rule in mapping.columns.items() if rule.feature == name]
        if absent:
            lines.append(f"{source}: column {absent[0]!r} (mapped to feature {name!r}) is not in the file")
        else:
            lines.append(f"{source}: feature {name!r} is not mapped from any column{did_you_mean([name], [c for c in columns if c not in mapping.columns])}")
    if need_labels and not any(label in reached for label in labels):
        lines.append(f"{source}: no column maps to a task label ({', '.join(f'{label!r} of task {task!r}' for label, task in labels.items())})")
    for target, sources in reached.items():
        if len(sources) == 1:
            lines += _value_problems(mapping.columns.get(sources[0]), frame[sources[0]], schema, target, sources[0], source)
    return lines


def _value_problems(rule: ColumnMapping | None, column: pd.Series, schema: Schema, target: str, name: str, source: str) -> list[str]:
    """A column's values against its target: allowed schema values, numbers that parse. Counts, never values."""
    rule = rule or ColumnMapping(feature=target)
    feature = next((f for f in schema.features if f.name == target), None)
    task = next((t for t in schema.tasks if t.label == target), None)
    what = f"column {name!r} (feature {target!r})" if feature else f"column {name!r} (label of task {task.name!r})"
    allowed = feature.categories if feature is not None and feature.type == "categorical" else (task.classes if task is not None and task.is_classification else None)
    if allowed is not None:
        lines = []
        if rule.converts:
            lines.append(f"{source}: {what}: scale and offset apply to numeric columns only; {target!r} is categorical")
        foreign = sorted({v for v in rule.values.values() if v not in allowed})
        if foreign:
            lines.append(f"{source}: {what}: 'values' maps to {foreign}, not among the schema values {allowed}")
        keys = site_values(column)
        unmatched = keys[~keys.isin(_keyed(rule.values, column).keys()) & ~keys.isin(allowed)].nunique()
        if unmatched:
            lines.append(f"{source}: {what}: {unmatched} site value(s) have no schema value; add them to 'values' (schema values: {allowed})")
        return lines
    recoded = _recoded(column, rule.values)
    bad = int((pd.to_numeric(recoded, errors="coerce").isna() & recoded.notna()).sum())
    if bad:
        return [f"{source}: {what}: {bad} value(s) are not numbers; map them in 'values' or fix the file"]
    return []


def pending_review(mapping: Mapping) -> list[str]:
    """One line per column a person has yet to confirm (``review: true``): column, feature, confidence, evidence."""
    return [
        f"column {column!r} -> {rule.feature!r} (confidence {rule.confidence:.2f}){': ' + rule.evidence if rule.evidence else ''}"
        for column, rule in mapping.columns.items()
        if rule.review
    ]


def status(mapping: Mapping | None) -> dict[str, int | str | None]:
    """What a site may tell its coordinator about its mapping: its digest and counts, never a column name or value.

    >>> status(Mapping(columns={"Sex": ColumnMapping(feature="sex", values={"M": "1"}), "chol_mmol": ColumnMapping(feature="chol", scale=38.67, review=True),
    ...                         "id": ColumnMapping(feature=None)}))["mapped"]
    2
    """
    columns = [] if mapping is None else [rule for rule in mapping.columns.values() if rule.feature is not None]
    return {
        "digest": None if mapping is None else mapping.digest(),
        "mapped": len(columns),
        "converted": sum(rule.converts for rule in columns),
        "recoded": sum(bool(rule.values) for rule in columns),
        "review": sum(rule.review for rule in columns),
    }


def require_reviewed(mapping: Mapping, source: str, accept_review: bool = False) -> list[str]:
    """Refuse (:class:`MappingError`, one line naming the file) a mapping with columns under review, unless ``accept_review``.

    Returns the columns accepted without review (empty when none were pending), for the caller to record.
    """
    pending = pending_review(mapping)
    if pending and not accept_review:
        names = ", ".join(repr(c) for c, r in mapping.columns.items() if r.review)
        raise MappingError(
            f"{source}: {len(pending)} column(s) flagged for review ({names}); check them, set \"review\": false, "
            "or pass --accept-review"
        )
    return pending


def mapped_frame(mapping: Mapping | None, frame: pd.DataFrame, schema: Schema, source: str, *, need_labels: bool = True) -> pd.DataFrame:
    """``frame`` in the schema's dialect, after :func:`check` (all problems at once, :class:`SchemaProblems`); unchanged without a mapping."""
    if mapping is None:
        return frame
    problems = check(mapping, frame, schema, source, need_labels=need_labels)
    if problems:
        raise SchemaProblems(problems)
    return apply(mapping, frame)
