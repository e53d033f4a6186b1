"""A seeded hospital network: the schema, the sites' tables (flat or in regions), and the folders they are written to.

Sites differ in size, case mix and outcome model, as hospitals do; with regions
(:func:`regional_hospital_frames`) most of a site's difference comes from its
region, as between urban and rural networks. :mod:`fedmeta.data.synthetic`
holds the other generators and offers these under its name too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.federation import federation_statistics, write_federation
from fedmeta.data.schema import Feature, Schema, TaskColumn
from fedmeta.data.site import SiteData, held_out_mask
from fedmeta.files import atomic_write_bytes


_WARDS = ["medical", "surgical", "cardiology", "icu"]
_ADMISSIONS = ["emergency", "urgent", "elective"]
_NUMERIC = ["age", "prior_admissions", "charlson_index", "heart_rate", "systolic_bp", "creatinine", "hemoglobin", "sodium", "wbc"]
HOSPITAL_TASKS = ("readmission_30d", "mortality", "length_of_stay")


def hospital_schema() -> Schema:
    """The hospital federation's schema, before federated normalization."""
    features = [Feature(name=n) for n in _NUMERIC[:1]]
    features.append(Feature(name="sex", type="categorical", categories=["F", "M"]))
    features.append(Feature(name="admission_type", type="categorical", categories=_ADMISSIONS))
    features.append(Feature(name="ward", type="categorical", categories=_WARDS))
    features += [Feature(name=n) for n in _NUMERIC[1:]]
    tasks = [
        TaskColumn(name="readmission_30d", kind="binary", label="readmitted_30d", classes=["0", "1"]),
        TaskColumn(name="mortality", kind="binary", label="died_in_hospital", classes=["0", "1"]),
        TaskColumn(name="length_of_stay", kind="regression", label="length_of_stay_days", target_mean=6.0, target_std=5.0),
    ]
    return Schema(name="hospitals", features=features, tasks=tasks)


def _hospital_frame(rng: np.random.Generator, n: int, site_shift: dict) -> tuple[pd.DataFrame, np.ndarray]:
    age = np.clip(rng.normal(site_shift["age_mean"], 16, n), 18, 100)
    ward = rng.choice(_WARDS, n, p=site_shift["ward_mix"])
    admission = rng.choice(_ADMISSIONS, n, p=site_shift["admission_mix"])
    severity = rng.normal(0, 1, n) + 0.8 * (ward == "icu") + 0.4 * (admission == "emergency") + (age - 60) / 25
    df = pd.DataFrame(
        {
            "age": age.round(0),
            "sex": rng.choice(["F", "M"], n),
            "admission_type": admission,
            "ward": ward,
            "prior_admissions": rng.poisson(np.exp(0.3 * severity + site_shift["util"]), n),
            "charlson_index": np.clip(np.round(rng.normal(2 + 1.2 * severity, 1.2, n)), 0, 15),
            "heart_rate": rng.normal(82 + 6 * severity, 11, n).round(0),
            "systolic_bp": rng.normal(128 - 6 * severity, 17, n).round(0),
            "creatinine": np.exp(rng.normal(0.0 + 0.18 * severity, 0.3, n)).round(2),
            "hemoglobin": rng.normal(13 - 0.6 * severity, 1.6, n).round(1),
            "sodium": rng.normal(139 - 0.8 * severity, 3.5, n).round(0),
            "wbc": np.exp(rng.normal(2.0 + 0.12 * severity, 0.3, n)).round(1),
        }
    )
    return df, severity


def _zscore(df: pd.DataFrame, col: str) -> np.ndarray:
    return (df[col].to_numpy(float) - df[col].mean()) / (df[col].std() + 1e-9)


def outcome_logits(df: pd.DataFrame, severity: np.ndarray, risk: dict) -> dict[str, np.ndarray]:
    """The true log-odds of each row's 30-day readmission (``readmitted_30d``) and in-hospital death (``died_in_hospital``).

    ``severity`` is the rows' latent severity, which no feature shows whole; ``risk`` a risk model
    (``readmit_b``, ``mort_b``, ``w_prior``, ``w_sev``, ``w_creat``), as :class:`SiteTruth` holds them.
    """
    emergency = (df["admission_type"] == "emergency").to_numpy(float)
    return {
        "readmitted_30d": risk["readmit_b"] + risk["w_prior"] * _zscore(df, "prior_admissions") + 0.5 * risk["w_sev"] * severity + 0.3 * emergency,
        "died_in_hospital": risk["mort_b"] + risk["w_sev"] * 1.1 * severity + 0.5 * _zscore(df, "creatinine") * risk["w_creat"] - 0.3 * _zscore(df, "hemoglobin"),
    }


