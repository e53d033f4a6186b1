"""A schema proposed from site files: which columns are numeric or categorical, the tasks' classes, normalization.

:func:`infer_schema` reads the tables it is given and decides, for every column:

- a **label** if a task names it (``--task NAME:KIND[:LABEL_COLUMN]``, the
  label defaulting to the task's name): classes are the values found (for
  classification), or the target's mean and std (regression);
- **ignored** if asked (``ignore``), if some training file lacks it, or if it
  is text with more than ``max_categories`` distinct values (an identifier?);
  :func:`near_misses` says which columns lacking somewhere look like another
  column spelled differently (``mean_radius`` at one site, ``mean radius`` at four);
- **categorical** if asked (``categorical``) or if any value is not a number,
  with the values found as its categories;
- **numeric** otherwise.

Numeric features' means and stds are left to the federation, which computes
them from every site's training rows before round 1
(:mod:`fedmeta.fl.normalization`); with ``statistics=True`` they come from
the **training rows** of the tables given instead: a site with its own test
file trains on every row of its training file, any other on the rows the one
split rule leaves it (:func:`~fedmeta.data.site.held_out_mask` of the site's
name, ``test_fraction`` and ``seed``, which must be the run's). They are
combined from per-table counts, sums and sums of squares
(:func:`~fedmeta.data.schema.feature_sums`), the rule the federation uses.
Regression targets' mean and std always come from the training tables given.
Test tables only add categories and classes, so that scoring them never meets
an unknown value.

Every file must carry every feature, and the label column of every task its
site carries (:mod:`fedmeta.data.columns`, the rule training applies before
round 1): a test file without the label is refused with one line per file.

>>> import pandas as pd
>>> site = pd.DataFrame({"age": [50, 70], "ward": ["icu", "medical"], "died": [0, 1]})
>>> schema, decisions = infer_schema({"a.csv": site}, [TaskRequest("mortality", "binary", "died")])
>>> [(f.name, f.type, f.mean) for f in schema.features], schema.tasks[0].classes
([('age', 'numeric', None), ('ward', 'categorical', None)], ['0', '1'])
>>> infer_schema({"a.csv": site}, [TaskRequest("mortality", "binary", "died")], statistics=True)[0].features[0].mean
60.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.columns import FileColumns, missing_features, missing_labels
from fedmeta.data.federation import discover_sites
from fedmeta.data.near_miss import near_miss
from fedmeta.data.schema import Feature, Schema, SchemaError, SchemaProblems, TaskColumn, feature_sums
from fedmeta.data.site import TABLE_SUFFIXES, held_out_mask, read_table, site_name

KINDS = ("binary", "multiclass", "regression")
MAX_CATEGORIES = 50


@dataclass(frozen=True)
class TaskRequest:
    """A task to put in the schema: its name, kind and label column."""

    name: str
    kind: str
    label: str

    @classmethod
    def parse(cls, text: str) -> "TaskRequest":
        """``NAME:KIND[:LABEL_COLUMN]``; the label column defaults to the task's name.

        >>> TaskRequest.parse("mortality:binary:died_in_hospital")
        TaskRequest(name='mortality', kind='binary', label='died_in_hospital')
        """
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise SchemaError(f"--task {text!r}: expected NAME:KIND or NAME:KIND:LABEL_COLUMN, KIND one of {', '.join(KINDS)}")
        if parts[1] not in KINDS:
            raise SchemaError(f"--task {text!r}: kind {parts[1]!r} is not one of {', '.join(KINDS)}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else parts[0])


@dataclass(frozen=True)
class Decision:
    """What :func:`infer_schema` made of one column, and why: printed for the user to check."""

    column: str
    role: str  # numeric, categorical, label, ignored
    detail: str


@dataclass
class Tables:
    """The tables a schema is inferred from: training tables (statistics) and test tables (values only).

    ``sites`` names the site of a training table (default: :func:`~fedmeta.data.site.site_name`
    of its path); ``scored_apart`` holds the training tables whose site has its own test file,
    and ``test_of`` names that test file.
    """

    train: dict[str, pd.DataFrame]
    test: dict[str, pd.DataFrame]
    sites: dict[str, str] = field(default_factory=dict)
    scored_apart: set[str] = field(default_factory=set)
    test_of: dict[str, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(len(t) for t in self.train.values())

    def training_rows(self, test_fraction: float, seed: int) -> dict[str, pd.DataFrame]:
        """Each training table's rows that a run with ``test_fraction`` and ``seed`` trains on (held-out rows dropped)."""
        out = {}
        for source, table in self.train.items():
            if source in self.scored_apart:
                out[source] = table
            else:
                out[source] = table[~held_out_mask(self.sites.get(source) or site_name(source), len(table), test_fraction, seed)]
        return out

    def site_files(self) -> list[list[FileColumns]]:
        """Each site's files with their columns: a training table, then its test table if it has one
        (a test table linked to no training table stands alone)."""
        linked = set(self.test_of.values())
        sites = [[(s, list(t.columns))] + ([(self.test_of[s], list(self.test[self.test_of[s]].columns))] if s in self.test_of else []) for s, t in self.train.items()]
        return sites + [[(s, list(t.columns))] for s, t in self.test.items() if s not in linked]


