"""K-shot personalization: fine-tune the global base on a few rows per task of a site, score both on its held-out rows.

It adapts with the engine's inner step (:func:`fedmeta.meta.inner.sgd_update`),
as the base was meta-trained to be adapted: all layers, the heads only, or
with Meta-SGD's learned rates. All of the site's tasks adapt together, since
they share the body: each head follows its own task's gradient, the body the
mean of the tasks'. ``shots="all"`` hands over to
:mod:`fedmeta.personalize.all_rows` (every labelled training row, early stopping).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedmeta.data.site import MIN_TRAINING_ROWS, SiteData
from fedmeta.meta.inner import make_loss, sgd_update
from fedmeta.models import head_prefix, is_body_param
from fedmeta.personalize.all_rows import ALL_ROWS_LR, fit_all_rows
from fedmeta.personalize.base import PersonalizationError, check_normalization
from fedmeta.scoring import task_scores
from fedmeta.trained import TrainedModel

Mode = Literal["all", "head", "metasgd"]
MODES = ("all", "head", "metasgd")


@dataclass
class Personalization:
    """A personalized model and its held-out scores: ``<task>.base.<metric>`` and ``<task>.personalized.<metric>``."""

    model: TrainedModel
    metrics: dict[str, float]
    tasks: list[str]
    shots: int | str  # K, or "all"
    steps: int
    lr: float
    mode: str
    seed: int
    seconds: float
    steps_selection: dict | None = None


def check_shots(site: SiteData, task: str, shots: int) -> None:
    """Refuse K larger than the site's labelled training rows of ``task`` can supply."""
    spec = site.schema.task(task)
    have = site.n_labelled(task, train=True)
    need = shots * spec.n_classes if spec.is_classification else shots
    if have < need:
        per = f"K={shots} shots per class x {spec.n_classes} classes" if spec.is_classification else f"K={shots} shots"
        raise PersonalizationError(f"site {site.name!r}, task {task!r}: {per} need {need} labelled training rows, the site has {have}; lower --shots")


