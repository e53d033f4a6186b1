"""Federations on disk: sites written as CSV files (training sites and unseen ones), as Flower's csv federation reads them.

The schemas written leave numeric means and stds unset (FedProx Synthetic's
identity statistics excepted: the paper uses its features as drawn), so the
sites are normalized as a training run normalizes them: from the training
sites' training rows only, never from held-out rows or unseen sites.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data import SiteData, hospital_federation_frames, load_federation
from fedmeta.data.federation import SCHEMA_FILE, discover_sites, federation_schema, under_review
from fedmeta.data.schema import Schema, SchemaError, SchemaProblems, TaskColumn, numeric_schema
from fedmeta.data.synthetic import fedprox_schema, fedprox_synthetic
from fedmeta.files import atomic_write_bytes

@dataclass
class Federation:
    """Sites written as CSV files: the training sites (as Flower's csv federation reads them) and the unseen ones."""

    train_dir: Path
    unseen_dir: Path
    seen: list[SiteData]
    unseen: list[SiteData]
    seed: int
    test_fraction: float = 0.25
    #: Sites' mappings used with columns still under review (``--accept-review``), one line each; training is told to accept them too.
    review_accepted: list[str] = field(default_factory=list)


def federation_on_disk(
    out: Path, schema: Schema, frames: dict[str, pd.DataFrame], seed: int = 0, unseen_fraction: float = 0.2, test_fraction: float = 0.25
) -> Federation:
    """Write one CSV per site plus the schema; every fifth site (about ``unseen_fraction``) goes to the unseen folder.

    The sites are split by the one rule training and personalization use (:func:`~fedmeta.data.site.held_out_mask`).
    """
    step = max(2, round(1 / unseen_fraction)) if unseen_fraction > 0 else len(frames) + 1
    train_dir, unseen_dir = out / "train", out / "unseen"
    for i, (name, frame) in enumerate(frames.items()):
        folder = unseen_dir if i % step == step - 1 else train_dir
        atomic_write_bytes(folder / f"{name}.csv", frame.to_csv(index=False).encode())
    for folder in (train_dir, unseen_dir):
        schema.save(folder / "schema.json")
    # The sites as training finds them (fedmeta.data.federation): same names, order and held-out rows.
    seen = load_federation(train_dir, test_fraction, seed)
    unseen = load_federation(unseen_dir, test_fraction, seed, seen[0].schema.statistics()) if any(unseen_dir.glob("*.csv")) else []
    return Federation(train_dir, unseen_dir, seen, unseen, seed, test_fraction)


def folder_federation(
    data_dir: str | Path, out: Path, unseen: list[str], test_fraction: float = 0.25, seed: int = 0, accept_review: bool = False
) -> Federation:
    """A federation folder laid out by hand, split by name into training sites and ``unseen`` ones.

    Nothing is copied: ``out/train`` and ``out/unseen`` hold links to the
    sites' own files or folders (and to ``schema.json``), so the sites keep
    their names, their test files and their held-out rows. Each site's
    ``mapping.json`` is linked beside its rows and applied as training applies it.
    Raises :class:`~fedmeta.data.SchemaError` naming an unknown site, or when fewer than two sites would train;
    :class:`~fedmeta.data.schema.SchemaProblems` naming each site whose mapping has columns under review, in
    the words `fedmeta train` uses, unless ``accept_review``.
    """
    data_dir = Path(data_dir).resolve()
    federation_schema(data_dir)  # a missing or invalid schema.json is named before anything is linked
    sites = discover_sites(data_dir)
    # Every site, unseen ones included: they are read through their mappings too, and training would refuse only the others, after the local baselines.
    pending = under_review(sites)
    if pending and not accept_review:
        # The wording of fedmeta.fl.sites.prepare_federation, so evaluation and training refuse alike.
        raise SchemaProblems([f"{line}; check them and set \"review\": false, or pass --accept-review" for line in pending])
    names = [s.name for s in sites]
    unknown = [name for name in unseen if name not in names]
    if unknown:
        raise SchemaError(f"--unseen: {data_dir} has no site(s) {unknown}; its sites are {names}")
    if len(sites) - len(set(unseen)) < 2:
        raise SchemaError(f"--unseen leaves {len(sites) - len(set(unseen))} of {len(sites)} sites to train; at least 2 must take part")
    train_dir, unseen_dir = out / "train", out / "unseen"
    for folder in (train_dir, unseen_dir):
        if folder.exists():
            for link in folder.iterdir():
                if link.is_dir() and not link.is_symlink():
                    shutil.rmtree(link)  # a region folder of links: rmtree removes the links, not what they point to
                else:
                    link.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SCHEMA_FILE).symlink_to(data_dir / SCHEMA_FILE)
    for site in sites:
        # A site keeps its region as a region folder of links (whether its folder or regions.csv gave it), so the links read back alike.
        home = (unseen_dir if site.name in unseen else train_dir) / (site.region or "")
        home.mkdir(exist_ok=True)
        home.joinpath(site.location.name).symlink_to(site.location)
        if site.mapping is not None and site.location == site.train:  # a site file's mapping lies beside it, not in a folder the link carries
            home.joinpath(site.mapping.name).symlink_to(site.mapping)
    seen = load_federation(train_dir, test_fraction, seed)  # normalized as a training run on train_dir would be
    held = load_federation(unseen_dir, test_fraction, seed, seen[0].schema.statistics()) if unseen else []
    return Federation(train_dir, unseen_dir, seen, held, seed, test_fraction, review_accepted=pending)