def read_tables(paths: list[str | Path]) -> Tables:
    """Tables from files and federation folders (every site's training file, and its test file if any)."""
    train: dict[str, pd.DataFrame] = {}
    test: dict[str, pd.DataFrame] = {}
    sites: dict[str, str] = {}
    scored_apart: set[str] = set()
    test_of: dict[str, str] = {}
    for path in map(Path, paths):
        if path.is_dir():
            for site in discover_sites(path):
                train[str(site.train)] = read_table(site.train)
                sites[str(site.train)] = site.name
                if site.test is not None:
                    test[str(site.test)] = read_table(site.test)
                    scored_apart.add(str(site.train))
                    test_of[str(site.train)] = str(site.test)
        elif path.suffix.lower() in TABLE_SUFFIXES or not path.exists():
            train[str(path)] = read_table(path)
        else:
            raise SchemaError(f"{path}: not a CSV or Parquet file ({', '.join(TABLE_SUFFIXES)}) nor a federation folder")
    for source, table in {**train, **test}.items():
        if table.empty:
            raise SchemaError(f"{source}: the file has no rows")
    if not train:
        raise SchemaError("no data given: name CSV/Parquet files or a federation folder")
    return Tables(train, test, sites, scored_apart, test_of)


def _label_values(column: pd.Series) -> pd.Series:
    """Label values as the schema compares them (``1.0`` read from a CSV with blanks is class ``1``)."""
    return column.dropna().astype(str).str.removesuffix(".0")


