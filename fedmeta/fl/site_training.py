"""What a site does in a round, free of Flower: local meta-training and evaluation.

:func:`local_update` runs ``local.steps`` meta-updates on the site's own
episodes (tasks in turn) and returns an update the server treats as a
gradient: the mean meta-gradient along the local path for the MAML family,
the negated parameter change for Reptile and for the FedAvg baseline (plain
minibatch SGD). With one local step the MAML-family update is exactly the
meta-gradient. A run whose loss or update is not finite (a noisy model can
make a step overshoot) restarts from the received model with half the step,
at most :data:`MAX_RESTARTS` times; the metrics count the restarts.

:func:`evaluate_site` scores the global model on the site's held-out rows as
is and after K-shot adaptation on support rows from its training split.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch

from fedmeta.data import SiteData
from fedmeta.fl.aggregation import FlatState, flatten_state, unflatten_state
from fedmeta.fl.config import RunConfig
from fedmeta.fl.privacy import clip_update
from fedmeta.meta import MetaAlgorithm, make_algorithm
from fedmeta.meta.inner import make_loss, sgd_update
from fedmeta.models import MultiTaskModel, task_params
from fedmeta.scoring import task_scores


def build_model(config: RunConfig, site: SiteData) -> MultiTaskModel:
    return MultiTaskModel.mlp(site.schema.encoded_dim, site.schema.task_specs, hidden=tuple(config.model.hidden))


def build_algorithm(config: RunConfig) -> MetaAlgorithm:
    """The run's meta-learner; for FedAvg, first-order MAML supplies the same SGD fine-tuning for evaluation."""
    a = config.algorithm
    kwargs = {"lr": a.lr, "adaptation_steps": a.adaptation_steps}
    if a.first_order is not None and a.name != "fedavg":
        kwargs["first_order"] = a.first_order
    return make_algorithm("fomaml" if a.name == "fedavg" else a.name, **kwargs)


def _fedavg_steps(config: RunConfig, site: SiteData, model: MultiTaskModel, state, tasks: list[str], rng: np.random.Generator) -> list[float]:
    """FedAvg's local work: minibatch SGD on the site's training rows, tasks in turn."""
    batch = config.local.meta_batch * (config.local.shots * 2 + config.local.query_size)
    data = {t: site.split(t, train=True) for t in tasks}
    losses = []
    for step in range(config.local.steps):
        task = tasks[step % len(tasks)]
        x, y = data[task]
        rows = rng.choice(len(y), min(batch, len(y)), replace=False)
        names = list(task_params(state["params"], task))
        leaves = {n: state["params"][n].detach().requires_grad_(True) for n in names}
        loss = make_loss(model, task)(leaves, torch.from_numpy(x[rows]), torch.from_numpy(y[rows]), torch.ones(len(rows)))
        grads = torch.autograd.grad(loss, [leaves[n] for n in names])
        state["params"].update({n: v.detach() for n, v in sgd_update(leaves, dict(zip(names, grads)), config.local.lr).items()})
        losses.append(float(loss.detach()))
    return losses


#: How many times a site restarts a diverged local run, each time with half the previous step.
MAX_RESTARTS = 3


def local_update(config: RunConfig, site: SiteData, global_flat: Mapping[str, torch.Tensor], round_seed: int) -> tuple[FlatState, dict[str, float]]:
    """Local meta-training on one site; returns the update and metrics (loss, examples per task, seconds, restarts).

    On a non-finite loss or update the run starts again from ``global_flat``
    with the inner and local learning rates halved (Meta-SGD's learned inner
    rates are part of the model and stay). If every restart diverges too, the
    last update is returned as it is: :func:`outgoing_update` refuses to
    release it, and the site sits out the round.
    """
    start = time.perf_counter()
    for restarts in range(MAX_RESTARTS + 1):
        update, metrics = _local_run(_smaller_steps(config, 0.5**restarts), site, global_flat, round_seed)
        if _finite(update, metrics["loss"]):
            break
    metrics.update(restarts=restarts, seconds=time.perf_counter() - start)
    return update, metrics


def _smaller_steps(config: RunConfig, factor: float) -> RunConfig:
    if factor == 1.0:
        return config
    algorithm = config.algorithm.model_copy(update={"lr": config.algorithm.lr * factor})
    local = config.local.model_copy(update={"lr": config.local.lr * factor})
    return config.model_copy(update={"algorithm": algorithm, "local": local})


def _finite(update: Mapping[str, torch.Tensor], loss: float) -> bool:
    return bool(np.isfinite(loss)) and all(bool(torch.isfinite(t).all()) for t in update.values())


