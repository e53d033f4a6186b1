"""Seeded synthetic data: MAML sine tasks, FedProx Synthetic(α, β), a fraud federation, and (from
:mod:`fedmeta.data.hospitals`, its home) the hospital federation.

Everything here is a pure function of its seed, so every site of a
simulation can regenerate its own partition without files.

The hospital and fraud schemas leave their numeric features' means and stds
unset: a federation computes them from its training sites' training rows
(:func:`~fedmeta.data.federation.federation_statistics`), so held-out rows
and sites kept unseen never reach the normalization. FedProx Synthetic states
identity statistics: the paper feeds its features to the model as drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedmeta.data.episodes import EpisodeBatch
from fedmeta.data.federation import write_federation
from fedmeta.data.hospitals import (  # the hospital network's home; its names stay importable from here
    HOSPITAL_TASKS,
    hospital_federation,
    hospital_federation_frames,
    hospital_schema,
    region_names,
    regional_hospital_frames,
    write_clinic_federation,
    write_hospital_federation,
)
from fedmeta.data.schema import Feature, Schema, TaskColumn, numeric_schema
from fedmeta.data.site import SiteData

__all__ = [
    "SineTasks", "fedprox_schema", "fedprox_synthetic", "FedProxSites", "fraud_schema", "fraud_federation_frames", "write_fraud_federation",
    "write_federation", "HOSPITAL_TASKS", "hospital_schema", "hospital_federation_frames", "regional_hospital_frames", "region_names",
    "hospital_federation", "write_hospital_federation", "write_clinic_federation",
]

# --------------------------------------------------------------------------
# (a) MAML sine regression
# --------------------------------------------------------------------------


@dataclass
class SineTasks:
    """Sine regression (Finn et al. 2017): amplitude U[0.1, 5], phase U[0, π], x ~ U[-5, 5].

    >>> batch = SineTasks(seed=0).sample(meta_batch=25, shots=10)
    >>> tuple(batch.support_x.shape)
    (25, 10, 1)
    """

    seed: int = 0
    task: str = "sine"

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def draw_tasks(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.rng.uniform(0.1, 5.0, n), self.rng.uniform(0.0, np.pi, n)

    def points(self, amplitude: np.ndarray, phase: np.ndarray, n_points: int) -> tuple[np.ndarray, np.ndarray]:
        x = self.rng.uniform(-5.0, 5.0, (len(amplitude), n_points, 1)).astype(np.float32)
        y = (amplitude[:, None] * np.sin(x[..., 0] - phase[:, None])).astype(np.float32)
        return x, y

    def sample(self, meta_batch: int, shots: int, query: int | None = None) -> EpisodeBatch:
        """``meta_batch`` tasks with ``shots`` support and ``query`` (default ``shots``) query points each."""
        query = shots if query is None else query
        amp, phase = self.draw_tasks(meta_batch)
        sx, sy = self.points(amp, phase, shots)
        qx, qy = self.points(amp, phase, query)
        t = torch.from_numpy
        return EpisodeBatch(self.task, t(sx), t(sy), torch.ones(meta_batch, shots), t(qx), t(qy), torch.ones(meta_batch, query))


# --------------------------------------------------------------------------
# (b) FedProx Synthetic(α, β)
# --------------------------------------------------------------------------

SYNTHETIC_FEATURES = 60
SYNTHETIC_CLASSES = 10


def fedprox_schema() -> Schema:
    """FedProx Synthetic's schema: the generator's features are used as they are (mean 0, std 1 stated), as in the paper."""
    task = TaskColumn(name="label", kind="multiclass", n_classes=SYNTHETIC_CLASSES, label="y")
    schema = numeric_schema(SYNTHETIC_FEATURES, [task], name="fedprox-synthetic")
    return schema.with_statistics({f.name: (0.0, 1.0) for f in schema.features})


def fedprox_synthetic(alpha: float, beta: float, n_sites: int = 30, seed: int = 0, test_fraction: float = 0.25) -> list[SiteData]:
    """FedProx's Synthetic(α, β) (Li et al. 2020): 60 features, 10 classes, lognormal site sizes.

    Site k: u_k ~ N(0, α); W_k, b_k ~ N(u_k, 1); B_k ~ N(0, β); v_k ~ N(B_k, 1);
    x ~ N(v_k, Σ) with Σ = diag(j^-1.2); y = argmax(softmax(x W_k + b_k)).
    α controls how much models differ between sites, β how much their data does.
    One site at a time, without the others in memory: :class:`FedProxSites`.
    """
    sites = FedProxSites(alpha, beta, n_sites, seed, test_fraction, cached=0)
    return [sites[k] for k in range(n_sites)]


class FedProxSites:
    """The sites of :func:`fedprox_synthetic`, each drawn when asked for, bit-identical to the whole list's.

    All sites come from one random stream, so site k's draws start where site
    k-1's end. The generator's state at the start of each site is kept (a few
    hundred bytes each) as a walk through the stream reaches it; the walk
    skips a site by drawing its normals into a scratch buffer. A simulated
    site therefore holds its own rows, the last ``cached`` sites it built, and
    the start states, instead of the whole federation (850 MB at 10,000 sites).

    >>> sites = FedProxSites(1.0, 1.0, n_sites=8, seed=0)
    >>> whole = fedprox_synthetic(1.0, 1.0, n_sites=8, seed=0)
    >>> bool((sites[5].x == whole[5].x).all()) and len(sites) == 8
    True
    """

    def __init__(self, alpha: float, beta: float, n_sites: int = 30, seed: int = 0, test_fraction: float = 0.25, cached: int = 128):
        self.alpha, self.beta, self.n_sites, self.seed, self.test_fraction = alpha, beta, n_sites, seed, test_fraction
        self._walker = np.random.default_rng(seed)
        self.sizes = (self._walker.lognormal(4, 2, n_sites).astype(int) + 50).clip(max=5000)
        self._sigma = np.sqrt(np.arange(1, SYNTHETIC_FEATURES + 1) ** -1.2)
        self._schema = fedprox_schema()
        self._starts = [self._walker.bit_generator.state]  # the walker stands at the start of site len(_starts) - 1
        self._scratch = np.empty(0)
        self._cached, self._cache = cached, {}

    def __len__(self) -> int:
        return self.n_sites

    def __getitem__(self, k: int) -> SiteData:
        if not 0 <= k < self.n_sites:
            raise IndexError(f"site {k} of a FedProx federation of {self.n_sites} sites (0 to {self.n_sites - 1})")
        if k in self._cache:
            self._cache[k] = self._cache.pop(k)  # most recently used last
            return self._cache[k]
        while len(self._starts) <= k:
            self._skip(len(self._starts) - 1)
        if k == len(self._starts) - 1:  # the walker stands at site k: draw it on the way
            site = self._draw(self._walker, k)
            self._starts.append(self._walker.bit_generator.state)
        else:
            rng = np.random.default_rng()
            rng.bit_generator.state = self._starts[k]
            site = self._draw(rng, k)
        if self._cached:
            self._cache[k] = site
            if len(self._cache) > self._cached:
                self._cache.pop(next(iter(self._cache)))
        return site

    def _parameters(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Site k's model (W_k, b_k) and feature means v_k: the draws before its rows."""
        d, c = SYNTHETIC_FEATURES, SYNTHETIC_CLASSES
        u = rng.normal(0, np.sqrt(self.alpha)) if self.alpha > 0 else 0.0
        w = rng.normal(u, 1, (d, c))
        b = rng.normal(u, 1, c)
        big_b = rng.normal(0, np.sqrt(self.beta)) if self.beta > 0 else 0.0
        v = rng.normal(big_b, 1, d)
        return w, b, v

    def _draw(self, rng: np.random.Generator, k: int) -> SiteData:
        w, b, v = self._parameters(rng)
        x = rng.normal(v, self._sigma, (self.sizes[k], SYNTHETIC_FEATURES)).astype(np.float32)
        y = np.argmax(x @ w + b, axis=1).astype(np.float32)
        return SiteData.from_arrays(f"site_{k:03d}", self._schema, x, {"label": y}, self.test_fraction, seed=self.seed)

    def _skip(self, k: int) -> None:
        """Walk past site k, drawing what :meth:`_draw` draws (``normal(v, σ)`` takes one standard normal per entry, in order)."""
        self._parameters(self._walker)
        n = int(self.sizes[k]) * SYNTHETIC_FEATURES
        if len(self._scratch) < n:
            self._scratch = np.empty(n)
        self._walker.standard_normal(out=self._scratch[:n])
        self._starts.append(self._walker.bit_generator.state)


