"""Personalization on every labelled training row of a site (``--shots all``), early-stopped on a validation part.

K-shot adaptation is for new sites and rare tasks; a site with hundreds of
labelled rows should use them all. :func:`fit_all_rows` does so in two passes:

1. **Choose.** A fifth of each task's labelled training rows (drawn by the
   seed) is set aside for validation. Adam fine-tunes the base on the other
   rows, minibatches of every task at each step (each head on its task's
   loss, the shared body on their mean), and the validation loss is measured
   every ``check_every`` steps. Training stops after ``patience`` checks
   without improvement, or at ``max_steps``; the step count with the lowest
   validation loss wins, and 0 (the base as it is) is a candidate.
2. **Refit.** Adam fine-tunes the base again on *all* the labelled training
   rows for that many steps.

The held-out (or test) rows are never seen by either pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedmeta.data.site import SiteData
from fedmeta.meta.inner import make_loss
from fedmeta.trained import TrainedModel

ALL_ROWS_LR = 1e-3
VALIDATION_FRACTION = 0.2
MIN_VALIDATION_ROWS = 10


def _rows(site: SiteData, tasks: list[str], rng: np.random.Generator) -> tuple[dict, dict]:
    """Each task's labelled training rows split into fitting and validation rows (tensors)."""
    fit, valid = {}, {}
    for task in tasks:
        x, y = site.split(task, train=True)
        order = rng.permutation(len(y))
        cut = int(round(len(y) * VALIDATION_FRACTION)) if len(y) * VALIDATION_FRACTION >= MIN_VALIDATION_ROWS / 2 else 0
        fit[task] = (torch.from_numpy(x[order[cut:]]), torch.from_numpy(y[order[cut:]]))
        if cut:
            valid[task] = (torch.from_numpy(x[order[:cut]]), torch.from_numpy(y[order[:cut]]))
    return fit, valid


def _train(
    trained: TrainedModel, rows: dict, names: list[str], lr: float, steps: int, seed: int, batch_rows: int,
    validate=None, check_every: int = 10, patience: int = 5, prox: float | None = None,
):
    """Adam on minibatches of every task; with ``validate``, also returns the best step count and the curve it was chosen on.

    With ``prox`` (Ditto's λ), every step is followed by the proximal step of
    ``λ/2 ||θ - θ_base||²``: ``θ <- (θ + lr·λ·θ_base) / (1 + lr·λ)``. Being the
    exact proximal operator it is stable for any λ, and λ -> ∞ keeps the base.
    """
    model = trained.module()
    losses = {t: make_loss(model, t) for t in rows}
    params = {k: v.detach().clone() for k, v in trained.params.items()}
    leaves = {n: params[n].requires_grad_(True) for n in names}
    optimizer = torch.optim.Adam(leaves.values(), lr=lr)
    rng = np.random.default_rng(seed)
    curve = {0: validate(params)} if validate else {}
    best = 0
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        total = 0.0
        for task, (x, y) in rows.items():
            pick = torch.from_numpy(rng.choice(len(y), min(batch_rows, len(y)), replace=False))
            total = total + losses[task](params, x[pick], y[pick], torch.ones(len(pick)))
        (total / len(rows)).backward()
        optimizer.step()
        if prox is not None:
            with torch.no_grad():
                for n, leaf in leaves.items():
                    leaf.add_(trained.params[n], alpha=lr * prox).div_(1 + lr * prox)
        if validate and step % check_every == 0:
            curve[step] = validate(params)
            if curve[step] < curve[best]:
                best = step
            elif step - best >= patience * check_every:
                break
    final = {k: v.detach().clone() for k, v in params.items()}
    return final, best, curve


def fit_all_rows(
    base: TrainedModel, site: SiteData, tasks: list[str], names: list[str], lr: float = ALL_ROWS_LR, seed: int = 0,
    max_steps: int = 1000, check_every: int = 10, patience: int = 5, batch_rows: int = 128, steps: int | None = None,
    prox: float | None = None,
) -> tuple[dict[str, torch.Tensor], int, dict]:
    """The base fine-tuned on every labelled training row of ``tasks`` (parameters ``names``), the step count, and how it was chosen.

    A given ``steps`` skips the choice: that many steps on all the rows.
    ``prox`` (λ) pulls every step back toward the base (Ditto, Li et al. 2021).

    >>> from fedmeta.data import hospital_federation
    >>> site = hospital_federation(n_sites=1)[0]
    >>> base = TrainedModel.initial(site.schema, hidden=(8,))
    >>> params, steps, how = fit_all_rows(base, site, site.tasks, list(base.params), max_steps=40)
    >>> steps in how["curve"], how["validation_rows"] > 0
    (True, True)
    """
    rng = np.random.default_rng(seed)
    fit, valid = _rows(site, tasks, rng)
    all_rows = {t: (torch.from_numpy(x), torch.from_numpy(y)) for t in tasks for x, y in [site.split(t, train=True)]}
    n_rows = sum(len(y) for _, y in all_rows.values())
    if steps is not None:
        params = _train(base, all_rows, names, lr, steps, seed, batch_rows, prox=prox)[0] if steps else {k: v.detach().clone() for k, v in base.params.items()}
        return params, steps, {"note": "steps given", "rows": n_rows}
    if not valid:
        # Too few rows to validate on: a short, fixed fine-tune on all of them.
        steps = min(max_steps, 50)
        params, _, _ = _train(base, all_rows, names, lr, steps, seed, batch_rows, prox=prox)
        return params, steps, {"note": f"too few labelled rows to set {VALIDATION_FRACTION:.0%} aside for validation: {steps} steps", "rows": n_rows}
    model = base.module()

    def validation_loss(params) -> float:
        with torch.no_grad():
            return float(sum(make_loss(model, t)(params, x, y, torch.ones(len(y))) for t, (x, y) in valid.items()) / len(valid))

    _, steps, curve = _train(base, fit, names, lr, max_steps, seed, batch_rows, validation_loss, check_every, patience, prox)
    params = {k: v.detach().clone() for k, v in base.params.items()} if steps == 0 else _train(base, all_rows, names, lr, steps, seed, batch_rows, prox=prox)[0]
    selection = {
        "steps": steps,
        "validation_rows": int(sum(len(y) for _, y in valid.values())),
        "rows": n_rows,
        "lr": lr,
        "curve": {k: round(v, 5) for k, v in curve.items() if k == steps or k % (check_every * 5) == 0 or k == max(curve)},
        "stopped_at": max(curve),
    }
    if not math.isfinite(curve[steps]):
        selection["note"] = "validation loss not finite"
    return params, steps, selection
