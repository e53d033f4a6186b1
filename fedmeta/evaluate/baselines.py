"""Baselines trained in the harness: each site alone, K shots with scikit-learn, and the pooled oracle."""

from __future__ import annotations

import math

import numpy as np
import torch

from fedmeta.data import SiteData
from fedmeta.evaluate.site_scores import model_scores
from fedmeta.personalize import support_sets
from fedmeta.scoring import output_scores
from fedmeta.trained import TrainedModel

def _fit(
    trained: TrainedModel, batches: list[tuple[str, np.ndarray, np.ndarray]], steps: int, lr: float, seed: int, batch_rows: int = 256, check_every: int = 50
) -> dict[str, torch.Tensor]:
    """Adam on minibatches of every task in turn, early-stopped on a fifth of the rows held back for validation.

    Without early stopping the pooled oracle overfits: 1500 steps scored 0.759 mean site accuracy where 500
    scored 0.789 on 8 hospitals. Every baseline gets the same treatment.
    """
    from fedmeta.meta.inner import make_loss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = trained.module().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    losses = {t: make_loss(model, t) for t, _, _ in batches}
    fit, valid = [], []
    for task, x, y in batches:
        order = rng.permutation(len(y))
        cut = max(1, len(y) // 5) if len(y) >= 10 else 0
        fit.append((task, x[order[cut:]], y[order[cut:]]))
        if cut:
            valid.append((task, torch.from_numpy(x[order[:cut]]), torch.from_numpy(y[order[:cut]])))
    params = dict(model.named_parameters())

    def validation_loss() -> float:
        with torch.no_grad():
            return sum(float(losses[t](params, x, y, torch.ones(len(y)))) for t, x, y in valid)

    best, best_loss = {k: v.detach().clone() for k, v in params.items()}, validation_loss() if valid else math.inf
    for step in range(1, steps + 1):
        task, x, y = fit[step % len(fit)]
        rows = rng.choice(len(y), min(batch_rows, len(y)), replace=False)
        optimizer.zero_grad()
        losses[task](params, torch.from_numpy(x[rows]), torch.from_numpy(y[rows]), torch.ones(len(rows))).backward()
        optimizer.step()
        if valid and step % check_every == 0:
            current = validation_loss()
            if current < best_loss:
                best, best_loss = {k: v.detach().clone() for k, v in params.items()}, current
    return best if valid else {k: v.detach().clone() for k, v in params.items()}


def local_only(site: SiteData, hidden: tuple[int, ...], seed: int = 0) -> dict[str, dict[str, float]]:
    """The site alone: the same network from scratch, its steps chosen on a validation fifth, then refit on *all* its training rows."""
    from fedmeta.personalize.candidates import fit_local

    trained = fit_local(TrainedModel.initial(site.schema, hidden, seed), site, site.tasks, seed)
    return model_scores(trained, trained.params, site)


def local_only_k(site: SiteData, shots: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Logistic (or ridge) regression on the very support rows K-shot personalization uses."""
    from sklearn.linear_model import LogisticRegression, Ridge

    scores = {}
    supports = support_sets(site, site.tasks, shots, seed)
    for task, (x, y, w) in ((t, s) for t, s in supports.items() if t in site.scored_tasks):
        keep = w.numpy() > 0
        x, y, w = x.numpy()[keep], y.numpy()[keep], w.numpy()[keep]
        x_test, y_test = site.split(task, train=False)
        spec = site.schema.task(task)
        if not spec.is_classification:
            scores[task] = output_scores(Ridge(alpha=1.0).fit(x, y, sample_weight=w).predict(x_test).astype(np.float32)[:, None], y_test, False)
            continue
        if len(np.unique(y)) < 2:
            logits = np.full((len(x_test), spec.n_classes), -30.0, np.float32)
            logits[:, int(y[0])] = 0.0
        else:
            clf = LogisticRegression(max_iter=1000).fit(x, y, sample_weight=w)
            logits = np.full((len(x_test), spec.n_classes), -30.0, np.float32)
            logits[:, clf.classes_] = clf.predict_log_proba(x_test)
        scores[task] = output_scores(logits, y_test, True)
    return scores


def pooled(sites: list[SiteData], hidden: tuple[int, ...], steps: int = 1500, lr: float = 3e-3, seed: int = 0) -> TrainedModel:
    """The centralized oracle: one network on every training site's rows."""
    schema = sites[0].schema
    batches = []
    for task in [t.name for t in schema.tasks]:
        parts = [s.split(task, train=True) for s in sites if task in s.tasks]
        if parts:
            batches.append((task, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    trained = TrainedModel.initial(schema, hidden, seed)
    return TrainedModel(schema, hidden, {"params": _fit(trained, batches, steps, lr, seed)})


class _Shape:
    """The pooled oracle's network: the schema's features plus one indicator column per training site."""

    def __init__(self, schema, hidden: tuple[int, ...], n_sites: int, seed: int):
        from fedmeta.models import MultiTaskModel

        torch.manual_seed(seed)
        self.model = MultiTaskModel.mlp(schema.encoded_dim + n_sites, schema.task_specs, hidden)

    def module(self):
        return self.model


def pooled_oracle(sites: list[SiteData], hidden: tuple[int, ...], steps: int = 1500, lr: float = 3e-3, seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """The fair centralized oracle: one network on every training site's rows, told which site each row is from.

    A one-hot site indicator is appended to the features, so the pooled
    network can learn site-specific offsets as personalization does. Returns
    each site's held-out scores.
    """
    from torch.func import functional_call

    from fedmeta.scoring import output_scores

    schema, n = sites[0].schema, len(sites)

    def with_site(x: np.ndarray, i: int) -> np.ndarray:
        flag = np.zeros((len(x), n), np.float32)
        flag[:, i] = 1.0
        return np.concatenate([x, flag], 1)

    batches = []
    for task in [t.name for t in schema.tasks]:
        parts = [(with_site(*s.split(task, train=True)[:1], i), s.split(task, train=True)[1]) for i, s in enumerate(sites) if task in s.tasks]
        if parts:
            batches.append((task, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    shape = _Shape(schema, hidden, n, seed)
    params = _fit(shape, batches, steps, lr, seed)
    out = {}
    for i, site in enumerate(sites):
        scores = {}
        for task in site.scored_tasks:
            x, y = site.split(task, train=False)
            with torch.no_grad():
                logits = functional_call(shape.model, params, (torch.from_numpy(with_site(x, i)),), {"task": task})
            scores[task] = output_scores(logits, y, schema.task(task).is_classification)
        out[site.name] = scores
    return out