# --------------------------------------------------------------------------
# (c) A fraud federation: banks with different fraud base rates
# --------------------------------------------------------------------------

_MERCHANTS = ["grocery", "fuel", "restaurant", "travel", "online", "electronics"]


def fraud_schema() -> Schema:
    """Card transactions: amount, hour, merchant category, card presence, country mismatch, account age, recent activity."""
    features = [
        Feature(name="amount"),
        Feature(name="hour"),
        Feature(name="merchant_category", type="categorical", categories=_MERCHANTS),
        Feature(name="card_present", type="categorical", categories=["no", "yes"]),
        Feature(name="country_mismatch"),
        Feature(name="account_age_days"),
        Feature(name="transactions_24h"),
    ]
    return Schema(name="fraud", features=features, tasks=[TaskColumn(name="fraud", kind="binary", label="is_fraud", classes=["0", "1"])])


def fraud_federation_frames(n_banks: int = 12, seed: int = 0) -> tuple[Schema, dict[str, pd.DataFrame]]:
    """A seeded network of banks: each a table of card transactions labelled ``is_fraud``.

    Banks differ in size, customer mix, fraud base rate (about 1% to 15%: a logit intercept with
    standard deviation 0.9) and in which patterns their fraudsters use (online, night-time, foreign
    transactions weigh differently at each bank).
    """
    if n_banks < 1:
        raise ValueError(f"n_banks must be >= 1, got {n_banks}")
    rng = np.random.default_rng(seed)
    frames: dict[str, pd.DataFrame] = {}
    for k in range(n_banks):
        n = int(np.clip(rng.lognormal(6.3, 0.6), 200, 6000))
        online_share = rng.uniform(0.1, 0.5)
        mix = np.array([0.3, 0.12, 0.15, 0.08, online_share, 0.08])
        merchant = rng.choice(_MERCHANTS, n, p=mix / mix.sum())
        amount = np.exp(rng.normal(3.4 + 0.6 * (merchant == "electronics") + 0.8 * (merchant == "travel"), 0.9, n))
        hour = rng.integers(0, 24, n)
        card_present = np.where((merchant == "online") | (rng.random(n) < 0.1), "no", "yes")
        mismatch = (rng.random(n) < rng.uniform(0.02, 0.12)).astype(float)
        age = np.round(rng.exponential(rng.uniform(400, 1500), n))
        recent = rng.poisson(rng.uniform(1.5, 4.0), n)
        w_online, w_night, w_foreign = rng.normal(1.0, 0.8), rng.normal(0.8, 0.6), rng.normal(1.4, 0.6)
        night = ((hour < 6) | (hour >= 23)).astype(float)
        logit = (
            -3.6 + rng.normal(0, 0.9)
            + 0.6 * np.log(amount / 30)
            + w_online * (merchant == "online") + 0.5 * (merchant == "electronics")
            - 1.0 * (card_present == "yes")
            + w_night * night + w_foreign * mismatch
            - 0.6 * np.log1p(age / 100) + 0.25 * recent
        )
        frames[f"bank_{k:03d}"] = pd.DataFrame(
            {
                "amount": amount.round(2),
                "hour": hour,
                "merchant_category": merchant,
                "card_present": card_present,
                "country_mismatch": mismatch,
                "account_age_days": age,
                "transactions_24h": recent,
                "is_fraud": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int),
            }
        )
    return fraud_schema(), frames


def write_fraud_federation(out_dir: str | Path, n_banks: int = 12, seed: int = 0) -> tuple[Path, list[Path]]:
    """Write one CSV per bank plus ``schema.json``."""
    return write_federation(out_dir, *fraud_federation_frames(n_banks, seed))
