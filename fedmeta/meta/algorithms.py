"""MAML, FOMAML, Meta-SGD, ANIL and Reptile over batches of episodes.

Every algorithm works on a *meta-state*: ``{"params": {...}}`` plus, for
Meta-SGD, ``{"inner_lrs": {...}}`` with one learned rate tensor per
parameter. The state is a plain dict of tensors, which is what Flower ships
between sites and the coordinator.

``meta_loss_and_grad`` returns the query loss after adaptation and its
gradient with respect to the state, averaged over the batch; the batch is
processed with :func:`torch.func.vmap`, one episode per lane. Reptile has no
outer gradient; its ``meta_loss_and_grad`` returns the pseudo-gradient
``params - mean(adapted)`` so that one server optimizer serves all five.

Parameter names follow learn2learn: ``lr`` is the inner (fast) learning
rate, ``first_order`` drops second-order terms, ``adapt`` fine-tunes.

References: Finn et al. 2017 (MAML, FOMAML); Li et al. 2017 (Meta-SGD);
Raghu et al. 2020 (ANIL); Nichol et al. 2018 (Reptile).

>>> import torch
>>> from fedmeta.data.synthetic import SineTasks
>>> from fedmeta.models import MultiTaskModel, TaskSpec
>>> model = MultiTaskModel.mlp(1, [TaskSpec(name="sine", kind="regression")], hidden=(40, 40))
>>> maml = MAML(lr=0.01, adaptation_steps=1)
>>> state = maml.init_state(model)
>>> batch = SineTasks(seed=0).sample(meta_batch=25, shots=10)
>>> loss, grads = maml.meta_loss_and_grad(model, state, batch)
>>> sorted(grads) == ["params"]
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedmeta.data.episodes import EpisodeBatch
from fedmeta.meta.inner import LearningRate, Params, TaskLoss, adapt, adapt_batch, make_loss
from fedmeta.models import MultiTaskModel, head_prefix, task_params

MetaState = dict[str, Params]


def model_state(model: MultiTaskModel) -> MetaState:
    """A detached copy of the model's parameters as a meta-state."""
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def one_support_set(support: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, w)`` of one support set; an episode given as a batch of one loses its episode axis.

    Row weights tell the two apart: ``(rows,)`` for one support set,
    ``(episodes, rows)`` for a batch.
    """
    x, y, w = support
    if w.dim() == 1:
        return x, y, w
    if w.dim() == 2 and w.shape[0] == 1:
        return x[0], y[0], w[0]
    raise ValueError(
        f"adapt takes one support set, with row weights of shape (rows,) or (1, rows); got weights of shape {tuple(w.shape)}. "
        "For one episode of a batch, pass batch.episode(i).support"
    )


@dataclass(frozen=True)
class MetaAlgorithm:
    """Shared machinery; subclasses choose what adapts and what is learned.

    Parameters
    ----------
    lr : float, default=0.01
        Inner-loop learning rate (Meta-SGD: the initial value of every learned rate).
    adaptation_steps : int, default=1
        Inner SGD steps per episode.
    first_order : bool, default=False
        Drop second-order terms of the meta-gradient.
    """

    lr: float = 0.01
    adaptation_steps: int = 1
    first_order: bool = False

    name: ClassVar[str] = "maml"
    head_only: ClassVar[bool] = False
    learns_lr: ClassVar[bool] = False

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {self.lr}")
        if self.adaptation_steps < 1:
            raise ValueError(f"{self.name}: adaptation_steps must be >= 1, got {self.adaptation_steps}")

    def init_state(self, model: MultiTaskModel) -> MetaState:
        state = model_state(model)
        if self.learns_lr:
            state["inner_lrs"] = {k: torch.full_like(v, self.lr) for k, v in state["params"].items()}
        return state

    def adapt_names(self, params: Mapping[str, torch.Tensor], task: str) -> list[str]:
        if self.head_only:
            return [k for k in params if k.startswith(head_prefix(task))]
        return list(params)

    def inner_lr(self, state: Mapping[str, Params]) -> LearningRate:
        return state["inner_lrs"] if self.learns_lr else self.lr

    def _task_state(self, state: Mapping[str, Params], task: str) -> MetaState:
        """The slice of the state one task touches: body, its head, their rates."""
        sliced = {"params": task_params(state["params"], task)}
        if self.learns_lr:
            sliced["inner_lrs"] = {k: state["inner_lrs"][k] for k in sliced["params"]}
        return sliced

    def adapt(
        self,
        model: MultiTaskModel,
        state: Mapping[str, Params],
        support: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        task: str,
        steps: int | None = None,
        lr: LearningRate | None = None,
    ) -> Params:
        """Few-shot fine-tuning of one support set, as this algorithm adapts at meta-training.

        ``support`` is one support set ``(x, y, w)``, or one episode's as a
        batch of one (``batch.episode(i).support``). The adapted parameters
        have no episode axis.

        >>> from fedmeta.data.synthetic import SineTasks
        >>> from fedmeta.models import MultiTaskModel, TaskSpec
        >>> model = MultiTaskModel.mlp(1, [TaskSpec(name="sine", kind="regression")], hidden=(8,))
        >>> maml = MAML(lr=0.01)
        >>> state = maml.init_state(model)
        >>> batch = SineTasks(seed=0).sample(meta_batch=4, shots=10)
        >>> fast = maml.adapt(model, state, batch.episode(0).support, "sine", steps=5)
        >>> {k: tuple(v.shape) for k, v in fast.items()} == {k: tuple(v.shape) for k, v in state["params"].items()}
        True
        """
        sliced = self._task_state(state, task)
        params = sliced["params"]
        fast = adapt(
            make_loss(model, task),
            params,
            one_support_set(support),
            steps=self.adaptation_steps if steps is None else steps,
            lr=self.inner_lr(sliced) if lr is None else lr,
            adapt_names=self.adapt_names(params, task),
            first_order=True,
        )
        return {k: v.detach() for k, v in fast.items()}

    def meta_loss_and_grad(
        self, model: MultiTaskModel, state: Mapping[str, Params], batch: EpisodeBatch, use_vmap: bool | None = None
    ) -> tuple[torch.Tensor, MetaState]:
        """Mean query loss after adaptation, and its gradient w.r.t. the task's state slice.

        ``use_vmap`` forces (True) or forbids (False) the vmap forward; by
        default MLP bodies take the equivalent hand-batched forward.
        """
        loss_fn = TaskLoss(model, batch.task, use_vmap)
        sliced = self._task_state(state, batch.task)
        leaves = {group: {k: v.detach().requires_grad_(True) for k, v in values.items()} for group, values in sliced.items()}
        names = self.adapt_names(leaves["params"], batch.task)
        with torch.enable_grad():
            fast = adapt_batch(loss_fn, leaves["params"], batch.support, self.adaptation_steps, self.inner_lr(leaves), names, self.first_order)
            loss = loss_fn.batched(fast, *batch.query, batched=names).mean()
            flat = [(g, k, v) for g, values in leaves.items() for k, v in values.items()]
            grads = torch.autograd.grad(loss, [v for _, _, v in flat], allow_unused=True)
        out: MetaState = {group: {} for group in leaves}
        for (group, k, v), g in zip(flat, grads):
            out[group][k] = torch.zeros_like(v) if g is None else g
        return loss.detach(), out


@dataclass(frozen=True)
class MAML(MetaAlgorithm):
    """Model-Agnostic Meta-Learning (Finn et al. 2017); second order unless ``first_order``."""

    name: ClassVar[str] = "maml"


@dataclass(frozen=True)
class FOMAML(MetaAlgorithm):
    """First-order MAML: the query gradient at the adapted parameters."""

    first_order: bool = True
    name: ClassVar[str] = "fomaml"


@dataclass(frozen=True)
class MetaSGD(MetaAlgorithm):
    """Meta-SGD (Li et al. 2017): per-parameter inner rates meta-trained with the weights."""

    name: ClassVar[str] = "metasgd"
    learns_lr: ClassVar[bool] = True


@dataclass(frozen=True)
class ANIL(MetaAlgorithm):
    """Almost No Inner Loop (Raghu et al. 2020): the inner loop adapts the head only."""

    name: ClassVar[str] = "anil"
    head_only: ClassVar[bool] = True


@dataclass(frozen=True)
class Reptile(MetaAlgorithm):
    """Reptile (Nichol et al. 2018): ``adaptation_steps`` SGD steps per episode, then move toward the result.

    Each episode trains on its support and query rows together. The
    pseudo-gradient ``params - mean(adapted)`` is returned in place of a
    meta-gradient; a server SGD step with rate ε on it is Reptile's
    ``params += ε (mean(adapted) - params)``.
    """

    first_order: bool = True
    name: ClassVar[str] = "reptile"

    def meta_loss_and_grad(self, model, state, batch, use_vmap=None):
        delta, loss = self.delta(model, state, batch)
        return loss, {"params": {k: -d for k, d in delta.items()}}

    def delta(self, model: MultiTaskModel, state: Mapping[str, Params], batch: EpisodeBatch) -> tuple[Params, torch.Tensor]:
        """``mean(adapted) - params`` over the batch, and the mean pre-adaptation loss."""
        loss_fn = make_loss(model, batch.task)
        params = task_params(state["params"], batch.task)

        x, y, w = (torch.cat([s, q], dim=1) for s, q in zip(batch.support, batch.query))
        with torch.no_grad():
            losses = loss_fn.batched(params, x, y, w)
        fast = adapt_batch(loss_fn, params, (x, y, w), self.adaptation_steps, self.lr, first_order=True)
        return {k: fast[k].detach().mean(0) - params[k] for k in params}, losses.mean()


ALGORITHMS: dict[str, type[MetaAlgorithm]] = {cls.name: cls for cls in (MAML, FOMAML, MetaSGD, ANIL, Reptile)}


def make_algorithm(name: str, **kwargs) -> MetaAlgorithm:
    """Build an algorithm by name: ``maml``, ``fomaml``, ``metasgd``, ``anil`` or ``reptile``."""
    try:
        cls = ALGORITHMS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}") from None
    return cls(**kwargs)
