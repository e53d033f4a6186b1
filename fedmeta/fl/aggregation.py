"""Aggregation rules and server optimizers: small pieces the strategy composes.

The global model travels as a flat dict ``{"params.body.net.0.weight": tensor,
..., "inner_lrs.…": tensor}``. Sites send an *update* of the same keys that
the server treats as a gradient: a meta-gradient (MAML, FOMAML, Meta-SGD,
ANIL) or the negated Reptile delta.

- :func:`group_updates` decides, once per round, which sites count for
  which parameters: the body over every replying site, a head only over the
  sites that have its task (a positive example count for it). Every combiner
  (the weighted mean here, the DP mean in :mod:`~fedmeta.fl.privacy`, the
  robust rules in :mod:`~fedmeta.fl.robust`) works on these groups, so a
  site that lacks a task can never dilute that task's head.
- :func:`weighted_mean` averages each group over its holders, each weighted
  by its example count for that group.
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


@dataclass(frozen=True)
class Group:
    """Parameters combined together (the body, or one task's head) and the sites that count for them."""

    task: str | None
    keys: tuple[str, ...]
    holders: tuple[SiteUpdate, ...]

    @property
    def name(self) -> str:
        return "body" if self.task is None else f"head {self.task!r}"


def group_updates(updates: Sequence[SiteUpdate]) -> list[Group]:
    """The round's groups: the body over every site, each head over the sites that have its task.

    A site holds a group when it sent every key of it and, for a head, has a
    positive example count for the task. A site without the task may still
    send that head (as zeros, or as an attacker's numbers); it is never counted.

    >>> import torch
    >>> a = SiteUpdate("a", {"params.body.w": torch.ones(1), "params.heads.t.w": torch.ones(1)}, {"t": 5})
    >>> b = SiteUpdate("b", {"params.body.w": torch.ones(1), "params.heads.t.w": torch.zeros(1)}, {"u": 5})
    >>> [(g.name, [h.site for h in g.holders]) for g in group_updates([a, b])]
    [('body', ['a', 'b']), ("head 't'", ['a'])]
    """
    keys_of: dict[str | None, list[str]] = {}
    for u in updates:
        for key in u.update:
            keys = keys_of.setdefault(head_task(key), [])
            if key not in keys:
                keys.append(key)
    groups = []
    for task in sorted(keys_of, key=lambda t: (t is not None, t or "")):
        keys = tuple(keys_of[task])
        holders = tuple(
            u for u in updates if all(k in u.update for k in keys) and (task is None or u.examples.get(task, 0) > 0)
        )
        if holders:
            groups.append(Group(task, keys, holders))
    return groups


def weighted_mean(groups: Sequence[Group]) -> FlatState:
    """Per group, the mean over its holders weighted by their example counts for it."""
    out: FlatState = {}
    for group in groups:
        weights = [u.weight(group.keys[0]) for u in group.holders]
        total = sum(weights)
        if total <= 0:
            continue
        for key in group.keys:
            out[key] = (sum(w * u.update[key].double() for w, u in zip(weights, group.holders)) / total).float()
    return out


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
