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

Several fine-tunes of the same rows train as one batch (:func:`fit_all_rows_batch`):
a :class:`Run` is a start, the parameters it trains, a rate and a proximal
pull; runs share every minibatch (the same seed draws the same rows), their
parameters are stacked on a leading axis, and one batched forward and
backward pass serves them all (:meth:`~fedmeta.meta.inner.TaskLoss.batched`).
Each run is still its own Adam fine-tune with its own early stopping: the
result equals running them one by one, in a fraction of the time
(``tests/test_personalize_choice.py`` checks it against ``torch.optim.Adam``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmeta.data.site import SiteData
from fedmeta.meta.inner import make_loss
from fedmeta.models import MultiTaskModel
from fedmeta.trained import TrainedModel

ALL_ROWS_LR = 1e-3
VALIDATION_FRACTION = 0.2
MIN_VALIDATION_ROWS = 10
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults

Params = dict[str, torch.Tensor]
Rows = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Run:
    """One Adam fine-tune: its start, the parameters it trains (the others stay bit for bit), its rate and Ditto's λ.

    With ``prox`` (λ > 0) every step is followed by the proximal step of
    ``λ/2 ||θ - θ_start||²``: ``θ <- (θ + lr·λ·θ_start) / (1 + lr·λ)``. Being
    the exact proximal operator it is stable for any λ, and λ -> ∞ keeps the start.
    """

    start: Params
    names: tuple[str, ...]
    lr: float
    prox: float = 0.0


def _rows(site: SiteData, tasks: list[str], rng: np.random.Generator) -> tuple[Rows, Rows]:
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


class _Batch:
    """The runs' parameters stacked on a leading axis, with Adam's moments, masks, rates and pulls broadcast to match."""

    def __init__(self, model: MultiTaskModel, runs: Sequence[Run]):
        keys = list(runs[0].start)
        if any(list(r.start) != keys for r in runs):
            raise ValueError("runs trained as one batch need the same parameter names")
        self.model, self.n, self.keys = model, len(runs), keys
        self.start = {k: torch.stack([r.start[k].detach() for r in runs]) for k in keys}
        self.params = {k: v.clone() for k, v in self.start.items()}
        self.trained = [k for k in keys if any(k in r.names for r in runs)]

        def per_run(values, like):
            return torch.tensor(values, dtype=like.dtype).view(-1, *[1] * (like.dim() - 1))

        self.mask = {k: per_run([float(k in r.names) for r in runs], self.start[k]) for k in self.trained}
        self.lr = {k: per_run([r.lr for r in runs], self.start[k]) for k in self.trained}
        pull = [r.lr * r.prox for r in runs]
        self.pull = {k: per_run(pull, self.start[k]) for k in self.trained} if any(pull) else None
        self.moments = {k: (torch.zeros_like(self.start[k]), torch.zeros_like(self.start[k])) for k in self.trained}
        self.step_count = 0
        self.losses = {}

    def loss(self, task: str, x: torch.Tensor, y: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """One loss per run on the same rows: the rows are broadcast over the runs' axis, not copied."""
        if task not in self.losses:
            self.losses[task] = make_loss(self.model, task)
        x, y = x.expand(self.n, *x.shape), y.expand(self.n, *y.shape)
        return self.losses[task].batched(params or self.params, x, y, torch.ones(self.n, y.shape[1]), batched=self.keys)

    def step(self, batch: Rows) -> None:
        """One Adam step of every run on the same minibatch (each head on its task's loss, the body on their mean)."""
        leaves = {k: self.params[k].requires_grad_(True) for k in self.trained}
        total = sum(self.loss(t, x, y) for t, (x, y) in batch.items()) / len(batch)
        grads = torch.autograd.grad(total.sum(), list(leaves.values()), allow_unused=True)
        self.step_count += 1
        beta1, beta2 = BETAS
        correction1, correction2 = 1 - beta1**self.step_count, math.sqrt(1 - beta2**self.step_count)
        with torch.no_grad():
            for k, g in zip(leaves, grads):
                p = self.params[k] = leaves[k].detach()
                if g is None:
                    continue
                g = g * self.mask[k]  # a run's untrained parameters see no gradient, so Adam leaves them exactly as they were
                m, v = self.moments[k]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.sub_(m / (v.sqrt() / correction2 + EPS) * (self.lr[k] / correction1))
                if self.pull is not None:
                    p.add_(self.start[k] * self.pull[k] * self.mask[k]).div_(1 + self.pull[k] * self.mask[k])

    def run_params(self, i: int) -> Params:
        return {k: v[i].detach().clone() for k, v in self.params.items()}


def _minibatches(rows: Rows, batch_rows: int, seed: int):
    """The same minibatch sequence for every run of the seed: each task's rows drawn without replacement per step."""
    rng = np.random.default_rng(seed)
    while True:
        batch = {}
        for task, (x, y) in rows.items():
            pick = torch.from_numpy(rng.choice(len(y), min(batch_rows, len(y)), replace=False))
            batch[task] = (x[pick], y[pick])
        yield batch


def train_runs(model: MultiTaskModel, runs: Sequence[Run], rows: Rows, steps: Sequence[int], seed: int, batch_rows: int = 128) -> list[Params]:
    """Each run's parameters after its own number of Adam steps on ``rows`` (0 steps: its start)."""
    batch = _Batch(model, runs)
    out: list[Params | None] = [batch.run_params(i) if s == 0 else None for i, s in enumerate(steps)]
    minibatches = _minibatches(rows, batch_rows, seed)
    for step in range(1, max(steps, default=0) + 1):
        batch.step(next(minibatches))
        for i, s in enumerate(steps):
            if s == step:
                out[i] = batch.run_params(i)
    return out


def choose_steps(
    model: MultiTaskModel, runs: Sequence[Run], fit: Rows, valid: Rows, max_steps: int, seed: int,
    batch_rows: int = 128, check_every: int = 10, patience: int = 5,
) -> list[tuple[int, dict[int, float]]]:
    """Per run, the step count with the lowest validation loss and the curve it was chosen on.

    A run stops after ``patience`` checks without improvement (the others go
    on); its curve ends there, as if it had trained alone.
    """
    batch = _Batch(model, runs)

    def validation_losses() -> list[float]:
        with torch.no_grad():
            losses = sum(batch.loss(t, x, y) for t, (x, y) in valid.items()) / len(valid)
        return [float(v) for v in losses]

    curves = [{0: v} for v in validation_losses()]
    best, active = [0] * len(runs), [True] * len(runs)
    minibatches = _minibatches(fit, batch_rows, seed)
    for step in range(1, max_steps + 1):
        batch.step(next(minibatches))
        if step % check_every:
            continue
        for i, loss in enumerate(validation_losses()):
            if not active[i]:
                continue
            curves[i][step] = loss
            if loss < curves[i][best[i]]:
                best[i] = step
            elif step - best[i] >= patience * check_every:
                active[i] = False
        if not any(active):
            break
    return list(zip(best, curves))


def fit_all_rows_batch(
    model: MultiTaskModel, runs: Sequence[Run], site: SiteData, tasks: list[str], seed: int = 0,
    max_steps: int = 1000, check_every: int = 10, patience: int = 5, batch_rows: int = 128,
    steps: Sequence[int | None] | None = None, at_least: int = 0,
) -> list[tuple[Params, int, dict]]:
    """:func:`fit_all_rows` for several runs on the same rows at once; per run (parameters, step count, how it was chosen).

    A run's given step count (``steps[i]``) skips its choice: that many steps on all the rows.
    A chosen step count is raised to ``at_least`` when it is lower.
    """
    steps = list(steps) if steps is not None else [None] * len(runs)
    rng = np.random.default_rng(seed)
    fit, valid = _rows(site, tasks, rng)
    all_rows = {t: (torch.from_numpy(x), torch.from_numpy(y)) for t in tasks for x, y in [site.split(t, train=True)]}
    n_rows = sum(len(y) for _, y in all_rows.values())
    how: list[dict] = [{"note": "steps given", "rows": n_rows} if s is not None else {} for s in steps]
    choose = [i for i, s in enumerate(steps) if s is None]
    if choose and not valid:
        # Too few rows to validate on: a short, fixed fine-tune on all of them.
        for i in choose:
            steps[i] = max(min(max_steps, 50), at_least)
            how[i] = {"note": f"too few labelled rows to set {VALIDATION_FRACTION:.0%} aside for validation: {steps[i]} steps", "rows": n_rows}
    elif choose:
        chosen = choose_steps(model, [runs[i] for i in choose], fit, valid, max_steps, seed, batch_rows, check_every, patience)
        n_valid = int(sum(len(y) for _, y in valid.values()))
        for i, (best, curve) in zip(choose, chosen):
            steps[i] = max(best, at_least)
            how[i] = {
                "steps": best, "validation_rows": n_valid, "rows": n_rows, "lr": runs[i].lr,
                "curve": {k: round(v, 5) for k, v in curve.items() if k == best or k % (check_every * 5) == 0 or k == max(curve)},
                "stopped_at": max(curve), "max_steps": max_steps,
                # Patience ran out (the validation loss stopped improving), or the cap cut the run short: a reader needs to know which.
                "early_stopped": max(curve) - best >= patience * check_every,
            }
            if not math.isfinite(curve[best]):
                how[i]["note"] = "validation loss not finite"
    params = train_runs(model, runs, all_rows, steps, seed, batch_rows)
    return list(zip(params, steps, how))


def stopping_note(how: dict) -> str:
    """How a chosen step count's run ended: early-stopped by the validation loss, or at the step cap (still improving)."""
    if "early_stopped" not in how:
        return how.get("note", "steps given")
    if how["early_stopped"]:
        return f"early-stopped on a validation fifth at step {how['stopped_at']}, best at step {how['steps']}"
    return f"stopped at the cap of {how['max_steps']} steps, the validation loss not yet done improving; best at step {how['steps']}"


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
    run = Run(base.params, tuple(names), lr, prox or 0.0)
    return fit_all_rows_batch(base.module(), [run], site, tasks, seed, max_steps, check_every, patience, batch_rows, [steps])[0]