def _hospital_outcomes(rng: np.random.Generator, df: pd.DataFrame, severity: np.ndarray, risk: dict) -> pd.DataFrame:
    """A site's labels from its rows and its risk model (intercepts and weights); each site records a subset of the three tasks."""
    n = len(df)
    logits = outcome_logits(df, severity, risk)
    los = np.exp(risk["los_b"] + 0.25 * risk["w_sev"] * severity + 0.35 * (df["ward"] == "icu") + rng.normal(0, 0.35, n))
    df["readmitted_30d"] = (rng.random(n) < 1 / (1 + np.exp(-logits["readmitted_30d"]))).astype(int)
    df["died_in_hospital"] = (rng.random(n) < 1 / (1 + np.exp(-logits["died_in_hospital"]))).astype(int)
    df["length_of_stay_days"] = los.round(1)
    has = rng.random(3) < [0.85, 0.7, 0.8]
    if not has.any():
        has[rng.integers(3)] = True
    for recorded, col in zip(has, ["readmitted_30d", "died_in_hospital", "length_of_stay_days"]):
        if not recorded:
            df[col] = np.nan
    return df


def hospital_federation_frames(n_sites: int = 20, seed: int = 0) -> tuple[Schema, dict[str, pd.DataFrame]]:
    """A seeded hospital network as raw tables, one per site, plus the schema.

    Sites differ in size (lognormal), case mix (age, ward and admission mix:
    covariate shift) and in how features relate to outcomes (site-specific
    coefficients and base rates: concept shift). Each site records a subset
    of the three tasks; unrecorded labels are empty.
    """
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    rng = np.random.default_rng(seed)
    frames: dict[str, pd.DataFrame] = {}
    for k in range(n_sites):
        n = int(np.clip(rng.lognormal(5.6, 0.7), 80, 4000))
        shift = {
            "age_mean": rng.uniform(50, 75),
            "ward_mix": rng.dirichlet([4, 2, 1.5, 0.8]),
            "admission_mix": rng.dirichlet([5, 2, 3]),
            "util": rng.normal(0, 0.3),
        }
        df, severity = _hospital_frame(rng, n, shift)
        # Concept shift: each site has its own base rates and its own weight on key risk factors (drawn in this order: the stream is fixed).
        risk = {"w_prior": 0.6 + rng.normal(0, 0.6), "w_sev": 1.0 + rng.normal(0, 0.5)}
        risk |= {"readmit_b": -1.7 + rng.normal(0, 1.5), "mort_b": -2.6 + rng.normal(0, 1.5), "w_creat": 1 + rng.normal(0, 0.7), "los_b": 1.4 + rng.normal(0, 0.25)}
        frames[f"hospital_{k:03d}"] = _hospital_outcomes(rng, df, severity, risk)
    return hospital_schema(), frames


def region_names(regions: int) -> list[str]:
    """``region_a``, ``region_b``, ..., ``region_z``, ``region_aa``, ...: ``regions`` names in the order sites are dealt to them."""
    names = []
    for i in range(regions):
        letters = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            letters = chr(ord("a") + r) + letters
        names.append(f"region_{letters}")
    return names


@dataclass(frozen=True)
class SiteTruth:
    """What drew a generated site's outcomes: its rows' latent severity, its risk model and its region's.

    The region's model has the mean creatinine weight (1), which the region does not draw.
    :func:`outcome_logits` turns either into each row's true log-odds: the ceiling no model of the
    site's features can pass, since they show the severity only in part (``benchmarks/hierarchy.py``).
    """

    severity: np.ndarray
    risk: dict
    region_risk: dict


def regional_hospital_frames(n_sites: int = 20, seed: int = 0, regions: int = 4) -> tuple[Schema, dict[str, pd.DataFrame], dict[str, str]]:
    """The hospital network with regions (urban and rural networks, say): the schema, one table per site and ``{site: region}``.

    Site k belongs to region k mod ``regions`` (so every region has ``n_sites // regions`` sites or one more).
    A region draws a case mix (age centre U(50, 75), ward and admission mixes from the flat network's
    Dirichlets, utilisation) and a risk model (readmission and mortality intercepts, ``w_prior``, ``w_sev``);
    its sites vary around those: age sd 3 years, mixes from Dirichlets of concentration 40 about the
    region's, intercepts sd 0.6 about the region's sd 1.2. The total intercept sd, 1.34, stays near the flat
    network's 1.5, so sites are about as different as there, but the region explains 1.44 / 1.80 = 80% of
    a site's intercept variance (``w_prior`` sd 0.5 region + 0.3 site, ``w_sev`` 0.4 + 0.25: about 73% each).
    What the flat network draws per site and no region would (creatinine weight, length-of-stay base, site size,
    which tasks a site records) stays per site. The draws use their own stream: :func:`hospital_federation_frames`
    is unchanged by their existence.
    """
    _, frames, region_of, _ = _regional_network(n_sites, seed, regions)
    return hospital_schema(), frames, region_of


def regional_hospital_truth(n_sites: int = 20, seed: int = 0, regions: int = 4) -> dict[str, SiteTruth]:
    """``{site: SiteTruth}`` for :func:`regional_hospital_frames` of the same arguments (it draws the network again)."""
    return _regional_network(n_sites, seed, regions)[3]