def support_sets(site: SiteData, tasks: list[str], shots: int, seed: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """The K-shot support rows ``(x, y, w)`` per task that :func:`personalize` draws for this seed."""
    return {t: pair[0] for t, pair in _support_and_rest(site, tasks, shots, seed).items()}


def _support_and_rest(site: SiteData, tasks: list[str], shots: int, seed: int) -> dict[str, tuple[tuple, tuple]]:
    rng = np.random.default_rng(seed)
    return {t: site.sampler(t, shots, query_size=1, seed=rng).support_and_rest() for t in tasks}


def _fine_tune(
    trained: TrainedModel, supports: dict[str, tuple[torch.Tensor, ...]], names: list[str], steps: int, lr, checkpoints: tuple[int, ...] = ()
) -> dict[str, torch.Tensor] | dict[int, dict[str, torch.Tensor]]:
    """``steps`` full-batch SGD steps on the summed support losses; the body's gradient is averaged over tasks.

    With ``checkpoints``, returns the parameters after each of those step counts instead.
    """
    model = trained.module()
    losses = {t: make_loss(model, t) for t in supports}
    params = {k: v.detach().clone() for k, v in trained.params.items()}
    saved = {0: params} if 0 in checkpoints else {}
    for step in range(1, steps + 1):
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        current = {**params, **leaves}
        total = sum(losses[t](current, *support) for t, support in supports.items())
        grads = torch.autograd.grad(total, [leaves[n] for n in names], allow_unused=True)
        update = {n: (g if g is not None else torch.zeros_like(leaves[n])) / (len(supports) if is_body_param(n) else 1) for n, g in zip(names, grads)}
        params = {k: v.detach() for k, v in sgd_update(params, update, lr).items()}
        if step in checkpoints:
            saved[step] = params
    return saved if checkpoints else params


AUTO_STEPS = (5, 10, 20, 40)


def _choose_steps(trained: TrainedModel, checkpoints: dict[int, dict[str, torch.Tensor]], rest: dict[str, tuple]) -> tuple[int, dict]:
    """The step count whose parameters have the lowest loss on the site's training rows outside the support."""
    model = trained.module()
    with torch.no_grad():
        scored = {
            steps: sum(float(make_loss(model, t)(params, *rows)) for t, rows in rest.items() if len(rows[1]))
            for steps, params in checkpoints.items()
        }
    best = min(scored, key=scored.get)
    return best, {"candidates": {str(k): round(v, 5) for k, v in scored.items()}, "rows": int(sum(len(r[1]) for r in rest.values()))}


def _support_loss(trained: TrainedModel, params: dict[str, torch.Tensor], supports: dict[str, tuple[torch.Tensor, ...]]) -> float:
    model = trained.module()
    with torch.no_grad():
        return float(sum(make_loss(model, t)(params, *support) for t, support in supports.items()))


def _check_converged(base: TrainedModel, params: dict[str, torch.Tensor], supports, lr: float | None) -> None:
    """Refuse a fine-tune that blew up (too high a rate) rather than publish garbage."""
    before, after = _support_loss(base, base.params, supports), _support_loss(base, params, supports)
    if not np.isfinite(after) or after > 10 * max(before, 1e-6):
        hint = f"lower --lr (now {lr:g}) or --steps" if lr is not None else "the learned Meta-SGD rates do not suit these steps; lower --steps"
        raise PersonalizationError(f"fine-tuning diverged: support loss went from {before:.4g} to {after:.4g}; {hint}")


def personalize(
    base: TrainedModel,
    site: SiteData,
    shots: int | Literal["all"] = 5,
    steps: int | str = 5,
    lr: float | None = None,
    mode: Mode = "all",
    seed: int = 0,
) -> Personalization:
    """Fine-tune ``base`` on K shots per task of the site's training rows; score both on its held-out rows.

    ``lr`` defaults to 0.05 for the K-shot SGD steps. ``shots="all"`` fine-tunes
    on every labelled training row instead, with Adam at ``lr`` (default 0.001), and with ``steps="auto"`` chooses the
    step count and stops early on a validation fifth of those rows
    (:func:`fedmeta.personalize.all_rows.fit_all_rows`).

    ``mode``: ``"all"`` adapts every layer, ``"head"`` the task heads only,
    ``"metasgd"`` every layer with the per-parameter rates a Meta-SGD base
    learned (``lr`` is then unused).

    ``steps="auto"`` fine-tunes on the same K shots but chooses how long
    (5, 10, 20 or 40 steps) by the loss on the site's other labelled training
    rows, never its held-out rows; with no other rows it uses 5.

    >>> from fedmeta.data import hospital_federation
    >>> site = hospital_federation(n_sites=1)[0]
    >>> result = personalize(TrainedModel.initial(site.schema, hidden=(16,)), site, shots=5, steps=3)
    >>> sorted(result.metrics)[:2]
    ['length_of_stay.base.mse', 'length_of_stay.personalized.mse']
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise PersonalizationError(f"mode must be one of {list(MODES)}, got {mode!r}")
    auto = steps == "auto"
    if not auto and (not isinstance(steps, int) or steps < 0):
        raise PersonalizationError(f"steps must be a number >= 0 or 'auto', got {steps!r}")
    every_row = shots == "all"
    lr = lr if lr is not None else (ALL_ROWS_LR if every_row else 0.05)
    if not every_row and (not isinstance(shots, int) or shots < 1) or not lr > 0:
        raise PersonalizationError(f"need shots >= 1 (or 'all') and lr > 0; got shots={shots!r}, lr={lr}")
    if every_row and mode == "metasgd":
        raise PersonalizationError("mode 'metasgd' adapts with the rates learned for K-shot steps; with shots 'all' use mode 'all' or 'head'")
    check_normalization(base, site)
    tasks = [t for t in site.tasks if t in base.tasks]
    if not tasks:
        raise PersonalizationError(
            f"site {site.name!r} has no task with enough labelled rows to personalize "
            f"(each needs >= {MIN_TRAINING_ROWS} labelled training rows; model tasks: {base.tasks})"
        )
    if not every_row:
        for t in tasks:
            check_shots(site, t, shots)
    rate: float | dict[str, torch.Tensor] = lr
    if mode == "metasgd":
        if "inner_lrs" not in base.state:
            raise PersonalizationError("mode 'metasgd' needs a base model meta-trained with algorithm metasgd (it has no learned rates)")
        rate = base.state["inner_lrs"]
    heads = [k for k in base.params if any(k.startswith(head_prefix(t)) for t in tasks)]
    names = heads if mode == "head" else [k for k in base.params if is_body_param(k)] + heads
    selection = None
    if every_row:
        params, steps, selection = fit_all_rows(base, site, tasks, names, lr, seed, steps=None if auto else steps)
        if not all(torch.isfinite(v).all() for v in params.values()):
            raise PersonalizationError(f"fine-tuning diverged on all rows (non-finite weights); lower --lr (now {lr:g})")
        return _scored(base, site, tasks, params, shots, steps, lr, mode, seed, start, selection)
    drawn = _support_and_rest(site, tasks, shots, seed)
    supports = {t: pair[0] for t, pair in drawn.items()}
    if auto:
        rest = {t: pair[1] for t, pair in drawn.items()}
        if any(len(rows[1]) for rows in rest.values()):
            checkpoints = _fine_tune(base, supports, names, max(AUTO_STEPS), rate, checkpoints=AUTO_STEPS)
            steps, selection = _choose_steps(base, checkpoints, rest)
            params = checkpoints[steps]
        else:
            steps, selection = AUTO_STEPS[0], {"note": "no training rows outside the support: default steps"}
            params = _fine_tune(base, supports, names, steps, rate)
    else:
        params = _fine_tune(base, supports, names, steps, rate)
    _check_converged(base, params, supports, lr if mode != "metasgd" else None)
    return _scored(base, site, tasks, params, shots, steps, lr, mode, seed, start, selection)


def _scored(base: TrainedModel, site: SiteData, tasks: list[str], params, shots, steps: int, lr: float, mode: str, seed: int, start: float, selection) -> Personalization:
    """The personalized model, with base and personalized scores on the same held-out (or test) rows."""
    personalized = TrainedModel(base.schema, base.hidden, {**base.state, "params": params}, dict(base.info))
    model = base.module()
    metrics: dict[str, float] = {}
    for t in (t for t in tasks if t in site.scored_tasks):
        x_test, y_test = site.split(t, train=False)
        for label, p in (("base", base.params), ("personalized", params)):
            for name, value in task_scores(model, p, t, x_test, y_test).items():
                metrics[f"{t}.{label}.{name}"] = value
    result = Personalization(personalized, metrics, tasks, shots, steps, float(lr), mode, seed, time.perf_counter() - start)
    result.steps_selection = selection
    return result
