"""The model being served: loaded from the registry, hash-verified, swapped atomically.

A :class:`LoadedModel` bundles an onnxruntime session with what the API needs
to use it: the manifest's tasks and classes and a row validator compiled
from the schema. :class:`ModelStore` holds the current one. A request takes
one reference at its start and uses it to the end, so a swap (promote,
rollback, hot reload) never changes the model under a request in flight:
in-flight requests finish on the old session, new ones get the new session,
and the old session is freed when its last request is done.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnxruntime as ort

from fedmeta.data.mapping import Mapping
from fedmeta.data.schema import Schema
from fedmeta.manifest import Manifest
from fedmeta.registry import REGISTRY_FILE, AuditChainError, ModelVersion, SiteHome
from fedmeta.manifest import ManifestError
from fedmeta.training_range import RangeCheck
from serving.dialect import Dialect
from serving.errors import ApiError, shown

log = logging.getLogger("fedmeta.serving")
_NUMBER = (int, float)
FLOAT32_MAX = float(np.finfo(np.float32).max)
Z_LIMIT = 1e6  # standard deviations from the federation's mean beyond which a value is refused as a unit or typing error


def feature_range(feature: dict) -> tuple[float, float]:
    """The values a numeric feature accepts: -B to B, where B is the power of ten at or above |mean| + :data:`Z_LIMIT` stds, within float32.

    Further out than mean +- Z_LIMIT stds a value is a unit or typing error,
    and the model's float32 arithmetic overflows. B is a power of ten so that
    the OpenAPI document can state the very bound the server enforces
    without stating the federation's un-noised mean and std: it gives away
    their order of magnitude only.

    >>> feature_range({"mean": 125.3, "std": 18.3})
    (-100000000.0, 100000000.0)
    """
    mean, std = float(feature.get("mean", 0.0)), float(feature.get("std", 1.0))
    reach = abs(mean) + Z_LIMIT * abs(std)
    bound = 10.0 ** math.ceil(math.log10(reach)) if reach > 1 else 1.0
    if bound < reach:  # log10 rounded down across a power of ten
        bound *= 10
    bound = min(FLOAT32_MAX, bound)
    return -bound, bound


def row_label(where: str, i: int) -> str:
    """``rows[3]`` for a row of a list, ``row`` for the single row of a ``{"row": ...}`` body."""
    return f"{where}[{i}]" if where == "rows" else where


class Columns(dict):
    """A feed (``{input name: column}``) whose columns are the rows of two feature-major matrices, kept with it.

    ``numeric`` is float32 (numeric features x rows), ``categorical`` holds objects (categorical
    features x rows, None without such features), and ``layout`` names their rows. Feeds of one
    layout join by two concatenations instead of one per input (:meth:`joined`).
    """

    __slots__ = ("layout", "numeric", "categorical")

    def __init__(self, layout: tuple[tuple[str, ...], tuple[str, ...]], numeric: np.ndarray, categorical: np.ndarray | None):
        super().__init__(zip(layout[0], numeric))  # each column a view of its matrix row: iterating costs less than indexing
        if categorical is not None:
            self.update(zip(layout[1], categorical))
        self.layout, self.numeric, self.categorical = layout, numeric, categorical

    @staticmethod
    def joined(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The feeds' rows one after another, per input: two concatenations for feeds of one layout (8 one-row feeds: ~28 -> ~6 us)."""
        first = feeds[0]
        layout = getattr(first, "layout", None)
        if layout is None or any(getattr(feed, "layout", None) is not layout for feed in feeds):
            return {name: np.concatenate([feed[name] for feed in feeds]) for name in first}
        categorical = None if first.categorical is None else np.concatenate([feed.categorical for feed in feeds], axis=1)
        return Columns(layout, np.concatenate([feed.numeric for feed in feeds], axis=1), categorical)


