"""Aggregation rules and server optimizers: small pieces the strategy composes.

The global model travels as a flat dict ``{"params.body.net.0.weight": tensor,
..., "inner_lrs.…": tensor}``. Sites send an *update* of the same keys that
the server treats as a gradient: a meta-gradient (MAML, FOMAML, Meta-SGD,
ANIL) or the negated Reptile delta.

- :func:`weighted_mean` averages each key over the sites that sent it: the
  body over every replying site, a head only over the sites that have its
  task, each weighted by that site's example count for it.
- :class:`ServerSGD` and :class:`ServerAdam` apply the mean with server
  learning rate β; their state is a plain dict so checkpoints can hold it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedmeta.meta import MetaState

FlatState = dict[str, torch.Tensor]


def flatten_state(state: Mapping[str, Mapping[str, torch.Tensor]]) -> FlatState:
    """``{"params": {"body.x": t}}`` → ``{"params.body.x": t}``."""
    return {f"{group}.{name}": t for group, values in state.items() for name, t in values.items()}


def unflatten_state(flat: Mapping[str, torch.Tensor]) -> MetaState:
    state: MetaState = {}
    for key, t in flat.items():
        group, name = key.split(".", 1)
        state.setdefault(group, {})[name] = t
    return state


def head_task(key: str) -> str | None:
    """The task a flat key belongs to, or None for the shared body."""
    name = key.split(".", 1)[1]
    return name.split(".")[1] if name.startswith("heads.") else None


def select_for_tasks(flat: Mapping[str, torch.Tensor], tasks: Sequence[str]) -> FlatState:
    """The body plus the heads of ``tasks``: what a site with those tasks receives."""
    wanted = set(tasks)
    return {k: v for k, v in flat.items() if head_task(k) is None or head_task(k) in wanted}


@dataclass(frozen=True)
class SiteUpdate:
    """One site's reply: its update and its example count per task."""

    site: str
    update: FlatState
    examples: Mapping[str, int]

    def weight(self, key: str) -> float:
        task = head_task(key)
        return float(sum(self.examples.values()) if task is None else self.examples.get(task, 0))


def weighted_mean(updates: Sequence[SiteUpdate]) -> FlatState:
    """Per key, the example-weighted mean over the sites that sent that key."""
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for u in updates:
        for key, t in u.update.items():
            w = u.weight(key)
            if w <= 0:
                continue
            sums[key] = sums[key] + w * t if key in sums else w * t.double()
            weights[key] = weights.get(key, 0.0) + w
    return {k: (sums[k] / weights[k]).float() for k in sums}


class ServerSGD:
    """SGD with optional (heavy-ball) momentum on the global state; keys absent from the gradient stay put."""

    def __init__(self, lr: float, momentum: float = 0.0):
        self.lr, self.momentum = lr, momentum
        self.buffers: FlatState = {}

    def step(self, params: FlatState, grad: Mapping[str, torch.Tensor]) -> FlatState:
        out = dict(params)
        for k, g in grad.items():
            if self.momentum:
                self.buffers[k] = self.momentum * self.buffers[k] + g if k in self.buffers else g.clone()
                g = self.buffers[k]
            out[k] = params[k] - self.lr * g
        return out

    def state_dict(self) -> dict:
        return {"kind": "sgd", "buffers": dict(self.buffers)}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = dict(state["buffers"])


class ServerAdam:
    """Adam (Kingma & Ba 2015) as a server optimizer, with a step count per key (heads may skip rounds)."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m: FlatState = {}
        self.v: FlatState = {}
        self.t: dict[str, int] = {}

    def step(self, params: FlatState, grad: Mapping[str, torch.Tensor]) -> FlatState:
        b1, b2 = self.betas
        out = dict(params)
        for k, g in grad.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * g if k in self.m else (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g if k in self.v else (1 - b2) * g * g
            self.t[k] = self.t.get(k, 0) + 1
            m_hat = self.m[k] / (1 - b1 ** self.t[k])
            v_hat = self.v[k] / (1 - b2 ** self.t[k])
            out[k] = params[k] - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return out

    def state_dict(self) -> dict:
        return {"kind": "adam", "m": dict(self.m), "v": dict(self.v), "t": dict(self.t)}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v, self.t = dict(state["m"]), dict(state["v"]), dict(state["t"])


def make_server_optimizer(kind: str, lr: float, momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)):
    if kind == "sgd":
        return ServerSGD(lr, momentum)
    if kind == "adam":
        return ServerAdam(lr, betas)
    raise ValueError(f"unknown server optimizer {kind!r}; choose 'sgd' or 'adam'")