def _local_run(config: RunConfig, site: SiteData, global_flat: Mapping[str, torch.Tensor], round_seed: int) -> tuple[FlatState, dict[str, float]]:
    """One attempt at :func:`local_update`, at the step sizes ``config`` gives."""
    torch.manual_seed(round_seed)
    rng = np.random.default_rng(round_seed)
    model = build_model(config, site)
    algo = build_algorithm(config)
    tasks = site.tasks
    if not tasks:
        raise ValueError(f"site {site.name!r} has no task with enough labelled rows to train on")
    samplers = {t: site.sampler(t, config.local.shots, config.local.query_size, seed=rng) for t in tasks}
    state = unflatten_state({k: v.clone() for k, v in global_flat.items()})
    lr = config.local.lr
    losses = _fedavg_steps(config, site, model, state, tasks, rng) if config.algorithm.name == "fedavg" else []
    for step in range(config.local.steps if config.algorithm.name != "fedavg" else 0):
        batch = samplers[tasks[step % len(tasks)]].sample(config.local.meta_batch)
        if algo.name == "reptile":
            delta, loss = algo.delta(model, state, batch)
            for k, d in delta.items():
                state["params"][k] = state["params"][k] + d
        else:
            loss, grads = algo.meta_loss_and_grad(model, state, batch)
            for group, values in grads.items():
                for k, g in values.items():
                    state[group][k] = state[group][k] - lr * g
        losses.append(float(loss))
    local_flat = flatten_state(state)
    scale = 1.0 if config.algorithm.name in ("reptile", "fedavg") else 1.0 / (lr * config.local.steps)
    update = {k: (global_flat[k] - local_flat[k]) * scale for k in global_flat}
    metrics = {"loss": float(np.mean(losses))}
    for t in tasks:
        metrics[f"examples.{t}"] = site.n_labelled(t, train=True)
    metrics["examples"] = site.n_rows - int(site.test_mask.sum())
    return update, metrics


class SiteDiverged(RuntimeError):
    """A site's local training produced non-finite numbers: it releases nothing this round."""


#: How a :class:`SiteDiverged` reason ends: the server's reports tell a site that sat out from one that failed.
SAT_OUT = "this site sits out the round"


def outgoing_update(config: RunConfig, update: FlatState, partition: int) -> FlatState:
    """The update as the site releases it: clipped to ``privacy.clip_norm`` under DP.

    Partitions listed in ``simulation.byzantine_sites`` play attackers here
    (chaos testing): they skip clipping and send ``-10 x`` their update
    (``sign_flip``) or standard normal noise of the same shapes (``noise``);
    those in ``simulation.free_riders`` send zeros (and still claim their examples).
    """
    sim = config.simulation
    if partition in sim.free_riders:
        return {k: torch.zeros_like(t) for k, t in update.items()}
    if partition not in sim.byzantine_sites and not all(bool(torch.isfinite(t).all()) for t in update.values()):
        # The server drops a non-finite update it can see, but under SecAgg+ it sees only the sum, which one
        # NaN would ruin (and a NaN norm passes clipping). The site sits the round out instead.
        raise SiteDiverged(f"local training diverged (non-finite update, also after {MAX_RESTARTS} restarts with smaller steps); {SAT_OUT}")
    if partition in sim.byzantine_sites:
        if sim.attack == "sign_flip":
            return {k: -10.0 * t for k, t in update.items()}
        generator = torch.Generator().manual_seed(config.seed * 7919 + partition)
        return {k: torch.randn(t.shape, generator=generator) for k, t in update.items()}
    if config.privacy.enabled:
        update, _ = clip_update(update, config.privacy.clip_norm)
    return update


def evaluate_site(config: RunConfig, site: SiteData, global_flat: Mapping[str, torch.Tensor], seed: int) -> dict[str, float]:
    """Per task: held-out metrics of the global model, and after K-shot adaptation (``personalized``)."""
    model = build_model(config, site)
    algo = build_algorithm(config)
    state = unflatten_state(dict(global_flat))
    ev = config.evaluation
    rng = np.random.default_rng(seed)
    metrics: dict[str, float] = {}
    for task in site.scored_tasks:
        x_test, y_test = site.split(task, train=False)
        for name, value in task_scores(model, state["params"], task, x_test, y_test).items():
            metrics[f"{task}.global.{name}"] = value
        support = site.sampler(task, ev.shots, query_size=1, seed=rng).sample(1).episode(0)
        fast = algo.adapt(model, state, tuple(t[0] for t in support.support), task, steps=ev.steps, lr=ev.lr)
        for name, value in task_scores(model, fast, task, x_test, y_test).items():
            metrics[f"{task}.personalized.{name}"] = value
        metrics[f"examples.{task}"] = len(y_test)
    metrics["examples"] = int(site.test_mask.sum())
    return metrics