class RowValidator:
    """Checks JSON rows against the schema and turns them into onnxruntime inputs, one column per feature.

    Errors name the row and the feature: ``rows[3].age: expected a number, got "abc"``.
    Numeric values must lie in :func:`feature_range`. Fields that are no
    feature (a ``patient_id``) are refused with ``strict`` and otherwise
    left out, as ``fedmeta predict`` leaves out other columns;
    :meth:`ignored_fields` names them.
    """

    def __init__(self, schema: dict, max_rows: int):
        self.max_rows = max_rows
        self.features = [f["name"] for f in schema["features"]]
        self.numeric = [f["name"] for f in schema["features"] if f.get("type", "numeric") == "numeric"]
        self.categorical = {f["name"]: frozenset(f["categories"]) for f in schema["features"] if f.get("type") == "categorical"}
        self.known = frozenset(self.features)
        self.ranges = {f["name"]: feature_range(f) for f in schema["features"] if f.get("type", "numeric") == "numeric"}
        # float64, as JSON Schema compares: in float32 a value just past a bound would round onto it and pass.
        self._lo = np.array([self.ranges[n][0] for n in self.numeric], dtype=np.float64)[:, None]
        self._hi = np.array([self.ranges[n][1] for n in self.numeric], dtype=np.float64)[:, None]
        self._bounds = [self.ranges[n] for n in self.numeric]
        self.layout = (tuple(self.numeric), tuple(self.categorical))  # one object per validator: Columns.joined compares identity

    def _problem(self, where: str, rows: list, name: str) -> ApiError:
        for i, row in enumerate(rows):
            label = row_label(where, i)
            if not isinstance(row, dict):
                return ApiError(422, f"{label}: expected an object of feature values, got {type(row).__name__}")
            if name not in row:
                others = sorted(k[:40] for k in row.keys() - self.known)[:5]  # a misspelt feature shows up here
                return ApiError(422, f"{label}: missing feature {name!r}" + (f"; the row's fields that are no feature: {others}" if others else ""))
            value = row[name]
            if name in self.categorical:
                if not isinstance(value, str):
                    return ApiError(422, f"{label}.{name}: expected a category (string), got {shown(value)}")
                if value not in self.categorical[name]:
                    return ApiError(422, f"{label}.{name}: unknown category {shown(value)}; known: {sorted(self.categorical[name])}")
            else:
                if value is None:
                    return ApiError(422, f"{label}.{name}: missing value (null); a number is required")
                if type(value) not in _NUMBER:
                    return ApiError(422, f"{label}.{name}: expected a number, got {shown(value)}")
                if not math.isfinite(value):
                    return ApiError(422, f"{label}.{name}: {shown(value)} is not a finite number")
                if abs(value) > FLOAT32_MAX:
                    return ApiError(422, f"{label}.{name}: {shown(value)} is outside the float32 range the model computes in (|x| <= 3.4e38)")
                lo, hi = self.ranges[name]
                if not lo <= value <= hi:
                    return ApiError(422, f"{label}.{name}: {shown(value)} is more than 1e6 standard deviations from the federation's mean "
                                         f"(accepted: {lo:.4g} to {hi:.4g}); check the unit")
        return ApiError(422, f"{where}: invalid value for feature {name!r}")

    def _first_problem(self, where: str, rows: list) -> ApiError:
        for name in self.features:
            problem = self._problem(where, rows, name)
            if problem.message != f"{where}: invalid value for feature {name!r}":
                return problem
        return ApiError(422, f"{where}: invalid rows")

    def columns(self, rows: object, where: str = "rows", limit: int | None = None, strict: bool = True) -> tuple[Columns, int]:
        """``{feature: array}`` for onnxruntime, and the row count; raises :class:`ApiError` naming the first problem.

        With ``strict``, a field that is no feature is a problem; without, it is left out.
        """
        if not isinstance(rows, list) or not rows:
            raise ApiError(422, f"{where}: expected a non-empty list of rows")
        n = len(rows)
        limit = self.max_rows if limit is None else limit
        if n > limit:
            raise ApiError(413, f"{where}: too many rows ({n}); the limit is {limit} per request")
        width = len(self.features)
        try:
            if strict and any(len(r) != width for r in rows):
                for i, r in enumerate(rows):
                    extra = sorted(set(r) - self.known) if isinstance(r, dict) else None
                    if extra:
                        raise ApiError(422, f"{row_label(where, i)}: unknown feature(s) {[x[:40] for x in extra[:5]]}; features are {self.features}")
        except TypeError:
            pass  # a row that is not an object: reported by name below
        try:
            # One pass over all numeric values and one array: per-feature arrays cost ~3x more here.
            numeric = [r[name] for name in self.numeric for r in rows]
            if n == 1:  # the common request: for one row, Python's comparisons cost less than numpy's calls (~15 us)
                if not all(type(v) in _NUMBER and lo <= v <= hi for v, (lo, hi) in zip(numeric, self._bounds)):
                    raise self._first_problem(where, rows)
                matrix = np.array(numeric, dtype=np.float32).reshape(len(self.numeric), 1)
            else:
                if not all(type(v) in _NUMBER for v in numeric):
                    raise self._first_problem(where, rows)
                matrix = np.array(numeric, dtype=np.float64).reshape(len(self.numeric), n)
                if not ((matrix >= self._lo) & (matrix <= self._hi)).all():  # also false for NaN and inf
                    raise self._first_problem(where, rows)
                matrix = matrix.astype(np.float32)  # within the bounds, so within float32
            categories = None
            if n == 1 and self.categorical:  # one object array for all the row's categories, as for its numbers
                row = rows[0]
                values = [row[name] for name in self.categorical]
                for name, value in zip(self.categorical, values):
                    if value not in self.categorical[name]:
                        raise self._problem(where, rows, name)
                categories = np.array(values, dtype=object).reshape(len(values), 1)
            elif self.categorical:
                columns = []
                for name, known in self.categorical.items():
                    column = [r[name] for r in rows]
                    if not all(v in known for v in column):
                        raise self._problem(where, rows, name)
                    columns.append(column)
                categories = np.array(columns, dtype=object)
        except (KeyError, TypeError, OverflowError):
            raise self._first_problem(where, rows) from None
        return Columns(self.layout, matrix, categories), n

    def ignored_fields(self, rows: list[dict]) -> list[str]:
        """The names, sorted, of the fields in ``rows`` that are no feature, for rows :meth:`columns` accepted.

        Such a row holds every feature, so only a row with more fields than features holds another.
        """
        width = len(self.features)
        return sorted({k for r in rows if len(r) != width for k in r.keys() - self.known})