def hospital_federation_on_disk(out: Path, n_sites: int, seed: int = 0, unseen_fraction: float = 0.2, test_fraction: float = 0.25) -> Federation:
    """The hospital network (:func:`fedmeta.data.hospital_federation_frames`) as a :class:`Federation`."""
    schema, frames = hospital_federation_frames(n_sites, seed)
    return federation_on_disk(out, schema, frames, seed, unseen_fraction, test_fraction)


def fedprox_federation_on_disk(out: Path, alpha: float, beta: float, n_sites: int = 30, seed: int = 0) -> Federation:
    """FedProx Synthetic(α, β) as CSV sites (features x0..x59, label y), with the generator's identity statistics (:func:`~fedmeta.data.synthetic.fedprox_schema`)."""
    sites = fedprox_synthetic(alpha, beta, n_sites, seed)
    schema = fedprox_schema()
    frames = {}
    for site in sites:
        frame = pd.DataFrame(site.x, columns=[f.name for f in schema.features])
        frame["y"] = site.labels["label"].astype(int)
        frames[site.name] = frame
    return federation_on_disk(out, schema, frames, seed)


def digits_federation_on_disk(out: Path, alpha: float, n_sites: int = 20, seed: int = 0, min_rows: int = 30) -> Federation:
    """scikit-learn's bundled digits split over sites by Dirichlet(α) label skew (PFLlib's recipe).

    For each class, its rows are dealt to the sites in Dirichlet(α) proportions; a small α gives each
    site few classes. Drawn again until every site has ``min_rows`` rows.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        assignment = np.empty(len(y), int)
        for c in range(10):
            rows = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_sites)) * len(rows)).astype(int)[:-1]
            for site, part in enumerate(np.split(rows, cuts)):
                assignment[part] = site
        if np.bincount(assignment, minlength=n_sites).min() >= min_rows:
            break
    else:
        raise ValueError(f"no Dirichlet({alpha}) split of digits gives every one of {n_sites} sites {min_rows} rows")
    task = TaskColumn(name="digit", kind="multiclass", n_classes=10, label="digit")
    schema = numeric_schema(64, [task], name=f"digits-dirichlet-{alpha}")
    schema = schema.model_copy(update={"features": [f.model_copy(update={"name": f"px{j}"}) for j, f in enumerate(schema.features)]})
    frames = {}
    for site in range(n_sites):
        rows = np.flatnonzero(assignment == site)
        frame = pd.DataFrame(x[rows], columns=[f.name for f in schema.features])
        frame["digit"] = y[rows]
        frames[f"site_{site:03d}"] = frame
    return federation_on_disk(out, schema, frames, seed)
