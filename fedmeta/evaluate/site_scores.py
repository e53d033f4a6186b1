"""Per-site scores and their aggregation: accuracy per site (mean over its classification tasks), the worst tenth of sites."""

from __future__ import annotations

import math

import numpy as np

from fedmeta.data import SiteData
from fedmeta.scoring import task_scores
from fedmeta.trained import TrainedModel

def shots_for(site: SiteData, shots: int) -> int:
    """K, lowered for a site whose training rows cannot supply K per class (small sites of a label-skewed split)."""
    fits = [site.n_labelled(t, train=True) // (site.schema.task(t).n_classes or 1) for t in site.tasks]
    return max(1, min([shots, *fits]))


def site_summary(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """One site's accuracy and AUC (means over its classification tasks) and regression MSE."""
    accs = [s["acc"] for s in scores.values() if "acc" in s]
    aucs = [s["auc"] for s in scores.values() if "auc" in s]
    mses = [s["mse"] for s in scores.values() if "mse" in s]
    out = {}
    if accs:
        out["acc"] = float(np.mean(accs))
    if aucs:
        out["auc"] = float(np.mean(aucs))
    if mses:
        out["mse"] = float(np.mean(mses))
    return out


def model_scores(trained: TrainedModel, params, site: SiteData) -> dict[str, dict[str, float]]:
    model = trained.module()
    return {t: task_scores(model, params, t, *site.split(t, train=False)) for t in site.scored_tasks if t in trained.tasks}


def aggregate(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over sites, and the mean of the worst tenth of sites by accuracy."""
    out = {}
    for metric in ("acc", "auc", "mse"):
        values = [s[metric] for s in per_site.values() if metric in s]
        if values:
            out[metric] = float(np.mean(values))
    accs = sorted(s["acc"] for s in per_site.values() if "acc" in s)
    if accs:
        out["worst10_acc"] = float(np.mean(accs[: max(1, math.ceil(len(accs) / 10))]))
    return out
