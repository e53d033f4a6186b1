"""Personalized-FL peers, trained on the same sites, splits, network and budget as fedmeta, scored the same way.

The peers run in a plain in-process federated loop (:func:`federate`), not
over Flower: every training site takes part in every round, runs
``local_steps`` minibatch SGD steps (the engine's :func:`~fedmeta.meta.inner.sgd_update`)
from what the server sent, and the server averages what the sites upload,
weighted by their rows, each head over the sites that have its task. Rounds
and local steps are those of the fedmeta runs they are compared with.

- ``ditto``: Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
  Personalization". FedAvg for the global model; each site's personal model
  takes the same local steps on its loss plus ``λ/2 ||v - w||²``. Knob: λ.
- ``fedrep``: Collins et al. 2021, "Exploiting Shared Representations for
  Personalized Federated Learning". Each round a site trains its own heads
  (body frozen) for ``head_steps``, then the shared body (heads frozen).
  Knob: head steps.
- ``fedper``: Arivazhagan et al. 2019, "Federated Learning with Personalization
  Layers". Every layer trains locally; only the base layers are shared.
  Knob: how many top layers are personal (heads, or heads and the last hidden layer).
- ``fedbabu``: Oh et al. 2022, "FedBABU: Toward Enhanced Representation for
  Federated Image Classification". The heads stay at their random
  initialization during federated training, the body is averaged; each site
  then fine-tunes (early-stopped, as fedmeta's all-rows candidate). Knob:
  fine-tune the heads only or every layer.
- ``apfl``: Deng et al. 2020, "Adaptive Personalized Federated Learning". Each
  site keeps a local model ``v`` trained through the mixture
  ``α·v + (1-α)·w`` while ``w`` trains by FedAvg. Knob: α.
- ``perfedavg``: Fallah et al. 2020, "Personalized Federated Learning with
  Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach", first-order
  (Per-FedAvg FO): a MAML step inside each local step; a site personalizes
  with one step on its rows. Knob: the inner rate α.

Each peer's knob is chosen from a grid (:data:`GRIDS`) of at most the size
of fedmeta's own (Ditto's λ: 3 values; APFL's α: the same 4 as fedmeta's mix),
by mean site accuracy on the first validation fold fedmeta's choice uses
(:func:`fedmeta.personalize.choice.validation_split`);
the peer is then trained again on all training rows with that value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedmeta.data import SiteData
from fedmeta.meta.inner import make_loss, sgd_update
from fedmeta.models import head_prefix, is_body_param
from fedmeta.personalize.all_rows import ALL_ROWS_LR, fit_all_rows
from fedmeta.personalize.choice import validation_scores, validation_split
from fedmeta.trained import TrainedModel

Params = dict[str, torch.Tensor]

GRIDS: dict[str, tuple] = {
    "ditto": (0.01, 0.1, 1.0),
    "fedrep": (5, 10, 20),
    "fedper": (1, 2),
    "fedbabu": ("head", "all"),
    "apfl": (0.25, 0.5, 0.75, 1.0),
    "perfedavg": (0.01, 0.03, 0.1),
}
PEERS = tuple(GRIDS)


@dataclass(frozen=True)
class Budget:
    """What every peer gets: the fedmeta runs' rounds and local steps, and the same network."""

    rounds: int = 20
    local_steps: int = 10
    batch_rows: int = 64
    lr: float = 0.05
    hidden: tuple[int, ...] = (64, 64)