def _sorted_values(values: set[str]) -> list[str]:
    """Values in numeric order when they are all numbers, else in text order."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _is_numeric(column: pd.Series) -> bool:
    present = column.dropna()
    return bool(pd.to_numeric(present, errors="coerce").notna().all())


def _task(request: TaskRequest, tables: Tables) -> tuple[TaskColumn, Decision]:
    holders = {s: t[request.label] for s, t in {**tables.train, **tables.test}.items() if request.label in t.columns}
    if not holders:
        raise SchemaError(f"task {request.name!r}: label column {request.label!r} is in none of the files given")
    train_labels = [t[request.label] for t in tables.train.values() if request.label in t.columns]
    labelled = sum(int(c.notna().sum()) for c in train_labels)
    if labelled == 0:
        raise SchemaError(f"task {request.name!r}: label column {request.label!r} has no values in the training files given")
    if request.kind == "regression":
        for source, column in holders.items():
            if not _is_numeric(column):
                raise SchemaError(f"{source}: label column {request.label!r} of regression task {request.name!r} holds values that are not numbers")
        values = pd.concat([pd.to_numeric(c.dropna()) for c in train_labels]).to_numpy(np.float64)
        std = float(values.std()) if len(values) > 1 else 1.0
        task = TaskColumn(name=request.name, kind="regression", label=request.label, target_mean=float(values.mean()), target_std=std if std > 1e-12 else 1.0)
        return task, Decision(request.label, "label", f"task {request.name} (regression), mean {task.target_mean:.4g}, std {task.target_std:.4g}, {labelled} training rows labelled")
    classes = _sorted_values(set().union(*(set(_label_values(c)) for c in holders.values())))
    if request.kind == "binary" and len(classes) != 2:
        raise SchemaError(f"task {request.name!r} is binary but label column {request.label!r} holds {len(classes)} distinct value(s) in the files given; binary needs exactly 2")
    if len(classes) < 2:
        raise SchemaError(f"task {request.name!r}: label column {request.label!r} holds {len(classes)} distinct value(s); classification needs at least 2")
    task = TaskColumn(name=request.name, kind=request.kind, label=request.label, classes=classes, n_classes=len(classes))
    return task, Decision(request.label, "label", f"task {request.name} ({request.kind}), classes {', '.join(classes)}, {labelled} training rows labelled")


def infer_schema(
    train: dict[str, pd.DataFrame] | Tables,
    tasks: list[TaskRequest],
    name: str = "federation",
    categorical: tuple[str, ...] = (),
    ignore: tuple[str, ...] = (),
    max_categories: int = MAX_CATEGORIES,
    statistics: bool = False,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[Schema, list[Decision]]:
    """A schema for ``tables`` (training tables, or :class:`Tables` with test tables too), and the decision made for each column.

    Numeric features get no ``mean``/``std`` (a training run computes them from
    the sites' training rows, :mod:`fedmeta.fl.normalization`) unless
    ``statistics``: then they are computed from the training rows of the
    tables given, held out as a run with ``test_fraction`` and ``seed`` holds them out.

    Raises :class:`~fedmeta.data.schema.SchemaError` (one line naming the file,
    column or task) for a label column found nowhere, a binary label without
    exactly two values, a feature with missing values, or no feature left; and
    :class:`~fedmeta.data.schema.SchemaProblems` (one line per file) for files
    without the label column of a task their site carries, or test files
    without a feature.
    """
    tables = train if isinstance(train, Tables) else Tables(train, {})
    if not tasks:
        raise SchemaError("give at least one task: --task NAME:KIND[:LABEL_COLUMN]")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise SchemaError(f"each task once: {', '.join(sorted({n for n in names if names.count(n) > 1}))} given twice")
    decisions: list[Decision] = []
    task_columns = []
    for request in tasks:
        task, decision = _task(request, tables)
        task_columns.append(task)
        decisions.append(decision)
    labels = {t.label for t in task_columns}
    problems = [line for site in tables.site_files() for line in missing_labels(site, [(t.name, t.label) for t in task_columns])]
    unknown = sorted(set(categorical) - set().union(*(set(t.columns) for t in tables.train.values())))
    if unknown:
        raise SchemaError(f"--categorical {', '.join(unknown)}: no such column in the files given")
    columns = list(dict.fromkeys(c for t in tables.train.values() for c in t.columns))
    features = []
    for column in columns:
        if column in labels:
            continue
        if column in ignore:
            decisions.append(Decision(column, "ignored", "as asked (--ignore)"))
            continue
        lacking = [s for s, t in tables.train.items() if column not in t.columns]
        if lacking:
            decisions.append(Decision(column, "ignored", f"missing from {len(lacking)} of {len(tables.train)} training files (first: {lacking[0]})"))
            continue
        holders = {s: t[column] for s, t in {**tables.train, **tables.test}.items() if column in t.columns}
        for source, values in holders.items():
            missing = int(values.isna().sum())
            if missing:
                raise SchemaError(
                    f"{source}: column {column!r} has {missing} missing value(s); features must be complete: fill them, or leave the column out with --ignore {column}"
                )
        if column not in categorical and all(_is_numeric(v) for v in holders.values()):
            features.append(Feature(name=column))
            continue
        values = _sorted_values(set().union(*(set(v.astype(str)) for v in holders.values())))
        if column not in categorical and len(values) > max_categories:
            decisions.append(Decision(column, "ignored", f"text with {len(values)} distinct values (an identifier?); keep it with --categorical {column} --max-categories {len(values)}"))
            continue
        if len(values) > max_categories:
            raise SchemaError(f"--categorical {column}: {len(values)} distinct values, more than --max-categories {max_categories}")
        features.append(Feature(name=column, type="categorical", categories=values))
    for source, table in tables.test.items():
        line = missing_features(source, list(table.columns), [f.name for f in features], labels)
        if line:
            problems.append(line)
    if problems:
        raise SchemaProblems(problems)
    if not features:
        raise SchemaError("no feature column left: every column is a label or ignored")
    schema = Schema(name=name, features=features, tasks=task_columns)
    if statistics:
        schema = schema.with_normalization(feature_sums(t, schema) for t in tables.training_rows(test_fraction, seed).values())
    for f in schema.features:
        if f.type == "numeric":
            decisions.append(Decision(f.name, "numeric", f"mean {f.mean:.4g}, std {f.std:.4g}" if f.mean is not None else "mean and std: the federation's"))
        else:
            shown = ", ".join(f.categories[:8]) + (", ..." if len(f.categories) > 8 else "")
            decisions.append(Decision(f.name, "categorical", f"{len(f.categories)} categories: {shown}"))
    order = {"label": 0, "numeric": 1, "categorical": 1, "ignored": 2}
    position = {c: i for i, c in enumerate(columns)}
    decisions.sort(key=lambda d: (order[d.role], position.get(d.column, 0)))
    return schema, decisions


def near_misses(tables: Tables, decisions: list[Decision], asked: tuple[str, ...] = ()) -> list[str]:
    """A "did you mean" line per file holding an ignored column that looks like another column,
    spelled differently (:func:`~fedmeta.data.near_miss.near_miss`), of at least as many sites
    (the training file, and its site's test file if it holds the column too).

    Only columns ignored because some training file lacks them are looked at
    (not those ignored as ``asked``, the ``ignore`` given to :func:`infer_schema`), and
    only files that lack the other spelling are named: a file with both holds two columns.

    >>> sites = {f"{s}.csv": pd.DataFrame({"mean radius": [1.0]}) for s in "abcd"}
    >>> sites["e.csv"] = pd.DataFrame({"mean_radius": [1.0]})
    >>> near_misses(Tables(sites, {}), [Decision("mean radius", "ignored", ""), Decision("mean_radius", "ignored", "")])
    ["e.csv: column 'mean_radius' was ignored; did you mean 'mean radius' (used at 4 sites)?"]
    """
    holders: dict[str, list[str]] = {}
    for source, table in tables.train.items():
        for column in table.columns:
            holders.setdefault(column, []).append(source)
    lines = []
    for d in decisions:
        column = d.column
        if d.role != "ignored" or column in asked or column not in holders or len(holders[column]) == len(tables.train):
            continue
        rivals = [c for c in holders if c != column and len(holders[c]) >= len(holders[column])]
        meant = near_miss(column, rivals)
        if meant is None:
            continue
        n = len(holders[meant])
        files = {s: tables.train[s] for s in holders[column]}
        files |= {tables.test_of[s]: tables.test[tables.test_of[s]] for s in holders[column] if s in tables.test_of}
        for source, table in files.items():
            if column in table.columns and meant not in table.columns:
                lines.append(f"{source}: column {column!r} was ignored; did you mean {meant!r} (used at {n} site{'s' if n != 1 else ''})?")
    return lines
