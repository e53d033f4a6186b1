"""Generator families for the personalization benchmark, each drawable at any seed.

A family is a kind of federation (how sites differ from one another); a seed
draws one federation of that kind. :data:`FAMILIES` maps a family's name to its
generator ``(seed, n_sites=20) -> (Schema, {site name: rows})``, the rows being
features plus label columns as :func:`~fedmeta.evaluate.federations.federation_on_disk`
writes them, and :func:`family_federation_on_disk` writes one to disk.

Two sets of seeds, kept apart:

- :data:`SELECTION_SEEDS` are for choosing anything: rules, defaults,
  candidates, hyperparameters, thresholds. Look at these as often as you like.
- :data:`FRESH_SEEDS` are for reporting only. Nothing may be chosen on them:
  a rule changed after seeing a fresh-seed figure makes that figure a
  selection figure, and new fresh seeds are needed to report it.

>>> schema, frames = FAMILIES["label_shift"](seed=SELECTION_SEEDS[0])
>>> len(frames), next(iter(frames)), [t.name for t in schema.tasks]
(20, 'site_000', ['kind'])

Every generator is a pure function of its seed (one ``numpy.random.default_rng(seed)``).
Each draws 8-12 numeric features, which sites record in their own units (a
per-feature offset and scale, the same at every site), so normalization
matters and is left to the federation (the schema leaves means and stds
unset). Label noise keeps the best achievable accuracy around 0.75-0.9.
Every site's training rows (those :func:`~fedmeta.data.site.held_out_mask`
leaves at ``test_fraction`` 0.25 and the family's seed, as
:func:`family_federation_on_disk` splits them) hold both classes of every
binary task and every class of every multiclass task, except under label
shift, where they hold at least two classes: a site's labels are drawn again
until they do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.schema import Feature, Schema, TaskColumn
from fedmeta.data.site import held_out_mask
from fedmeta.evaluate.federations import Federation, federation_on_disk

SELECTION_SEEDS = (1, 2)
FRESH_SEEDS = (1001, 1002)

#: The held-out fraction the generators make sure leaves every class in the training rows.
TEST_FRACTION = 0.25
#: Logits this many standard deviations wide give a best achievable binary accuracy of about 0.84.
_LOGIT_SCALE = 3.0
_GROUPS = ["a", "b", "c"]
_BINARY = TaskColumn(name="outcome", kind="binary", label="outcome", classes=["0", "1"])

Rows = dict[str, pd.DataFrame]


def _n_features(rng: np.random.Generator) -> int:
    return int(rng.integers(8, 13))


def _units(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's offset and scale: what a site records is ``offset + scale * z`` for the latent ``z``."""
    return rng.uniform(-20, 80, d).round(0), np.exp(rng.uniform(-1, 3, d))


def _features(z: np.ndarray, units: tuple[np.ndarray, np.ndarray]) -> pd.DataFrame:
    offset, scale = units
    return pd.DataFrame((offset + scale * z).round(4), columns=[f"x{j}" for j in range(z.shape[1])])


def _schema(name: str, d: int, tasks: list[TaskColumn], group: bool) -> Schema:
    features = [Feature(name=f"x{j}") for j in range(d)]
    if group:
        features.append(Feature(name="group", type="categorical", categories=_GROUPS))
    return Schema(name=name, features=features, tasks=tasks)


def _regression(name: str, mean: float, std: float) -> TaskColumn:
    return TaskColumn(name=name, kind="regression", label=name, target_mean=mean, target_std=std)


def _multiclass(name: str, n_classes: int) -> TaskColumn:
    return TaskColumn(name=name, kind="multiclass", n_classes=n_classes, label=name)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _draw_classes(rng: np.random.Generator, probabilities: np.ndarray, site: str, seed: int, need: int | None = None) -> np.ndarray:
    """Class labels drawn from per-row ``probabilities`` (rows x classes), drawn again until the site's
    training rows hold ``need`` classes (default all of them): a site must be able to fit every task it has."""
    n, k = probabilities.shape
    need = k if need is None else need
    training = ~held_out_mask(site, n, TEST_FRACTION, seed)
    cumulative = probabilities.cumsum(axis=1)
    for _ in range(1000):
        y = (rng.random((n, 1)) > cumulative[:, :-1]).sum(axis=1)
        if len(np.unique(y[training])) >= need:
            return y
    raise ValueError(f"{site}: 1000 draws of its labels never put {need} classes in its training rows")


def _binary(rng: np.random.Generator, logit: np.ndarray, site: str, seed: int) -> np.ndarray:
    p = _sigmoid(logit)
    return _draw_classes(rng, np.stack([1 - p, p], axis=1), site, seed)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _site_name(k: int) -> str:
    return f"site_{k:03d}"


