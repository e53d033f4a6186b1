"""The federation schema: features, their encoding and normalization, and tasks.

Sites must agree on the schema. Normalization statistics (each numeric
feature's mean and std) are computed federatedly: each site contributes
counts, sums and sums of squares over its training rows
(:func:`feature_sums`, :meth:`SiteData.training_sums
<fedmeta.data.site.SiteData.training_sums>`), never rows, and
:func:`combine_sums` turns them into statistics. A schema may leave them out
(``mean``/``std`` unset): a training run then computes them and carries them
in its base model, and :meth:`Schema.with_statistics` applies them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, ValidationError, model_serializer, model_validator

from fedmeta.files import atomic_write_text
from fedmeta.data.columns import missing_features
from fedmeta.data.statistics import combine_sums  # noqa: F401 - re-exported: the one rule for combining sites' sums
from fedmeta.tasks import TaskSpec
from fedmeta.training_range import widened


_FEATURE_HINTS = ("description", "synonyms", "unit", "category_synonyms")


def _drop_empty(data, keys: Sequence[str]):
    """``data`` without the keys in ``keys`` whose value is None or empty (optional matching hints)."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if not (k in keys and not v)}
    return data


class Feature(BaseModel):
    """One input column: numeric (standardized) or categorical (one-hot).

    A numeric feature's ``mean`` and ``std`` are its normalization statistics:
    both given, or both unset (then the federation computes them; until they
    are applied, values are taken as they are).

    What a site's matcher (:mod:`fedmeta.data.harmonize`) may use, all
    optional: a ``description``, ``synonyms`` (other names of the column), a
    ``unit`` (UCUM-style: ``mg/dL``, ``mmol/L``, ``mmHg``, ``kg``, ``Cel``,
    ``a`` for years...) and, for a categorical, ``category_synonyms``
    (``{category: [other spellings]}``).
    """

    name: str = Field(min_length=1)
    type: Literal["numeric", "categorical"] = "numeric"
    categories: list[str] | None = None
    mean: float | None = None
    std: float | None = None
    description: str | None = None
    synonyms: list[str] = Field(default_factory=list)
    unit: str | None = None
    category_synonyms: dict[str, list[str]] | None = None

    @model_serializer(mode="wrap")
    def _without_unset_hints(self, handler):
        # A schema without matching hints is written as before: its files and digests do not change.
        return _drop_empty(handler(self), _FEATURE_HINTS)

    @model_validator(mode="after")
    def _check_matching_hints(self) -> "Feature":
        if self.unit is not None and (not self.unit.strip() or self.unit != self.unit.strip()):
            raise ValueError(f"feature {self.name!r}: unit must be a UCUM-style string such as 'mg/dL' without spaces around it, got {self.unit!r}")
        if self.unit is not None and self.type == "categorical":
            raise ValueError(f"feature {self.name!r}: categorical features take no 'unit' (got {self.unit!r})")
        if self.category_synonyms is not None:
            if self.type != "categorical":
                raise ValueError(f"feature {self.name!r}: only categorical features take 'category_synonyms'")
            unknown = sorted(set(self.category_synonyms) - set(self.categories or []))
            if unknown:
                raise ValueError(f"feature {self.name!r}: category_synonyms names {unknown}, which are not among its categories {self.categories}")
        return self

    @model_validator(mode="after")
    def _check(self) -> "Feature":
        if self.type == "categorical" and not self.categories:
            raise ValueError(f"feature {self.name!r}: categorical features need a non-empty 'categories' list")
        if self.type == "numeric" and self.categories:
            raise ValueError(f"feature {self.name!r}: numeric features take no 'categories'")
        if self.type == "categorical":
            # Schemas written before statistics were optional carry mean 0, std 1 on every feature: they mean nothing here.
            self.mean = self.std = None
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"feature {self.name!r}: give both 'mean' and 'std', or neither (the federation computes them)")
        if self.std is not None and not (self.std > 0 and np.isfinite(self.std) and np.isfinite(self.mean)):
            raise ValueError(f"feature {self.name!r}: std must be a finite number > 0 and mean finite, got mean {self.mean}, std {self.std}")
        return self

    @property
    def center(self) -> float:
        """The mean subtracted before the model sees the value (0 while no statistics are set)."""
        return 0.0 if self.mean is None else self.mean

    @property
    def scale(self) -> float:
        """The std the value is divided by (1 while no statistics are set)."""
        return 1.0 if self.std is None else self.std

    @property
    def width(self) -> int:
        return len(self.categories) if self.type == "categorical" else 1


class TaskColumn(TaskSpec):
    """A task plus where its label lives: ``label`` column, class values, target scaling."""

    label: str = Field(min_length=1)
    classes: list[str] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0
    synonyms: list[str] = Field(default_factory=list)  # other names of the label column, for a site's matcher

    @model_serializer(mode="wrap")
    def _without_unset_hints(self, handler):
        return _drop_empty(handler(self), ("synonyms",))

    @model_validator(mode="after")
    def _check_label_values(self) -> "TaskColumn":
        if self.is_classification:
            if self.classes is None:
                self.classes = [str(i) for i in range(self.n_classes)]
            if len(self.classes) != self.n_classes:
                raise ValueError(f"task {self.name!r}: {len(self.classes)} class values for {self.n_classes} classes")
        if not self.target_std > 0:
            raise ValueError(f"task {self.name!r}: target_std must be > 0, got {self.target_std}")
        return self

    def spec(self) -> TaskSpec:
        return TaskSpec(name=self.name, kind=self.kind, n_classes=self.n_classes)


