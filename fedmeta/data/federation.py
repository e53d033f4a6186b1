"""A federation on disk: which sites a data folder holds, what they are called, and their files.

One rule, used by training, evaluation and personalization alike:

- ``DATA_DIR/<site>.csv`` (or ``.parquet``): one file per site, named by the file;
- ``DATA_DIR/<site>/train.csv`` (or ``train.parquet``), optionally with
  ``DATA_DIR/<site>/test.csv`` (or ``test.parquet``): one folder per site,
  named by the folder. The test file is never trained on; the site is scored
  on it instead of on rows carved out of its training file.

A site's mapping (:mod:`fedmeta.data.mapping`), ``DATA_DIR/<site>/mapping.json``
or, for a site file, ``DATA_DIR/<site>.mapping.json``, maps the site's own
columns, codes and units to the schema's, in each of its files.

``DATA_DIR/schema.json`` describes every site. Sites are listed sorted by
name, so partition i of a simulation is always the i-th of them.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> (root / "clinic_b").mkdir(); _ = (root / "clinic_b" / "train.csv").write_text("x\\n1\\n")
>>> _ = (root / "clinic_a.csv").write_text("x\\n1\\n")
>>> [(s.name, s.train.name, s.test) for s in discover_sites(root)]
[('clinic_a', 'clinic_a.csv', None), ('clinic_b', 'train.csv', None)]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmeta.data.columns import missing_features, missing_labels
from fedmeta.data.mapping import MAPPING_FILE, Mapping, pending_review
from fedmeta.data.schema import Schema, SchemaError, SchemaProblems, combine_sums
from fedmeta.data.site import TABLE_SUFFIXES, TRAIN_STEM, SiteData, load_site, read_columns

SCHEMA_FILE = "schema.json"
TEST_STEM = "test"


@dataclass(frozen=True)
class SiteFiles:
    """One site of a federation folder: its name, its training file and, if it has them, its test file and its mapping."""

    name: str
    train: Path
    test: Path | None = None
    mapping: Path | None = None


def _table_in(folder: Path, stem: str) -> Path | None:
    found = [p for p in sorted(folder.iterdir()) if p.is_file() and p.stem.lower() == stem and p.suffix.lower() in TABLE_SUFFIXES]
    if len(found) > 1:
        raise SchemaError(f"{folder}: more than one {stem} file ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def discover_sites(data_dir: str | Path) -> list[SiteFiles]:
    """The sites of a federation folder, sorted by name (see the module docstring for the layout).

    Raises :class:`SchemaError` with one line naming the folder or file for a
    missing folder, a folder with no site, a site folder without a training
    file, or two sites with the same name.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise SchemaError(f"federation folder not found: {root}")
    sites: dict[str, SiteFiles] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir():
            train = _table_in(entry, TRAIN_STEM)
            if train is None:
                raise SchemaError(f"{entry}: a site folder needs a train.csv or train.parquet")
            mapping = entry / MAPPING_FILE
            site = SiteFiles(entry.name, train, _table_in(entry, TEST_STEM), mapping if mapping.is_file() else None)
        elif entry.suffix.lower() in TABLE_SUFFIXES:
            mapping = entry.with_name(f"{entry.stem}.{MAPPING_FILE}")  # not the folder's mapping.json: the folder holds every site
            site = SiteFiles(entry.stem, entry, None, mapping if mapping.is_file() else None)
        else:
            continue
        if site.name in sites:
            raise SchemaError(f"{root}: two sites named {site.name!r} ({sites[site.name].train.relative_to(root)} and {site.train.relative_to(root)})")
        sites[site.name] = site
    if not sites:
        raise SchemaError(f"{root}: no sites found; expected <site>.csv, <site>.parquet or <site>/train.csv files")
    return [sites[name] for name in sorted(sites)]


