"""A federation on disk: which sites a data folder holds, what they are called, their files and their regions.

One rule, used by training, evaluation and personalization alike:

- ``DATA_DIR/<site>.csv`` (or ``.parquet``): one file per site, named by the file;
- ``DATA_DIR/<site>/train.csv`` (or ``train.parquet``), optionally with
  ``DATA_DIR/<site>/test.csv`` (or ``test.parquet``): one folder per site,
  named by the folder. The test file is never trained on; the site is scored
  on it instead of on rows carved out of its training file.
- ``DATA_DIR/<region>/<site>.csv`` or ``DATA_DIR/<region>/<site>/train.csv``:
  the same, one level down, in a region folder. A folder with a training file
  is a site; a folder without one (nor a test file nor a ``mapping.json``) is
  a region, and every folder inside it must be a site. Sites at the root have
  no region and may sit beside region folders.
- ``DATA_DIR/regions.csv``, header ``site,region``: regions for sites found
  anywhere (the flat layout, typically). A site it does not list keeps its
  folder's region, or none; it may not contradict the folder.

Region names are 1 to 64 characters of ``A-Z a-z 0-9 . _ -`` not starting with
``.`` or ``_`` (entries starting with those are ignored, at every level).

A site's mapping (:mod:`fedmeta.data.mapping`), ``<site>/mapping.json``
or, for a site file, ``<site>.mapping.json`` beside it, maps the site's own
columns, codes and units to the schema's, in each of its files.

``DATA_DIR/schema.json`` describes every site. Sites are listed sorted by
name across regions (names are unique across regions), so partition i of a
simulation is always the i-th of them.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> (root / "clinic_b").mkdir(); _ = (root / "clinic_b" / "train.csv").write_text("x\\n1\\n")
>>> _ = (root / "clinic_a.csv").write_text("x\\n1\\n")
>>> (root / "north").mkdir(); _ = (root / "north" / "clinic_c.csv").write_text("x\\n1\\n")
>>> [(s.name, s.train.name, s.test, s.region) for s in discover_sites(root)]
[('clinic_a', 'clinic_a.csv', None, None), ('clinic_b', 'train.csv', None, None), ('clinic_c', 'clinic_c.csv', None, 'north')]
>>> site_regions(discover_sites(root))
{'clinic_c': 'north'}
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedmeta.data.columns import missing_features, missing_labels
from fedmeta.data.mapping import MAPPING_FILE, Mapping, pending_review
from fedmeta.data.schema import Schema, SchemaError, SchemaProblems, combine_sums
from fedmeta.data.site import TABLE_SUFFIXES, TRAIN_STEM, SiteData, load_site, read_columns
from fedmeta.files import atomic_write_bytes

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_FILE = "schema.json"
REGIONS_FILE = "regions.csv"
TEST_STEM = "test"
_REGION_NAME = re.compile(r"(?![._])[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class SiteFiles:
    """One site of a federation folder: its name, its training file and, if it has them, its test file, its mapping and its region."""

    name: str
    train: Path
    test: Path | None = None
    mapping: Path | None = None
    region: str | None = None

    @property
    def location(self) -> Path:
        """What holds the site's files: its folder, or its file for a site file (named by its stem, not ``train``)."""
        return self.train.parent if self.train.stem.lower() == TRAIN_STEM and self.train.parent.name == self.name else self.train