class SchemaError(ValueError):
    """Site data that does not match the federation schema."""


class SchemaProblems(SchemaError):
    """Several files that do not match the schema, one line each (``lines``).

    As a message the lines are joined by ``"; "``: an error boundary that
    prints one line still names every file.
    """

    def __init__(self, lines: Sequence[str]):
        self.lines = list(lines)
        super().__init__("; ".join(self.lines))


class Schema(BaseModel):
    """What every site's table looks like.

    >>> s = Schema(name="demo", features=[Feature(name="age"), Feature(name="sex", type="categorical", categories=["F", "M"])],
    ...            tasks=[TaskColumn(name="mortality", kind="binary", label="died", classes=["0", "1"])])
    >>> s.encoded_dim
    3
    """

    name: str = "federation"
    version: str = Field(default="1", min_length=1)  # the coordinator's own label; sites compare digests, which cover it
    features: list[Feature] = Field(min_length=1)
    tasks: list[TaskColumn] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Schema":
        cols = [f.name for f in self.features] + [t.label for t in self.tasks]
        dup = {c for c in cols if cols.count(c) > 1}
        if dup:
            raise ValueError(f"schema columns must be unique; repeated: {sorted(dup)}")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return self

    @property
    def encoded_dim(self) -> int:
        return sum(f.width for f in self.features)

    @property
    def task_specs(self) -> list[TaskSpec]:
        return [t.spec() for t in self.tasks]

    def task(self, name: str) -> TaskColumn:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"schema has no task {name!r}; tasks are {[t.name for t in self.tasks]}")

    # --- persistence -------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Schema":
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise SchemaError(f"schema file not found: {path}") from None
        except ValidationError as e:
            raise SchemaError(f"invalid schema {path}: {e}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.model_dump_json(indent=2))

    def digest(self) -> str:
        """SHA-256 of the schema's canonical JSON (keys sorted, no whitespace): what a site's mapping and a
        training message name the schema by.

        The normalization statistics (numeric features' ``mean`` and ``std``) are left out: a run computes
        them and applies them to its copy (:meth:`with_statistics`), and that copy is still the federation's
        schema, so a mapping made against ``schema.json`` keeps matching the base model's schema.

        >>> a = Schema(features=[Feature(name="age")], tasks=[TaskColumn(name="m", kind="binary", label="died")])
        >>> a.digest() == a.with_statistics({"age": (50.0, 9.0)}).digest(), len(a.digest())
        (True, 64)
        """
        content = self.model_dump(mode="json")
        for feature in content["features"]:
            feature.pop("mean", None)
            feature.pop("std", None)
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    # --- encoding ----------------------------------------------------------
    def validate_frame(self, df: pd.DataFrame, source: str) -> None:
        """Raise :class:`SchemaError` naming file, column and row for the first problem found."""
        missing = missing_features(source, list(df.columns), [f.name for f in self.features], [t.label for t in self.tasks])
        if missing:
            raise SchemaError(missing)
        for f in self.features:
            col = df[f.name]
            if f.type == "numeric":
                values = pd.to_numeric(col, errors="coerce")
                bad = values.isna() & col.notna()
                if bad.any():
                    row = _first_row(bad)
                    raise SchemaError(f"{source}: column {f.name!r} row {row + 2}: expected a number, got {col.iloc[row]!r}")
                nan = values.isna()
                if nan.any():
                    row = _first_row(nan)
                    raise SchemaError(f"{source}: column {f.name!r} row {row + 2}: missing value (NaN) in a required feature")
            else:
                if col.isna().any():
                    row = _first_row(col.isna())
                    raise SchemaError(f"{source}: column {f.name!r} row {row + 2}: missing value (NaN) in a required feature")
                known = set(f.categories)
                unknown = ~col.astype(str).isin(known)
                if unknown.any():
                    row = _first_row(unknown)
                    raise SchemaError(
                        f"{source}: column {f.name!r} row {row + 2}: unknown category {col.iloc[row]!r}; known: {f.categories}"
                    )
        for t in self.tasks:
            if t.label not in df.columns:
                continue
            col = df[t.label]
            present = col.notna()
            if t.is_classification:
                unknown = present & ~col.astype(str).str.removesuffix(".0").isin(set(t.classes))
                if unknown.any():
                    row = _first_row(unknown)
                    raise SchemaError(
                        f"{source}: label column {t.label!r} row {row + 2}: unknown class {col.iloc[row]!r}; classes: {t.classes}"
                    )
            else:
                bad = present & pd.to_numeric(col, errors="coerce").isna()
                if bad.any():
                    row = _first_row(bad)
                    raise SchemaError(f"{source}: label column {t.label!r} row {row + 2}: expected a number, got {col.iloc[row]!r}")

    def encode(self, df: pd.DataFrame) -> np.ndarray:
        """Normalized numeric features and one-hot categories, float32, in schema order."""
        blocks = []
        for f in self.features:
            if f.type == "numeric":
                v = pd.to_numeric(df[f.name]).to_numpy(np.float32)
                blocks.append(((v - f.center) / f.scale)[:, None])
            else:
                codes = pd.Categorical(df[f.name].astype(str), categories=f.categories).codes
                blocks.append(np.eye(len(f.categories), dtype=np.float32)[codes])
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def raw_ranges(self, x: np.ndarray) -> dict[str, list[float]] | None:
        """Each numeric feature's ``[min, max]`` in raw units over encoded rows ``x``, slightly widened (:mod:`fedmeta.training_range`)."""
        if len(x) == 0:
            return None
        out, start = {}, 0
        for f in self.features:
            if f.type == "numeric":
                out[f.name] = widened(x[:, start].astype(np.float64) * f.scale + f.center, f.center, f.scale)
            start += f.width
        return out

    def labels(self, df: pd.DataFrame, task: str) -> np.ndarray:
        """Encoded labels of one task, NaN where the row has none (class index or scaled value)."""
        t = self.task(task)
        if t.label not in df.columns:
            return np.full(len(df), np.nan, np.float32)
        col = df[t.label]
        if t.is_classification:
            as_str = col.astype(str).str.removesuffix(".0")
            codes = pd.Categorical(as_str, categories=t.classes).codes.astype(np.float32)
            codes[col.isna().to_numpy()] = np.nan
            return codes
        return ((pd.to_numeric(col).to_numpy(np.float32) - t.target_mean) / t.target_std).astype(np.float32)

    # --- normalization statistics --------------------------------------------
    def statistics(self) -> dict[str, tuple[float, float]]:
        """``{feature: (mean, std)}`` of the numeric features that have statistics."""
        return {f.name: (f.mean, f.std) for f in self.features if f.type == "numeric" and f.mean is not None}

    @property
    def unnormalized(self) -> list[str]:
        """Numeric features without statistics."""
        return [f.name for f in self.features if f.type == "numeric" and f.mean is None]

    def with_statistics(self, statistics: Mapping[str, Sequence[float]]) -> "Schema":
        """A copy whose numeric features take ``{feature: (mean, std)}``; features not named keep theirs."""
        numeric = {f.name for f in self.features if f.type == "numeric"}
        unknown = sorted(set(statistics) - numeric)
        if unknown:
            raise SchemaError(f"statistics for {unknown}, which are not numeric features of schema {self.name!r}")
        features = [
            f.model_copy(update={"mean": float(statistics[f.name][0]), "std": float(statistics[f.name][1])}) if f.name in statistics else f
            for f in self.features
        ]
        return self.model_copy(update={"features": features})

    def check_statistics(self, statistics: Mapping[str, Sequence[float]], source: str, owner: str) -> None:
        """Raise :class:`SchemaError` if a feature's statistics here differ from ``owner``'s (relative 1e-6)."""
        for name, (mean, std) in self.statistics().items():
            if name not in statistics:
                continue
            theirs = statistics[name]
            if not np.allclose([mean, std], theirs, rtol=1e-6, atol=1e-9 * max(1.0, abs(theirs[1]))):
                raise SchemaError(
                    f"{source}: feature {name!r} has mean {mean:.6g}, std {std:.6g}, but {owner} was trained with mean "
                    f"{theirs[0]:.6g}, std {theirs[1]:.6g}; remove 'mean' and 'std' from the schema (the model's are used), "
                    "or use the schema the model was trained with"
                )

    def with_normalization(self, sums: Iterable[dict[str, tuple[float, float, float]]]) -> "Schema":
        """A copy whose numeric means/stds come from per-site ``{feature: (count, sum, sum_sq)}`` (:func:`combine_sums`)."""
        return self.with_statistics(combine_sums(sums))


def _first_row(mask: pd.Series) -> int:
    """Position of the first True in ``mask`` (reported to users as ``row + 2``: header, 1-based)."""
    return int(np.flatnonzero(mask.to_numpy())[0])


def feature_sums(df: pd.DataFrame, schema: Schema) -> dict[str, tuple[float, float, float]]:
    """A site's contribution to federated normalization: count, sum and sum of squares per numeric feature."""
    out = {}
    for f in schema.features:
        if f.type == "numeric":
            v = pd.to_numeric(df[f.name]).to_numpy(np.float64)
            out[f.name] = (float(len(v)), float(v.sum()), float((v**2).sum()))
    return out


def numeric_schema(n_features: int, tasks: Sequence[TaskColumn], name: str = "federation") -> Schema:
    """A schema of ``n_features`` numeric columns ``x0..x{n-1}``."""
    return Schema(name=name, features=[Feature(name=f"x{j}") for j in range(n_features)], tasks=list(tasks))