def _regional_network(n_sites: int, seed: int, regions: int) -> tuple[Schema, dict[str, pd.DataFrame], dict[str, str], dict[str, SiteTruth]]:
    if not 1 <= regions <= n_sites:
        raise ValueError(f"regions must be between 1 and n_sites ({n_sites}), got {regions}")
    rng = np.random.default_rng([seed, 28])
    names = region_names(regions)
    region = {
        name: {
            "age_mean": rng.uniform(50, 75), "ward_mix": rng.dirichlet([4, 2, 1.5, 0.8]), "admission_mix": rng.dirichlet([5, 2, 3]), "util": rng.normal(0, 0.25),
            "readmit_b": -1.7 + rng.normal(0, 1.2), "mort_b": -2.6 + rng.normal(0, 1.2), "w_prior": 0.6 + rng.normal(0, 0.5), "w_sev": 1.0 + rng.normal(0, 0.4),
        }
        for name in names
    }
    frames: dict[str, pd.DataFrame] = {}
    region_of: dict[str, str] = {}
    truths: dict[str, SiteTruth] = {}
    for k in range(n_sites):
        site, home = f"hospital_{k:03d}", names[k % regions]
        r = region[home]
        n = int(np.clip(rng.lognormal(5.6, 0.7), 80, 4000))
        shift = {
            "age_mean": r["age_mean"] + rng.normal(0, 3),
            "ward_mix": rng.dirichlet(40 * r["ward_mix"] + 1e-3),  # + 1e-3: a Dirichlet parameter must be positive
            "admission_mix": rng.dirichlet(40 * r["admission_mix"] + 1e-3),
            "util": r["util"] + rng.normal(0, 0.1),
        }
        df, severity = _hospital_frame(rng, n, shift)
        risk = {
            "readmit_b": r["readmit_b"] + rng.normal(0, 0.6), "mort_b": r["mort_b"] + rng.normal(0, 0.6),
            "w_prior": r["w_prior"] + rng.normal(0, 0.3), "w_sev": r["w_sev"] + rng.normal(0, 0.25),
            "w_creat": 1 + rng.normal(0, 0.7), "los_b": 1.4 + rng.normal(0, 0.25),
        }
        frames[site], region_of[site] = _hospital_outcomes(rng, df, severity, risk), home
        truths[site] = SiteTruth(severity, risk, {key: r[key] for key in ("readmit_b", "mort_b", "w_prior", "w_sev")} | {"w_creat": 1.0})
    return hospital_schema(), frames, region_of, truths


def hospital_federation(n_sites: int = 20, seed: int = 0, test_fraction: float = 0.25) -> list[SiteData]:
    """The hospital federation, encoded, as in-memory sites, normalized as a training run on all of them would normalize them."""
    schema, frames = hospital_federation_frames(n_sites, seed)
    raw = [SiteData.from_frame(name, schema, df, name, test_fraction, seed=seed) for name, df in frames.items()]
    schema = schema.with_statistics(federation_statistics(raw))
    return [SiteData.from_frame(name, schema, df, name, test_fraction, seed=seed) for name, df in frames.items()]


def write_hospital_federation(out_dir: str | Path, n_sites: int = 20, seed: int = 0, regions: int | None = None) -> tuple[Path, list[Path]]:
    """Write one CSV per site plus ``schema.json`` (means and stds left to the federation), the way real sites bring data.

    With ``regions``, the network of :func:`regional_hospital_frames`, each site in its region's folder (``<region>/<site>.csv``).
    """
    if regions is None:
        return write_federation(out_dir, *hospital_federation_frames(n_sites, seed))
    return write_federation(out_dir, *regional_hospital_frames(n_sites, seed, regions))


def write_clinic_federation(out_dir: str | Path, n_sites: int = 8, seed: int = 0, test_fraction: float = 0.25, missing_labels: float = 0.1) -> list[Path]:
    """A clinic network as users bring one: ``<clinic>/train.csv`` and ``<clinic>/test.csv``, no schema.

    Built from the hospital generator (:func:`hospital_federation_frames`)
    with two tasks, readmission (``readmitted_30d``) and mortality
    (``died_in_hospital``): a clinic may not record one of them at all, and
    ``missing_labels`` of the remaining labels are blank. Clinics that
    record neither are left out. A clinic's test file holds the rows the one
    split rule holds out (:func:`~fedmeta.data.site.held_out_mask` of the
    clinic's name, ``test_fraction`` and ``seed``). Returns the clinic folders.
    """
    _, frames = hospital_federation_frames(n_sites, seed)
    rng = np.random.default_rng([seed, 14])
    labels = ["readmitted_30d", "died_in_hospital"]
    folders = []
    for name, df in frames.items():
        df = df.drop(columns=["length_of_stay_days"])
        if df[labels].isna().all().all():
            continue
        for column in labels:
            df.loc[rng.random(len(df)) < missing_labels, column] = np.nan
        folder = Path(out_dir) / name.replace("hospital", "clinic")
        test = held_out_mask(folder.name, len(df), test_fraction, seed)
        atomic_write_bytes(folder / "train.csv", df[~test].to_csv(index=False).encode())
        atomic_write_bytes(folder / "test.csv", df[test].to_csv(index=False).encode())
        folders.append(folder)
    return folders