def _group_column(rng: np.random.Generator, n: int, mix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A categorical ``group`` per row from the site's ``mix``: the values and their indices."""
    index = rng.choice(len(_GROUPS), n, p=mix)
    return np.asarray(_GROUPS)[index], index


def _linear_sites(
    name: str, seed: int, n_sites: int, sizes: Callable[[np.random.Generator, int], np.ndarray], site_effect: float, missing: float
) -> tuple[Schema, Rows]:
    """Linear truth with site coefficients ``w_s = w + delta_s``, ``|delta_s| = site_effect * |w|``, and site intercepts:
    a binary task and a regression task (``missing`` of its labels left empty), features x0.. plus ``group``."""
    rng = np.random.default_rng(seed)
    d = _n_features(rng)
    units = _units(rng, d)
    tasks = [_BINARY, _regression("score", 50.0, 12.0)]
    w_binary, w_score = _unit(rng.normal(size=d)), _unit(rng.normal(size=d))
    group_effect = rng.normal(0, 0.5, len(_GROUPS))
    frames: Rows = {}
    for k, n in enumerate(sizes(rng, n_sites)):
        site = _site_name(k)
        w_site_binary = _unit(w_binary + site_effect * _unit(rng.normal(size=d)))
        w_site_score = _unit(w_score + site_effect * _unit(rng.normal(size=d)))
        intercept, score_shift = rng.normal(0, 0.5), rng.normal(0, 0.4)
        z = rng.normal(size=(n, d))
        groups, g = _group_column(rng, n, rng.dirichlet([3.0] * len(_GROUPS)))
        frame = _features(z, units)
        frame["group"] = groups
        frame["outcome"] = _binary(rng, _LOGIT_SCALE * (z @ w_site_binary) + intercept + group_effect[g], site, seed)
        score = 50 + 10 * (z @ w_site_score + score_shift + group_effect[g]) + rng.normal(0, 5, n)
        frame["score"] = np.where(rng.random(n) < missing, np.nan, score.round(2))
        frames[site] = frame
    return _schema(name, d, tasks, group=True), frames


def site_coefficients(seed: int, n_sites: int = 20) -> tuple[Schema, Rows]:
    """The clinics' regime: each site's label follows its own coefficients.

    ``w_s = w + delta_s`` with ``|delta_s| = |w|`` (a site's direction is about
    45 degrees from the shared one) and a site intercept; a binary task
    (Bernoulli of the sigmoid) and a regression task, linear in the features
    with site coefficients plus noise, whose label is missing on ~30% of rows.
    260-800 rows per site, and a categorical ``group`` with a shared effect.
    """
    return _linear_sites("site-coefficients", seed, n_sites, lambda rng, n: rng.integers(260, 801, n), site_effect=1.0, missing=0.3)


def quantity_skew(seed: int, n_sites: int = 20) -> tuple[Schema, Rows]:
    """Sites from 10 to 10,000 rows (log-uniform; one site of exactly 10 rows and one of 10,000), shared linear
    truth with moderate site effects (``|delta_s| = 0.35 |w|``): a binary and a regression task, and ``group``.

    A 10-row site loads: 2 rows are held out, and 8 training rows clear
    :data:`~fedmeta.data.site.MIN_TRAINING_ROWS` (4); its labels are drawn until
    both classes are among those 8.
    """

    def sizes(rng: np.random.Generator, n: int) -> np.ndarray:
        out = np.exp(rng.uniform(np.log(10), np.log(10_000), n)).astype(int)
        smallest, largest = rng.choice(n, 2, replace=False)
        out[smallest], out[largest] = 10, 10_000
        return out

    return _linear_sites("quantity-skew", seed, n_sites, sizes, site_effect=0.35, missing=0.0)


def linear_shared(seed: int, n_sites: int = 20) -> tuple[Schema, Rows]:
    """Shared linear truth with small site effects (``|delta_s| = 0.15 |w|``) and small sites (40-200 rows):
    where pooling helps most. A binary and a regression task, and ``group``."""
    return _linear_sites("linear-shared", seed, n_sites, lambda rng, n: rng.integers(40, 201, n), site_effect=0.15, missing=0.0)


class _Teacher:
    """A fixed random two-layer tanh network ``tanh(z W1 + b1) W2``, its outputs scaled to unit spread on N(0, I)."""

    def __init__(self, rng: np.random.Generator, d: int, outputs: int, hidden: int = 16):
        self.w1 = rng.normal(0, 1.5 / np.sqrt(d), (d, hidden))
        self.b1 = rng.normal(0, 0.5, hidden)
        self.w2 = rng.normal(0, 1, (hidden, outputs))
        reference = self.hidden(rng.normal(size=(4000, d)), self.w1) @ self.w2
        self.center, self.spread = reference.mean(axis=0), reference.std(axis=0)

    def hidden(self, z: np.ndarray, w1: np.ndarray) -> np.ndarray:
        return np.tanh(z @ w1 + self.b1)

    def __call__(self, z: np.ndarray, w1: np.ndarray | None = None) -> np.ndarray:
        return (self.hidden(z, self.w1 if w1 is None else w1) @ self.w2 - self.center) / self.spread


def covariate_shift(seed: int, n_sites: int = 20) -> tuple[Schema, Rows]:
    """One shared nonlinear labeling function (a random tanh teacher); sites differ only in where their rows lie.

    Each site shifts every latent feature's mean (N(0, 0.8)) and scales its
    spread (log-normal, sd 0.3), and mixes ``group`` its own way; a binary
    and a regression task read the same teacher. 150-1500 rows.
    """
    rng = np.random.default_rng(seed)
    d = _n_features(rng)
    units = _units(rng, d)
    teacher = _Teacher(rng, d, outputs=2)
    group_effect = rng.normal(0, 0.5, len(_GROUPS))
    tasks = [_BINARY, _regression("score", 20.0, 6.0)]
    frames: Rows = {}
    for k, n in enumerate(rng.integers(150, 1501, n_sites)):
        site = _site_name(k)
        z = rng.normal(0, 0.8, d) + np.exp(rng.normal(0, 0.3, d)) * rng.normal(size=(n, d))
        groups, g = _group_column(rng, n, rng.dirichlet([1.0] * len(_GROUPS)))
        out = teacher(z)
        frame = _features(z, units)
        frame["group"] = groups
        frame["outcome"] = _binary(rng, _LOGIT_SCALE * out[:, 0] + group_effect[g], site, seed)
        frame["score"] = (20 + 5 * out[:, 1] + 3 * rng.normal(size=n)).round(2)
        frames[site] = frame
    return _schema("covariate-shift", d, tasks, group=True), frames


def label_shift(seed: int, n_sites: int = 20) -> tuple[Schema, Rows]:
    """Five classes with shared, moderately overlapping Gaussian class-conditionals; each site has its own class
    priors, Dirichlet(0.5). One multiclass task; 100-1000 rows; at least two classes in every site's training rows."""
    rng = np.random.default_rng(seed)
    d = _n_features(rng)
    units = _units(rng, d)
    n_classes = 5
    # Class means about 2.8 apart: about 0.77 accuracy at uniform priors, more where a site's priors are skewed.
    means = rng.normal(size=(n_classes, d))
    means *= 2.0 / np.sqrt(d)
    task = _multiclass("kind", n_classes)
    frames: Rows = {}
    for k, n in enumerate(rng.integers(100, 1001, n_sites)):
        site = _site_name(k)
        priors = np.clip(rng.dirichlet([0.5] * n_classes), 1e-12, None)
        y = _draw_classes(rng, np.tile(priors / priors.sum(), (n, 1)), site, seed, need=2)
        z = means[y] + rng.normal(size=(n, d))
        frame = _features(z, units)
        frame["kind"] = y
        frames[site] = frame
    return _schema("label-shift", d, [task], group=False), frames


def nonlinear_sites(seed: int, n_sites: int = 20) -> tuple[Schema, Rows]:
    """Site-specific nonlinear truth: a shared tanh teacher whose first layer each site perturbs
    (noise 0.6 times the layer's own spread). A binary task and a 4-class task; 200-900 rows."""
    rng = np.random.default_rng(seed)
    d = _n_features(rng)
    units = _units(rng, d)
    n_classes = 4
    teacher = _Teacher(rng, d, outputs=1 + n_classes)
    tasks = [_BINARY, _multiclass("kind", n_classes)]
    frames: Rows = {}
    for k, n in enumerate(rng.integers(200, 901, n_sites)):
        site = _site_name(k)
        w1 = teacher.w1 + rng.normal(0, 0.6 * teacher.w1.std(), teacher.w1.shape)
        z = rng.normal(size=(n, d))
        out = teacher(z, w1)
        frame = _features(z, units)
        frame["outcome"] = _binary(rng, _LOGIT_SCALE * out[:, 0], site, seed)
        frame["kind"] = _draw_classes(rng, _softmax(3.5 * out[:, 1:]), site, seed)
        frames[site] = frame
    return _schema("nonlinear-sites", d, tasks, group=False), frames


FAMILIES: dict[str, Callable[..., tuple[Schema, Rows]]] = {
    "site_coefficients": site_coefficients,
    "covariate_shift": covariate_shift,
    "label_shift": label_shift,
    "quantity_skew": quantity_skew,
    "nonlinear_sites": nonlinear_sites,
    "linear_shared": linear_shared,
}


def family_federation_on_disk(out: Path, family: str, seed: int, n_sites: int = 20) -> Federation:
    """Family ``family`` drawn at ``seed`` as CSV sites under ``out``: every fifth site unseen (4 of 20), split at ``seed``.

    Raises :class:`ValueError` naming an unknown family and listing the known ones.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown federation family {family!r}; known families: {sorted(FAMILIES)}")
    schema, frames = FAMILIES[family](seed, n_sites)
    return federation_on_disk(Path(out), schema, frames, seed, unseen_fraction=0.2, test_fraction=TEST_FRACTION)