def check_finite(tasks: list[str], outputs: list[np.ndarray], where: str, n: int) -> None:
    """A 422 naming the first row whose outputs are not all finite (never a 200 with nulls)."""
    for task, out in zip(tasks, outputs):
        if math.isfinite(out.sum()):  # one reduction: NaN and inf carry through a sum (an overflowing sum only sends it on to the exact check)
            continue
        finite = np.isfinite(out)
        if not finite.all():
            i = int(np.flatnonzero(~finite.reshape(n, -1).all(1))[0])
            raise ApiError(422, f"{row_label(where, i)}: the model's {task!r} output is not a finite number for these feature values; "
                                "they are far outside what it was trained on")


@dataclass(frozen=True)
class LoadedModel:
    """One model version, ready to answer requests."""

    version: ModelVersion
    manifest: Manifest
    session: ort.InferenceSession
    validator: RowValidator
    site: str
    ranges: RangeCheck | None = None  # None: the manifest records no training range (a model published before fedmeta recorded them)
    dialect: Dialect | None = None  # None: the model records no mapping, and requests are in the schema's dialect only

    @property
    def label(self) -> str:
        return self.version.label

    @cached_property
    def tasks(self) -> list[str]:
        return [t.name for t in self.manifest.tasks]

    @cached_property
    def _task_outputs(self) -> dict:
        return {t.name: t for t in self.manifest.tasks}

    def task_outputs(self) -> dict:
        return self._task_outputs

    @cached_property
    def _run(self):
        # The C session's run: the Python wrapper re-checks, per call (~10 us), that every input is fed, which
        # RowValidator.columns and the v2 tensor checks already guarantee. Older or newer wrappers without it: theirs.
        inner = getattr(self.session, "_sess", None)
        return (lambda tasks, feed: inner.run(tasks, feed, None)) if inner is not None else self.session.run

    def run(self, tasks: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs of ``tasks`` for a feed holding every input (as :meth:`RowValidator.columns` builds it)."""
        return self._run(tasks, feed)

    @cached_property
    def batcher(self):
        """This model's :class:`serving.batching.RunBatcher`."""
        from serving.batching import RunBatcher  # batching builds on this module's checks

        return RunBatcher(self.run, self.ranges)

    def outside_training_range(self, feed: dict[str, np.ndarray], n: int) -> list[dict] | None:
        """The rows with a value outside the training range and their features (:mod:`fedmeta.training_range`); None if unrecorded."""
        return None if self.ranges is None else self.ranges.flagged(feed, n)


def load_model(home: SiteHome, version: ModelVersion, max_rows: int, threads: int = 1) -> LoadedModel:
    """Verify a version's files against its manifest and the registry, then open an onnxruntime session."""
    manifest, data = home.load(version)  # raises ManifestError on any hash mismatch
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    if manifest.schema_ is None:
        raise ManifestError(f"{version.label} has no schema in its manifest; it cannot be served")
    validator = RowValidator(manifest.schema_, max_rows)
    ranges = RangeCheck.from_manifest(manifest.feature_ranges, validator.numeric)
    dialect = None
    if manifest.mapping is not None:
        # Checked against the schema's digest when the model was trained; a head since added changes the schema, not the
        # site's columns (as fedmeta.predict.load_promoted reads it).
        mapping = Mapping.model_validate(manifest.mapping).model_copy(update={"schema_digest": None})
        dialect = Dialect(mapping, Schema.model_validate(manifest.schema_))
    return LoadedModel(version, manifest, session, validator, version.site or "", ranges, dialect)


def require_verified_chain(home: SiteHome) -> None:
    """Raise :class:`AuditChainError` naming the registry file and the first break unless the audit chain verifies.

    Checked before serving the first model and before any later swap: a
    promotion written behind fedmeta's back is never served.
    """
    problems = home.registry.verify().problems
    if problems:
        more = f" (and {len(problems) - 1} more; see `fedmeta models audit --verify`)" if len(problems) > 1 else ""
        raise AuditChainError(f"{home.path / REGISTRY_FILE}: the audit log does not verify: {problems[0]}{more}")


class ModelStore:
    """The currently served model: always the version the registry names as promoted.

    The registry is the single source of truth. Promote and rollback write
    the registry first and then call :meth:`sync`, as the reload loop does
    for promotions made elsewhere; nothing else changes what is served, so
    the two can never disagree for longer than a load. :meth:`sync` runs in
    a worker thread (it reads SQLite and loads files), never on the event
    loop; requests read :attr:`current`, a plain attribute, and never wait
    for it.
    """

    def __init__(self, home: SiteHome, site: str, max_rows: int, threads: int = 1):
        self.home, self.site, self.max_rows, self.threads = home, site, max_rows, threads
        self._swap_lock = threading.Lock()
        self.current: LoadedModel = load_model(home, home.current(site), max_rows, threads)

    def load(self, version: ModelVersion) -> LoadedModel:
        """``version`` verified and ready, without serving it (raises ManifestError on a hash mismatch)."""
        return load_model(self.home, version, self.max_rows, self.threads)

    def sync(self, loaded: LoadedModel | None = None) -> bool:
        """Serve the registry's promoted version (``loaded`` if that is it); True if the served model changed."""
        with self._swap_lock:
            promoted = self.home.registry.current(self.site)
            if promoted is None or promoted.version == self.current.version.version:
                return False
            require_verified_chain(self.home)
            if loaded is None or loaded.version.version != promoted.version:
                loaded = self.load(promoted)
            previous, self.current = self.current, loaded
        log.info(json.dumps({"event": "serving", "version": loaded.label, "previous": previous.label, "sha256": loaded.version.sha256}))
        return True