def federation_schema(data_dir: str | Path) -> Schema:
    """The schema of a federation folder (``schema.json`` inside it)."""
    path = Path(data_dir) / SCHEMA_FILE
    if not path.exists():
        raise SchemaError(f"{data_dir}: no {SCHEMA_FILE}; write one with: fedmeta schema infer {data_dir} --task NAME:KIND[:LABEL_COLUMN] --out {path}")
    return Schema.load(path)


def check_columns(sites: Sequence[SiteFiles], schema: Schema) -> None:
    """Raise :class:`~fedmeta.data.schema.SchemaProblems`, one line per file, if some file lacks a column it needs.

    Reads only the files' headers, all of them, so that every file without a
    feature, or without the label of a task its site carries
    (:mod:`fedmeta.data.columns`), is named at once, not the first one found.
    """
    features = [f.name for f in schema.features]
    labels = [t.label for t in schema.tasks]
    tasks = [(t.name, t.label) for t in schema.tasks]
    lines = []
    for site in sites:
        files = [(str(path), read_columns(path)) for path in (site.train, site.test) if path is not None]
        if site.mapping is not None:
            # What the file's columns become (a column mapped to null is gone); each mapping's own problems are named when its site loads.
            mapping = Mapping.load(site.mapping)
            files = [(source, [t for c in columns if (t := mapping.target(c)) is not None]) for source, columns in files]
        lines += [line for source, columns in files if (line := missing_features(source, columns, features, labels))]
        lines += missing_labels(files, tasks)
    if lines:
        raise SchemaProblems(lines)


def load_federation_site(site: SiteFiles, schema: Schema, test_fraction: float, seed: int) -> SiteData:
    """One discovered site's rows, mapped by its ``mapping.json`` if it has one and validated: scored on its test file
    if it has one, else on :func:`~fedmeta.data.site.held_out_mask`'s rows."""
    return load_site(site.train, schema, name=site.name, test_fraction=test_fraction, seed=seed, test_path=site.test, mapping=site.mapping)


def under_review(sites: Sequence[SiteFiles]) -> list[str]:
    """One line per site whose ``mapping.json`` has columns flagged ``review: true``, naming the file and the columns.

    A person clears a flag by checking the column and setting ``review`` to false; until then training refuses the
    site unless told to accept them (``fedmeta train --accept-review``).
    """
    lines = []
    for site in sites:
        if site.mapping is None:
            continue
        pending = pending_review(Mapping.load(site.mapping))
        if pending:
            lines.append(f"{site.mapping}: site {site.name!r} has {len(pending)} column(s) flagged for review: {'; '.join(pending)}")
    return lines


def federation_statistics(sites: Iterable[SiteData]) -> dict[str, tuple[float, float]]:
    """``{feature: (mean, std)}`` of the features the sites' schema leaves unset, from their training rows only.

    What a training run's roll call computes (:mod:`fedmeta.fl.normalization`):
    held-out and test rows never reach it.
    """
    sites = list(sites)
    unset = set(sites[0].schema.unnormalized) if sites else set()
    return {k: v for k, v in combine_sums(s.training_sums() for s in sites).items() if k in unset}


def load_federation(
    data_dir: str | Path, test_fraction: float = 0.25, seed: int = 0, statistics: Mapping[str, Sequence[float]] | None = None
) -> list[SiteData]:
    """Every site of a federation folder, validated against its schema, sorted by name.

    Numeric features are normalized with ``statistics`` (``{feature: (mean,
    std)}``) if given, else with the schema's, and those the schema leaves
    unset with the statistics these sites' training rows give, combined as a
    training run combines them (:func:`~fedmeta.data.schema.combine_sums`).
    """
    schema = federation_schema(data_dir)
    files = discover_sites(data_dir)
    check_columns(files, schema)
    if statistics is None and schema.unnormalized:
        statistics = federation_statistics([load_federation_site(site, schema, test_fraction, seed) for site in files])
    if statistics:
        schema = schema.with_statistics(statistics)
    return [load_federation_site(site, schema, test_fraction, seed) for site in files]
