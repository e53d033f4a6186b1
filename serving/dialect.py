"""Requests in the site's own dialect: the promoted model's recorded mapping applied to request rows.

A model personalized with a site's ``mapping.json`` records it in its
manifest, and the server reads requests through it, as ``fedmeta predict``
reads files: the site's apps send what their own systems produce
(``{"Sex": "M", "Cholesterol_mmol_L": 5.2, ...}``) and get the prediction of
the canonical row (``{"sex": "1", "chol": 201.1, ...}``). The conversion is
:mod:`fedmeta.data.mapping`'s own (:func:`~fedmeta.data.mapping.check`, then
:func:`~fedmeta.data.mapping.apply`), so training, ``fedmeta predict`` and
the server cannot disagree.

Which dialect a row is in (``dialect=auto``, the default), decided per row
(per request in the Open Inference Protocol, whose tensors name one set of
fields):

- a row with a field that the mapping names as a site column and that is no
  schema feature (``Sex``) is in the site's dialect: it goes through the
  whole mapping, and a field the mapping does not name keeps its own name
  (so a site row may carry some features under their schema names);
- otherwise the row is in the schema's dialect and is read as on a model
  without a mapping;
- a field that is both a site column and a schema feature, which the
  mapping converts (a site's ``age`` in months), reads differently in the
  two dialects: a row that holds one and nothing else saying which dialect
  it is in is refused (422) rather than guessed. ``dialect=site`` or
  ``dialect=schema`` (a query parameter of ``/v1/predict``, a request
  parameter in v2) says which.

Errors are one line naming the row and the field, never a value: the values
are the site's and may be a patient's.

What it costs (one idle core, the four-feature heart schema): a one-row request
in the site's dialect ~7.6 ms more than its canonical row (pandas frames for
``check`` and ``apply``), 1,000 rows ~20 ms; a row in the schema's dialect on
a model with a mapping ~3 us (the dialect test); a model without one, nothing.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from fedmeta.data.mapping import ColumnMapping, Mapping, apply, check, site_values
from fedmeta.data.schema import Schema
from serving.errors import ApiError, shown

DIALECTS = ("auto", "site", "schema")


def _as_number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def reads_differently(rule: ColumnMapping, column: str, feature_type: str, categories: list[str] | None) -> bool:
    """Whether a site column named like a schema feature means something else in the site's dialect than in the schema's.

    It does when it maps to another feature, converts units, or recodes a value that is valid in the schema's dialect.

    >>> reads_differently(ColumnMapping(feature="age", scale=1 / 12), "age", "numeric", None)
    True
    >>> reads_differently(ColumnMapping(feature="sex", values={"M": "1", "F": "0"}), "sex", "categorical", ["0", "1"])
    False
    >>> reads_differently(ColumnMapping(feature="sex", values={"1": "0", "2": "1"}), "sex", "categorical", ["0", "1"])
    True
    """
    if rule.feature != column or rule.converts:
        return True
    if feature_type == "categorical":
        return any(site != schema for site, schema in rule.values.items() if site in (categories or []))
    return any(_as_number(site) is not None and _as_number(site) != _as_number(schema) for site, schema in rule.values.items())


def describe(rule: ColumnMapping) -> str:
    """A site column's mapping for a reader: ``mapped to chol (x 38.67)``; codes listed, values never (the mapping holds none).

    >>> describe(ColumnMapping(feature="chol", scale=38.67))
    'site column, mapped to chol (x 38.67)'
    >>> describe(ColumnMapping(feature="sex", values={"M": "1", "F": "0"}))
    'site column, mapped to sex (M -> 1, F -> 0)'
    """
    if rule.feature is None:
        return "site column, left out (the mapping maps it to null)"
    how = []
    if rule.scale != 1.0:
        how.append(f"x {rule.scale:g}")
    if rule.offset != 0.0:
        how.append(f"{'+' if rule.offset > 0 else '-'} {abs(rule.offset):g}")
    if rule.values:
        how.append(", ".join(f"{site} -> {schema}" for site, schema in rule.values.items()))
    return f"site column, mapped to {rule.feature}" + (f" ({'; '.join(how)})" if how else "")


class Dialect:
    """The recorded mapping of a served model, ready to read request rows (see the module docstring for the rule)."""

    def __init__(self, mapping: Mapping, schema: Schema):
        self.mapping, self.schema = mapping, schema
        types = {f.name: f for f in schema.features}
        self.features = list(types)
        self.categorical = [f.name for f in schema.features if f.type == "categorical"]
        self.site_only = frozenset(c for c in mapping.columns if c not in types)
        self.ambiguous = {
            c: describe(rule) for c, rule in mapping.columns.items()
            if c in types and reads_differently(rule, c, types[c].type, types[c].categories)
        }
        self.known = frozenset(mapping.columns) | frozenset(types)
        # The fields that can bring each feature into a site row: the site columns mapped to it, or its own name when that is no site column.
        self.sources = {f: [c for c, rule in mapping.columns.items() if rule.feature == f] + ([] if f in mapping.columns else [f]) for f in types}

    def in_site_dialect(self, fields, label: str, choice: str, hint: str = "add dialect=site or dialect=schema") -> bool:
        """Whether a row with these field names is read through the mapping; a 422 naming the field when that cannot be told."""
        if choice != "auto":
            return choice == "site"
        if not self.site_only.isdisjoint(fields):
            return True
        unclear = next((f for f in fields if f in self.ambiguous), None)
        if unclear is not None:
            raise ApiError(422, f"{label}.{unclear}: both a schema feature and a site column ({self.ambiguous[unclear]}), and no other field "
                                f"says which dialect the row is in; {hint}")
        return False

    def convert(self, columns: dict[str, list], source: str, label_column: str | None = None) -> dict[str, list]:
        """Site columns (name -> values, one per row) as feature columns (name -> values): checked, then mapped.

        Categorical features come out as strings (``1`` and ``1.0`` as ``"1"``), missing cells as None. Raises a 422 with
        the first problem :func:`~fedmeta.data.mapping.check` finds (it names the column and the feature, never a value).
        ``label_column`` (a task's label column, named as in the schema) comes out too when a column reaches it: recoded when
        a site column maps to it, as sent when it passes under its own name (a new task's label is in no mapping).
        """
        sent = columns
        # JSON's 1.0 and 1 are one code, as in a file; in a column that also holds strings pandas would key 1.0 as "1.0".
        columns = {name: [int(v) if type(v) is float and v.is_integer() and abs(v) < 2**53 else v for v in values] for name, values in columns.items()}
        frame = pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()})
        frame = frame.infer_objects()  # numbers as numbers, so that 1.0 and 1 key a code alike, as read from a file
        problems = check(self.mapping, frame, self.schema, source, need_labels=False)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ApiError(422, problems[0] + more)
        mapped = apply(self.mapping, frame)
        out = {}
        for name in self.features:
            series = mapped[name]
            if name in self.categorical:
                text = site_values(series)
                series = series.astype(object)
                series[text.index] = text
            else:  # "5.2" as 5.2, as fedmeta predict reads a column (check has found every value a number)
                series = pd.to_numeric(series, errors="coerce")
            values = series.astype(object).tolist()
            out[name] = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
        if label_column is not None and label_column in mapped:
            if label_column in sent and label_column not in self.mapping.columns:
                out[label_column] = list(sent[label_column])
            else:
                values = mapped[label_column].astype(object).tolist()
                out[label_column] = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
        return out

    def rows(self, rows: object, where: str, choice: str, strict: bool, label_column: str | None = None) -> tuple[object, list[str], frozenset[str]]:
        """``rows`` with every row in the site's dialect replaced by its canonical row, the site rows' fields left out, and their labels.

        Rows in the schema's dialect, and anything that is no list of objects, pass unchanged: the row validator names
        their problems as on a model without a mapping. ``label_column`` (a head request's label column, named as in the
        schema) stays in a canonical row beside the features (see :meth:`convert`).
        """
        keep = set() if label_column is None else {label_column}  # a label's site columns are known already
        if not isinstance(rows, list):
            return rows, [], frozenset()
        from serving.store import row_label  # the store builds Dialects for the models it loads

        site = [i for i, row in enumerate(rows) if isinstance(row, dict) and self.in_site_dialect(row.keys(), row_label(where, i), choice)]
        if not site:
            return rows, [], frozenset()
        ignored = set()
        for i in site:
            row, label = rows[i], row_label(where, i)
            for feature, fields in self.sources.items():
                if not any(f in row for f in fields):
                    raise ApiError(422, f"{label}: missing feature {feature!r} (site column {' or '.join(map(repr, fields))})")
            unknown = sorted(k[:40] for k in row.keys() - self.known - keep)
            if strict and unknown:
                raise ApiError(422, f"{label}: unknown field(s) {unknown[:5]}; neither a feature nor a site column of the model's mapping")
            ignored.update(unknown)
            ignored.update(k for k in row.keys() & self.mapping.columns.keys() if self.mapping.columns[k].feature not in self.sources)
        names = sorted({k for i in site for k in rows[i].keys() if k in self.known or k in keep})
        source = row_label(where, site[0]) if len(site) == 1 else where
        columns = self.convert({name: [rows[i].get(name) for i in site] for name in names}, source, label_column)
        out = list(rows)
        for j, i in enumerate(site):
            out[i] = {name: values[j] for name, values in columns.items()}
        return out, sorted(ignored), frozenset(row_label(where, i) for i in site)


def without_value(error: ApiError, site_rows: frozenset[str]) -> ApiError:
    """The row validator's ``error``, its value left out when it is about a row read through the mapping (the value is the site's).

    >>> without_value(ApiError(422, "rows[1].chol: 3e+12 is more than 1e6 standard deviations ..."), frozenset({"rows[1]"})).message
    "rows[1].chol: its value, read through the site's mapping, is more than 1e6 standard deviations ..."
    """
    match = re.match(r"^(([^.:]+)\.[^:]+): .+? is (more than|not a finite|outside)", error.message)
    if match is None or match.group(2) not in site_rows:
        return error
    return ApiError(error.status, f"{match.group(1)}: its value, read through the site's mapping, is {error.message[match.start(3):]}")


def dialect_choice(value: object, where: str) -> str:
    """``auto``, ``site`` or ``schema``; a 422 naming ``where`` otherwise."""
    if value is None:
        return "auto"
    if value not in DIALECTS:
        raise ApiError(422, f"{where}: expected auto, site or schema, got {shown(value)}")
    return value
