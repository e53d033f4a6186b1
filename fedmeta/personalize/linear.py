"""Cross-validated linear heads fitted with scikit-learn, carried in the base's own network form.

On small tabular data a site's own regularized logistic (or ridge) regression
is a strong model: the bar a federation must clear. Two candidates give the
default choice that bar and a way past it:

- ``linear``: logistic (or ridge) regression on the site's encoded features
  alone, its regularization chosen by cross-validation on the rows it is
  given: what the site would build alone with standard tools.
- ``wide``: the same regression on the base body's last-layer features and
  the encoded features side by side (wide & deep, Cheng et al. 2016): the
  federation's representation where it helps, a linear path where the site's
  own effects differ from the federation's.

Both become one MLP, so they export and serve like every other candidate:
the base's body beside an identity path. The first layer adds ``ReLU(x)``
and ``ReLU(-x)``; later layers carry them unchanged (ReLU of a non-negative
value is itself); a head reads ``x = ReLU(x) - ReLU(-x)`` exactly. Tasks the
site does not fit keep the base's head, and the widened body computes the
base's features bit for bit, so those tasks predict as the base does.

Features are standardized on the rows fitted (the scaling folded back into
the weights), as a scikit-learn pipeline would: the penalty then weighs every
feature alike, whatever the scale of the body's units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmeta.data.site import SiteData
from fedmeta.models import TaskSpec
from fedmeta.trained import TrainedModel

#: Inverse penalties of the logistic regression's cross-validation (on standardized features).
C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 6))
#: Penalties of the ridge regression (leave-one-out, on standardized features, targets in standard deviations).
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 7))
CV_FOLDS = 5
#: The logit of a class the site's rows never show: about e^-30 of the probability.
ABSENT_LOGIT = -30.0


@dataclass
class LinearHead:
    """A task's linear map from features to outputs (logits, or the standardized target), and the penalty chosen."""

    weight: np.ndarray  # (outputs, features)
    bias: np.ndarray  # (outputs,)
    penalty: float | None = None


def fit_linear_head(z: np.ndarray, y: np.ndarray, spec: TaskSpec, seed: int) -> LinearHead:
    """Logistic regression (penalty by stratified ``CV_FOLDS``-fold log-loss) or ridge regression (leave-one-out) of ``y`` on ``z``.

    A class the rows never show gets :data:`ABSENT_LOGIT`; rows of one class only give that class, whatever the features.

    >>> from fedmeta.models import TaskSpec
    >>> z = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
    >>> head = fit_linear_head(z, (z[:, 0] > 0).astype(int), TaskSpec(name="t", kind="binary"), 0)
    >>> head.weight.shape, bool(head.weight[1, 0] > head.weight[0, 0])
    ((2, 3), True)
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
    from sklearn.model_selection import StratifiedKFold

    z = np.asarray(z, np.float64)
    mean = z.mean(0)
    scale = z.std(0)
    scale[scale < 1e-12] = 1.0
    zs = (z - mean) / scale
    if not spec.is_classification:
        model = RidgeCV(alphas=RIDGE_ALPHAS).fit(zs, y)
        coef, intercept, penalty = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_), float(model.alpha_)
    else:
        classes, counts = np.unique(y, return_counts=True)
        coef = np.zeros((spec.out_features, z.shape[1]))
        intercept = np.full(spec.out_features, ABSENT_LOGIT)
        penalty = None
        if len(classes) == 1:
            intercept[int(classes[0])] = 0.0
        else:
            folds = min(CV_FOLDS, int(counts.min()))
            if folds >= 2:
                cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
                model = LogisticRegressionCV(
                    Cs=list(C_GRID), cv=cv, scoring="neg_log_loss", max_iter=2000, l1_ratios=(0,), use_legacy_attributes=False
                ).fit(zs, y)
                penalty = float(np.atleast_1d(model.C_)[0])
            else:
                model = LogisticRegression(max_iter=2000).fit(zs, y)
            present = model.classes_.astype(int)
            if len(present) == 2:  # one logit z for the second class: softmax([0, z]) is its sigmoid
                coef[present[1]], intercept[present[0]], intercept[present[1]] = model.coef_[0], 0.0, model.intercept_[0]
            else:
                coef[present], intercept[present] = model.coef_, model.intercept_
    weight = coef / scale
    return LinearHead(weight.astype(np.float32), (intercept - weight @ mean).astype(np.float32), penalty)


def body_features(base: TrainedModel, x: np.ndarray) -> np.ndarray:
    """The base body's last-layer features of rows ``x``."""
    with torch.no_grad():
        return base.module().body(torch.as_tensor(x, dtype=torch.float32)).numpy()


def fit_linear_heads(base: TrainedModel, site: SiteData, tasks: list[str], seed: int, deep: bool) -> dict[str, LinearHead]:
    """Each task's linear head on ``site``'s labelled training rows: on the encoded features, and with ``deep`` the base body's features before them."""
    heads = {}
    for task in tasks:
        x, y = site.split(task, train=True)
        z = np.concatenate([body_features(base, x), x], 1) if deep else x
        heads[task] = fit_linear_head(z, y, site.schema.task(task), seed)
    return heads


def widened(base: TrainedModel, heads: dict[str, LinearHead], how: str) -> TrainedModel:
    """The base's MLP with an identity path beside its body, and ``heads`` reading it (or the body's features too).

    A head with as many weights per output as the encoded features reads the
    identity path only; one with the body's width more reads both, body first.
    Every other task keeps the base's head.

    >>> from fedmeta.data import hospital_schema
    >>> base = TrainedModel.initial(hospital_schema(), (8, 8))
    >>> widened(base, {}, "linear").hidden == (8 + 2 * base.schema.encoded_dim,) * 2
    True
    """
    d, last = base.schema.encoded_dim, base.hidden[-1]
    identity = torch.eye(2 * d)
    params = {}
    for i in range(len(base.hidden)):
        w, b = base.params[f"body.net.{2 * i}.weight"], base.params[f"body.net.{2 * i}.bias"]
        params[f"body.net.{2 * i}.weight"] = torch.cat([w, torch.eye(d), -torch.eye(d)], 0) if i == 0 else torch.block_diag(w, identity)
        params[f"body.net.{2 * i}.bias"] = torch.cat([b, torch.zeros(2 * d)])
    for task in base.tasks:
        w, b = base.params[f"heads.{task}.weight"], base.params[f"heads.{task}.bias"]
        if task not in heads:
            params[f"heads.{task}.weight"] = torch.cat([w, torch.zeros(w.shape[0], 2 * d)], 1)
            params[f"heads.{task}.bias"] = b.clone()
            continue
        head = torch.from_numpy(heads[task].weight)
        if head.shape[1] not in (d, last + d):
            raise ValueError(f"task {task!r}: a linear head reads {d} or {last + d} features, got {head.shape[1]}")
        deep, wide = (head[:, :last], head[:, last:]) if head.shape[1] == last + d else (torch.zeros(w.shape[0], last), head)
        params[f"heads.{task}.weight"] = torch.cat([deep, wide, -wide], 1)
        params[f"heads.{task}.bias"] = torch.from_numpy(heads[task].bias)
    hidden = tuple(h + 2 * d for h in base.hidden)
    penalties = {t: h.penalty for t, h in heads.items()}
    return TrainedModel(base.schema, hidden, {"params": params}, {**base.info, "adaptation": how, "penalties": penalties})
