"""Held-out scores of one task's predictions: accuracy and AUC, or MSE.

Shared by federated evaluation, site personalization and new heads, so that
every table in fedmeta measures the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.func import functional_call

from fedmeta.models import MultiTaskModel


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank-sum statistic, ties averaged (no scikit-learn import in each site process).

    >>> binary_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def output_scores(out: torch.Tensor | np.ndarray, y: np.ndarray, classification: bool) -> dict[str, float]:
    """Scores of raw head outputs (logits, or scaled values for regression) against labels."""
    out = torch.as_tensor(out)
    if classification:
        prob = torch.softmax(out, -1).numpy()
        scores = {"acc": float((prob.argmax(1) == y).mean())}
        if prob.shape[1] == 2 and len(np.unique(y)) == 2:
            scores["auc"] = binary_auc(y, prob[:, 1])
        return scores
    return {"mse": float(((out.squeeze(-1).numpy() - y) ** 2).mean())}


def task_scores(model: MultiTaskModel, params: Mapping[str, torch.Tensor], task: str, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and AUC (binary) or MSE (regression, in target standard deviations) of one task."""
    with torch.no_grad():
        out = functional_call(model, dict(params), (torch.as_tensor(x),), {"task": task})
    return output_scores(out, y, model.tasks[task].is_classification)


def baseline_scores(y_fit: np.ndarray, y_held_out: np.ndarray, classification: bool) -> dict[str, float]:
    """What a model that ignores the features scores on the held-out rows: the majority class of ``y_fit`` (accuracy), or its mean (MSE).

    A head or personalization score means something only beside this.

    >>> baseline_scores(np.array([0, 1, 1, 1]), np.array([1, 0]), classification=True)
    {'acc': 0.5}
    >>> baseline_scores(np.array([1.0, 3.0]), np.array([2.0, 4.0]), classification=False)
    {'mse': 2.0}
    """
    y_fit, y_held_out = np.asarray(y_fit), np.asarray(y_held_out)
    if not len(y_held_out):
        return {}
    if classification:
        values, counts = np.unique(y_fit if len(y_fit) else y_held_out, return_counts=True)
        return {"acc": float((y_held_out == values[counts.argmax()]).mean())}
    centre = float(y_fit.mean()) if len(y_fit) else float(y_held_out.mean())
    return {"mse": float(((y_held_out - centre) ** 2).mean())}