def _table_in(folder: Path, stem: str) -> Path | None:
    found = [p for p in sorted(folder.iterdir()) if p.is_file() and p.stem.lower() == stem and p.suffix.lower() in TABLE_SUFFIXES]
    if len(found) > 1:
        raise SchemaError(f"{folder}: more than one {stem} file ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def check_region_name(name: str, where: str) -> str:
    """``name`` if it is a valid region name (see the module docstring), else one-line :class:`SchemaError` naming it and ``where``."""
    if not _REGION_NAME.fullmatch(name):
        raise SchemaError(f"{where}: region name {name!r} is not 1 to 64 characters of A-Z a-z 0-9 . _ - starting with neither '.' nor '_'")
    return name


def _site_in(entry: Path, region: str | None) -> SiteFiles | None:
    """The site ``entry`` is (a site folder or a site file), or None for a folder with no site files of its own or a file that is no table."""
    if entry.is_dir():
        train = _table_in(entry, TRAIN_STEM)
        if train is None:
            return None
        mapping = entry / MAPPING_FILE
        return SiteFiles(entry.name, train, _table_in(entry, TEST_STEM), mapping if mapping.is_file() else None, region)
    if entry.suffix.lower() in TABLE_SUFFIXES:
        mapping = entry.with_name(f"{entry.stem}.{MAPPING_FILE}")  # not the folder's mapping.json: the folder holds every site
        return SiteFiles(entry.stem, entry, None, mapping if mapping.is_file() else None, region)
    return None


def _listed(folder: Path) -> list[Path]:
    return [e for e in sorted(folder.iterdir()) if not e.name.startswith((".", "_"))]


def _region_sites(folder: Path) -> list[SiteFiles]:
    """The sites of a region folder; any folder in it must be a site (regions are one level deep)."""
    region = check_region_name(folder.name, str(folder))
    sites = []
    for entry in _listed(folder):
        site = _site_in(entry, region)
        if site is None and entry.is_dir():
            raise SchemaError(f"{entry}: a site folder needs a train.csv or train.parquet (a folder in region folder {folder.name!r} is a site)")
        if site is not None:
            sites.append(site)
    return sites


def _is_broken_site(folder: Path) -> bool:
    """A folder without a training file that still holds a site's other files: a site missing its train file, not a region."""
    return _table_in(folder, TEST_STEM) is not None or (folder / MAPPING_FILE).is_file()


def discover_sites(data_dir: str | Path) -> list[SiteFiles]:
    """The sites of a federation folder, sorted by name across regions (see the module docstring for the layout).

    Raises :class:`SchemaError` with one line naming the folder or file for a
    missing folder, a folder with no site, a site folder without a training
    file, two sites with the same name, a bad region name, or a
    ``regions.csv`` that names a missing site, lists one twice or
    contradicts the site's region folder.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise SchemaError(f"federation folder not found: {root}")
    sites: dict[str, SiteFiles] = {}
    for entry in _listed(root):
        if entry.name == REGIONS_FILE:
            continue
        site = _site_in(entry, None)
        if site is None and entry.is_dir():
            if _is_broken_site(entry):
                raise SchemaError(f"{entry}: a site folder needs a train.csv or train.parquet")
            found = _region_sites(entry)
            if not found:
                raise SchemaError(f"{entry}: a site folder needs a train.csv or train.parquet (a region folder, <site>.csv, <site>.parquet or <site>/train.csv files)")
        else:
            found = [site] if site is not None else []
        for site in found:
            if site.name in sites:
                raise SchemaError(f"{root}: two sites named {site.name!r} ({sites[site.name].train.relative_to(root)} and {site.train.relative_to(root)})")
            sites[site.name] = site
    if not sites:
        raise SchemaError(f"{root}: no sites found; expected <site>.csv, <site>.parquet or <site>/train.csv files (or <region>/ folders of them)")
    if (root / REGIONS_FILE).is_file():
        sites = _with_listed_regions(root / REGIONS_FILE, sites)
    both = sorted(set(site_regions(sites.values()).values()) & set(sites))
    if both:
        # A version's lineage (global, region, site) and a folder of links name each by its name alone.
        raise SchemaError(f"{root}: {both[0]!r} names both a region and a site; rename one")
    return [sites[name] for name in sorted(sites)]


def _with_listed_regions(path: Path, sites: dict[str, SiteFiles]) -> dict[str, SiteFiles]:
    """``sites`` with the regions ``regions.csv`` gives them, each problem one line naming the file, the line and the site."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = [(i, row) for i, row in enumerate(csv.reader(f), start=1) if any(cell.strip() for cell in row)]
    if not rows or [c.strip() for c in rows[0][1]] != ["site", "region"]:
        raise SchemaError(f"{path}: the first line must be the header site,region")
    listed: dict[str, int] = {}
    sites = dict(sites)
    for line, row in rows[1:]:
        if len(row) != 2:
            raise SchemaError(f"{path}: line {line} has {len(row)} field(s); expected site,region")
        name, region = row[0].strip(), check_region_name(row[1].strip(), f"{path}: line {line}")
        if name in listed:
            raise SchemaError(f"{path}: site {name!r} is listed twice (lines {listed[name]} and {line})")
        listed[name] = line
        if name not in sites:
            raise SchemaError(f"{path}: line {line} lists site {name!r}, which {path.parent} does not hold")
        site = sites[name]
        if site.region is not None and site.region != region:
            raise SchemaError(f"{path}: line {line} puts site {name!r} in region {region!r}, but it sits in region folder {site.region!r}")
        sites[name] = replace(site, region=region)
    return sites


def site_regions(sites: Iterable[SiteFiles]) -> dict[str, str]:
    """``{site: region}`` for the sites that have a region; a site with none belongs to the global level only."""
    return {s.name: s.region for s in sites if s.region is not None}


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


def write_federation(out_dir: str | Path, schema: Schema, frames: dict[str, pd.DataFrame], region_of: dict[str, str] | None = None) -> tuple[Path, list[Path]]:
    """One CSV per site (each written atomically, in its region's folder if ``region_of`` gives it one) plus ``schema.json``."""
    out = Path(out_dir)
    paths = []
    for name, df in frames.items():
        path = out / (region_of or {}).get(name, "") / f"{name}.csv"
        atomic_write_bytes(path, df.to_csv(index=False).encode())
        paths.append(path)
    schema_path = out / "schema.json"
    schema.save(schema_path)
    return schema_path, paths
