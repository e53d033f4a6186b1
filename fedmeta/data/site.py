"""A site's own rows: encoded features, per-task labels, and a fixed held-out split.

Not every site has every task; a row whose label for a task is missing is
simply not used for that task. The held-out split is drawn by one rule,
:func:`held_out_mask`, from the federation's seed and the site's name, so
training, evaluation and personalization all hold out the same rows of a
site, whichever process or machine loads it. Held-out rows are never trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fedmeta.data.columns import FileColumns, missing_labels
from fedmeta.data.mapping import MAPPING_FILE, Mapping, mapped_frame
from fedmeta.data.schema import Schema, SchemaError, SchemaProblems

if TYPE_CHECKING:  # episodes need torch; reading and checking rows (fedmeta predict) must not
    from fedmeta.data.episodes import EpisodeSampler

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
TRAIN_STEM = "train"
#: A task is trained at a site with at least this many labelled training rows.
MIN_TRAINING_ROWS = 4
#: A trained task is scored at a site with at least this many labelled held-out rows.
MIN_SCORED_ROWS = 2


def site_name(path: str | Path) -> str:
    """A site's name from its training file: the folder of a ``train.csv``, else the file's stem.

    >>> site_name("clinics/st-marys/train.csv"), site_name("clinics/st-marys.parquet")
    ('st-marys', 'st-marys')
    """
    path = Path(path)
    if path.stem.lower() == TRAIN_STEM and path.suffix.lower() in TABLE_SUFFIXES:
        return path.resolve().parent.name
    return path.stem


def held_out_mask(site: str, n_rows: int, test_fraction: float, seed: int) -> np.ndarray:
    """Which of a site's ``n_rows`` rows are held out: the one split rule every part of fedmeta uses.

    The draw depends only on the federation ``seed`` and the site's name (not
    on a partition number or load order), so a site's held-out rows are the
    same in simulation, on the Deployment Engine and in ``fedmeta personalize``.

    >>> a = held_out_mask("st-marys", 8, 0.25, seed=0)
    >>> int(a.sum()), bool((a == held_out_mask("st-marys", 8, 0.25, seed=0)).all())
    (2, True)
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"site {site!r}: test_fraction must be in (0, 1), got {test_fraction}")
    digest = hashlib.sha256(f"fedmeta-split/{seed}/{site}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    mask = np.zeros(n_rows, bool)
    mask[rng.permutation(n_rows)[: int(round(n_rows * test_fraction))]] = True
    return mask


@dataclass
class SiteData:
    """Rows of one site, already encoded with the federation schema.

    ``labels[task]`` holds class indices or scaled values, NaN where missing.
    ``test_mask`` marks the held-out rows.
    """

    name: str
    schema: Schema
    x: np.ndarray
    labels: dict[str, np.ndarray]
    test_mask: np.ndarray = field(repr=False)

    @classmethod
    def from_arrays(cls, name: str, schema: Schema, x: np.ndarray, labels: dict[str, np.ndarray], test_fraction: float = 0.25, seed: int = 0) -> "SiteData":
        """``seed`` is the federation's seed; the held-out rows follow from it and ``name`` (:func:`held_out_mask`)."""
        n = len(x)
        test_mask = held_out_mask(name, n, test_fraction, seed)
        full = {t.name: np.asarray(labels.get(t.name, np.full(n, np.nan)), np.float32) for t in schema.tasks}
        return cls(name, schema, np.asarray(x, np.float32), full, test_mask)

    @classmethod
    def from_frame(cls, name: str, schema: Schema, df: pd.DataFrame, source: str, test_fraction: float = 0.25, seed: int = 0) -> "SiteData":
        check_labels(schema, [(source, df.columns)])
        schema.validate_frame(df, source)
        labels = {t.name: schema.labels(df, t.name) for t in schema.tasks}
        return cls.from_arrays(name, schema, schema.encode(df), labels, test_fraction, seed)

    @classmethod
    def from_frames(cls, name: str, schema: Schema, train: pd.DataFrame, test: pd.DataFrame, train_source: str, test_source: str) -> "SiteData":
        """A site with its own test file: every row of ``test`` is held out, none of ``train`` is."""
        check_labels(schema, [(train_source, train.columns), (test_source, test.columns)])
        schema.validate_frame(train, train_source)
        schema.validate_frame(test, test_source)
        x = np.concatenate([schema.encode(train), schema.encode(test)])
        labels = {t.name: np.concatenate([schema.labels(train, t.name), schema.labels(test, t.name)]).astype(np.float32) for t in schema.tasks}
        test_mask = np.concatenate([np.zeros(len(train), bool), np.ones(len(test), bool)])
        return cls(name, schema, x.astype(np.float32), labels, test_mask)

    @property
    def n_rows(self) -> int:
        return len(self.x)

    @property
    def tasks(self) -> list[str]:
        """The tasks this site trains: those with at least :data:`MIN_TRAINING_ROWS` labelled training rows.

        Decided on the training rows alone: whether a held-out row carries a
        label must not change what the site trains (it is scored, not seen).
        """
        return [t for t in self.labels if self.n_labelled(t, train=True) >= MIN_TRAINING_ROWS]

    @property
    def scored_tasks(self) -> list[str]:
        """The trained tasks that also have at least :data:`MIN_SCORED_ROWS` labelled held-out rows to be scored on."""
        return [t for t in self.tasks if self.n_labelled(t, train=False) >= MIN_SCORED_ROWS]

    def held_out_digest(self) -> str:
        """SHA-256 of the held-out row numbers: lets a manifest say which rows were scored without holding them."""
        return hashlib.sha256(",".join(map(str, np.flatnonzero(self.test_mask))).encode()).hexdigest()

    def feature_ranges(self) -> dict[str, list[float]] | None:
        """The numeric features' range over the training rows (held-out rows excluded), for the manifest."""
        return self.schema.raw_ranges(self.x[~self.test_mask])

    def training_sums(self) -> dict[str, tuple[float, float, float]]:
        """This site's part of the federation's normalization: per numeric feature, the count, sum and sum of
        squares of its raw values over the training rows (held-out and test rows excluded), in float64."""
        x = self.x[~self.test_mask].astype(np.float64)
        out, start = {}, 0
        for f in self.schema.features:
            if f.type == "numeric":
                v = x[:, start] * f.scale + f.center
                out[f.name] = (float(len(v)), float(v.sum()), float((v**2).sum()))
            start += f.width
        return out

    def n_labelled(self, task: str, train: bool = True) -> int:
        mask = ~np.isnan(self.labels[task]) & (self.test_mask != train)
        return int(mask.sum())

    def split(self, task: str, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of the labelled rows of ``task`` on one side of the split."""
        mask = ~np.isnan(self.labels[task]) & (self.test_mask != train)
        y = self.labels[task][mask]
        if self.schema.task(task).is_classification:
            y = y.astype(np.int64)
        return self.x[mask], y

    def sampler(self, task: str, shots: int, query_size: int = 16, seed: int | np.random.Generator = 0) -> EpisodeSampler:
        """Episodes of ``task`` from the training split only."""
        spec = self.schema.task(task)
        x, y = self.split(task, train=True)
        from fedmeta.data.episodes import EpisodeSampler

        return EpisodeSampler(x, y, task, spec.is_classification, shots, query_size, spec.n_classes, seed)


def check_labels(schema: Schema, site: list[FileColumns]) -> None:
    """Raise :class:`SchemaProblems`, one line per file, if a file of ``site`` lacks a label column its site needs
    (:func:`~fedmeta.data.columns.missing_labels`)."""
    lines = missing_labels(site, [(t.name, t.label) for t in schema.tasks])
    if lines:
        raise SchemaProblems(lines)


def read_columns(path: str | Path) -> list[str]:
    """The column names of a site's CSV or Parquet file, read from its header; refuses a file with no rows.

    Cheap enough to check every file of a federation before any of them is loaded.
    """
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        head = read_table(path)  # which Parquet engine pandas has varies; a whole Parquet file reads fast anyway
    else:
        if not path.exists():
            raise SchemaError(f"site data file not found: {path}")
        try:
            head = pd.read_csv(path, nrows=1)
        except Exception as e:  # pandas raises many types; the user needs the file name
            raise SchemaError(f"cannot read site data {path}: {e}") from None
    if head.empty:
        raise SchemaError(f"{path}: the file has no rows")
    return [str(c) for c in head.columns]


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a site's CSV or Parquet file, with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise SchemaError(f"site data file not found: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as e:  # pandas raises many types; the user needs the file name
        raise SchemaError(f"cannot read site data {path}: {e}") from None


def _rows(path: Path) -> pd.DataFrame:
    df = read_table(path)
    if df.empty:
        raise SchemaError(f"{path}: the file has no rows")
    return df


def read_mapped(path: str | Path, mapping: Mapping | None, schema: Schema, need_labels: bool = True) -> pd.DataFrame:
    """A site file's rows in the schema's dialect: read (a file with no rows is refused), checked against ``mapping``
    and mapped by it (:mod:`fedmeta.data.mapping`); as read when ``mapping`` is None.

    Raises :class:`SchemaProblems` with every problem of the mapping for this file, one line each.
    """
    path = Path(path)
    return mapped_frame(mapping, _rows(path), schema, str(path), need_labels=need_labels)


def mapping_beside(path: str | Path) -> Path | None:
    """The mapping of a site's data file, if it has one: ``<stem>.mapping.json`` beside it, else ``mapping.json`` in its folder.

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> mapping_beside(folder / "st-marys.csv") is None
    True
    >>> _ = (folder / "mapping.json").write_text("{}"); _ = (folder / "st-marys.mapping.json").write_text("{}")
    >>> [mapping_beside(folder / f).name for f in ("st-marys.csv", "train.csv")]
    ['st-marys.mapping.json', 'mapping.json']
    """
    path = Path(path)
    for candidate in (path.with_name(f"{path.stem}.{MAPPING_FILE}"), path.parent / MAPPING_FILE):
        if candidate.is_file():
            return candidate
    return None


def load_site(
    path: str | Path,
    schema: Schema | str | Path,
    name: str | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    test_path: str | Path | None = None,
    mapping: Mapping | str | Path | None = None,
) -> SiteData:
    """Load and validate one site's table against the schema.

    With ``mapping`` (a :class:`~fedmeta.data.mapping.Mapping` or its file), the
    site's own columns, codes and units are mapped to the schema's first, in
    the training file and the test file alike, labels included. Whether a
    mapping under review may be used is the caller's decision
    (:func:`~fedmeta.data.mapping.require_reviewed`).

    The site is named ``name``, else by :func:`~fedmeta.data.federation.site_name`
    (the folder of a ``train.csv``, else the file's stem). With ``test_path``
    the site is scored on that file and nothing is held out of ``path``;
    otherwise :func:`held_out_mask` carves ``test_fraction`` of its rows.

    Raises :class:`SchemaError` naming the file, column and row of the first problem.
    """
    path = Path(path)
    if not isinstance(schema, Schema):
        schema = Schema.load(schema)
    name = name or site_name(path)
    if mapping is not None and not isinstance(mapping, Mapping):
        mapping = Mapping.load(mapping)
    if test_path is not None:
        test_path = Path(test_path)
        # The test file's labels are checked with the training file's (check_labels): a site's tasks are decided by both.
        train, test = read_mapped(path, mapping, schema, need_labels=False), read_mapped(test_path, mapping, schema, need_labels=False)
        return SiteData.from_frames(name, schema, train, test, str(path), str(test_path))
    return SiteData.from_frame(name, schema, read_mapped(path, mapping, schema), str(path), test_fraction, seed)