class _Site:
    """One site's training rows as tensors, its tasks' losses, and a seeded minibatch draw."""

    def __init__(self, site: SiteData, module, seed: int):
        self.site = site
        self.tasks = list(site.tasks)
        self.rows = {t: tuple(torch.from_numpy(a) for a in site.split(t, train=True)) for t in self.tasks}
        self.n = sum(len(y) for _, y in self.rows.values())
        self.losses = {t: make_loss(module, t) for t in self.tasks}
        self.rng = np.random.default_rng(seed)

    def names(self, params: Params) -> list[str]:
        return [k for k in params if is_body_param(k) or any(k.startswith(head_prefix(t)) for t in self.tasks)]

    def batch(self, batch_rows: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for t, (x, y) in self.rows.items():
            pick = torch.from_numpy(self.rng.choice(len(y), min(batch_rows, len(y)), replace=False))
            out[t] = (x[pick], y[pick])
        return out

    def loss(self, params: Params, batch) -> torch.Tensor:
        return sum(self.losses[t](params, x, y, torch.ones(len(y))) for t, (x, y) in batch.items()) / len(batch)

    def grads(self, params: Params, names: list[str], batch) -> Params:
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        g = torch.autograd.grad(self.loss({**params, **leaves}, batch), list(leaves.values()), allow_unused=True)
        return {n: (gi if gi is not None else torch.zeros_like(leaves[n])) for n, gi in zip(names, g)}

    def sgd(self, params: Params, names: list[str], steps: int, lr: float, batch_rows: int, pull: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Params:
        """``steps`` minibatch SGD steps on ``names``; ``pull(name, value)`` adds a term to the gradient (Ditto's proximal term)."""
        params = dict(params)
        for _ in range(steps):
            g = self.grads(params, names, self.batch(batch_rows))
            if pull is not None:
                g = {n: gi + pull(n, params[n]) for n, gi in g.items()}
            params = {k: v.detach() for k, v in sgd_update(params, g, lr).items()}
        return params


def _average(uploads: list[tuple[Params, int]]) -> Params:
    """Each parameter averaged over the sites that uploaded it, weighted by their rows."""
    out = {}
    for name in {n for p, _ in uploads for n in p}:
        parts = [(p[name], w) for p, w in uploads if name in p]
        total = sum(w for _, w in parts)
        out[name] = sum(v * (w / total) for v, w in parts)
    return out


def federate(sites: list[_Site], start: Params, rounds: int, local_update: Callable[[int, _Site, Params], Params]) -> Params:
    """FedAvg's loop: every round each site updates from the global parameters and uploads some; the server averages them."""
    global_params = dict(start)
    for _ in range(rounds):
        uploads = [(local_update(i, s, global_params), s.n) for i, s in enumerate(sites)]
        global_params = {**global_params, **_average(uploads)}
    return global_params


def _personal_layers(params: Params, depth: int) -> set[str]:
    """The heads, and with ``depth`` 2 the last hidden layer too (FedPer's personalization layers)."""
    names = {k for k in params if not is_body_param(k)}
    if depth >= 2:
        last = max(int(k.split(".")[2]) for k in params if is_body_param(k))
        names |= {k for k in params if k.startswith(f"body.net.{last}.")}
    return names


def train_peer(peer: str, knob, sites: list[SiteData], template: TrainedModel, budget: Budget, seed: int = 0) -> dict[str, Params]:
    """One peer with one knob value over ``sites`` (their training rows); each site's personalized parameters by name."""
    module = template.module()
    rows = [_Site(s, module, seed + i) for i, s in enumerate(sites)]
    start = {k: v.detach().clone() for k, v in template.params.items()}
    b = budget
    if peer == "ditto":
        personal = [dict(start) for _ in rows]

        def update(i, site, w):
            names = site.names(w)
            personal[i] = site.sgd(personal[i], names, b.local_steps, b.lr, b.batch_rows, pull=lambda n, v: knob * (v - w[n]))
            new = site.sgd(w, names, b.local_steps, b.lr, b.batch_rows)
            return {n: new[n] for n in names}

        federate(rows, start, b.rounds, update)
        return {s.site.name: p for s, p in zip(rows, personal)}
    if peer in ("fedrep", "fedper"):
        personal_names = _personal_layers(start, 1 if peer == "fedrep" else knob)
        personal = [dict(start) for _ in rows]

        def update(i, site, w):
            names = site.names(w)
            mine = [n for n in names if n in personal_names]
            shared = [n for n in names if n not in personal_names]
            params = {**w, **{n: personal[i][n] for n in personal_names}}
            if peer == "fedrep":
                params = site.sgd(params, mine, knob, b.lr, b.batch_rows)
                params = site.sgd(params, shared, b.local_steps, b.lr, b.batch_rows)
            else:
                params = site.sgd(params, names, b.local_steps, b.lr, b.batch_rows)
            personal[i] = {n: params[n] for n in personal_names}
            return {n: params[n] for n in shared}

        w = federate(rows, start, b.rounds, update)
        out = {}
        for i, site in enumerate(rows):
            params = {**w, **personal[i]}
            if peer == "fedrep":  # the head catches up with the final body, as at the start of a round
                params = site.sgd(params, [n for n in site.names(params) if n in personal_names], knob, b.lr, b.batch_rows)
            out[site.site.name] = params
        return out
    if peer == "fedbabu":

        def update(i, site, w):
            body = [n for n in site.names(w) if is_body_param(n)]
            new = site.sgd(w, body, b.local_steps, b.lr, b.batch_rows)
            return {n: new[n] for n in body}

        w = federate(rows, start, b.rounds, update)
        trained = TrainedModel(template.schema, template.hidden, {"params": w})
        out = {}
        for s in rows:
            names = [n for n in s.names(w) if knob == "all" or not is_body_param(n)]
            out[s.site.name] = fit_all_rows(trained, s.site, s.tasks, names, ALL_ROWS_LR, seed, max_steps=600)[0]
        return out
    if peer == "apfl":
        local = [dict(start) for _ in rows]

        def update(i, site, w):
            names = site.names(w)
            params, v = dict(w), dict(local[i])
            for _ in range(b.local_steps):
                batch = site.batch(b.batch_rows)
                g_w = site.grads(params, names, batch)
                mixed = {n: knob * v[n] + (1 - knob) * params[n] for n in params}
                g_mix = site.grads(mixed, names, batch)
                params = {k: t.detach() for k, t in sgd_update(params, g_w, b.lr).items()}
                v = {k: t.detach() for k, t in sgd_update(v, {n: knob * g for n, g in g_mix.items()}, b.lr).items()}
            local[i] = v
            return {n: params[n] for n in names}

        w = federate(rows, start, b.rounds, update)
        return {s.site.name: {n: knob * local[i][n] + (1 - knob) * w[n] for n in w} for i, s in enumerate(rows)}
    if peer == "perfedavg":

        def update(i, site, w):
            names = site.names(w)
            params = dict(w)
            for _ in range(b.local_steps):
                temp = {k: t.detach() for k, t in sgd_update(params, site.grads(params, names, site.batch(b.batch_rows)), knob).items()}
                params = {k: t.detach() for k, t in sgd_update(params, site.grads(temp, names, site.batch(b.batch_rows)), b.lr).items()}
            return {n: params[n] for n in names}

        w = federate(rows, start, b.rounds, update)
        return {s.site.name: s.sgd(w, s.names(w), 1, knob, b.batch_rows) for s in rows}
    raise ValueError(f"unknown peer {peer!r}; choose from {list(PEERS)}")


def tune_and_train(peer: str, sites: list[SiteData], template: TrainedModel, budget: Budget, seed: int = 0) -> tuple[dict[str, Params], object, dict]:
    """Each knob value trained on the sites' fitting rows and scored on their validation rows; the best value trained again on all training rows.

    Returns each site's parameters, the chosen knob and every knob's mean validation accuracy.
    """
    views = [validation_split(s, seed) for s in sites]
    scored = {}
    for knob in GRIDS[peer]:
        params = train_peer(peer, knob, views, template, budget, seed)
        accs = []
        for view in views:
            model = TrainedModel(template.schema, template.hidden, {"params": params[view.name]})
            s = validation_scores(model, view, [t for t in view.tasks])
            accs.append(s.get("acc", -s["loss"]))
        scored[knob] = float(np.mean(accs))
    best = max(GRIDS[peer], key=lambda k: scored[k])
    return train_peer(peer, best, sites, template, budget, seed), best, {str(k): round(v, 5) for k, v in scored.items()}
