"""Episodes: support/query pairs drawn from a site's labelled rows.

A batch of episodes shares one task and one shape so that the engine can
``vmap`` over it. Classification support sets hold K shots per class,
stratified; a class with fewer than K rows contributes what it has and the
rest is zero-weight padding, so shapes never depend on the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class EpisodeBatch:
    """``B`` episodes of one task: tensors with a leading episode axis.

    ``*_w`` are row weights (1 for real rows, 0 for padding).
    """

    task: str
    support_x: torch.Tensor
    support_y: torch.Tensor
    support_w: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    query_w: torch.Tensor

    @property
    def size(self) -> int:
        return self.support_x.shape[0]

    @property
    def support(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.support_x, self.support_y, self.support_w

    @property
    def query(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query_x, self.query_y, self.query_w

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.support, *self.query)

    def episode(self, i: int) -> "EpisodeBatch":
        """Episode ``i`` alone, as a batch of one."""
        return EpisodeBatch(self.task, *(t[i : i + 1] for t in self.tensors()))

    @property
    def n_examples(self) -> int:
        """Real (non-padding) rows across support and query."""
        return int(self.support_w.sum().item() + self.query_w.sum().item())


class EpisodeSampler:
    """Draws episodes of one task from a site's labelled rows.

    Parameters
    ----------
    x : array of shape (n, ...)
        Encoded features of the rows that carry a label for this task.
    y : array of shape (n,)
        Class indices (classification) or values (regression).
    task : str
        Task name, carried on every batch.
    classification : bool
        Stratify K shots per class (True) or draw K rows (False).
    shots : int, default=5
        K: shots per class, or rows for regression.
    query_size : int, default=16
        Query rows per episode, drawn from rows not in the support set.
    n_classes : int, optional
        Number of classes of the task (defaults to ``y.max() + 1``).
    seed : int or numpy Generator, default=0
    prior_weighted : bool, default=True
        Weight support rows of class c by ``C * p(c)``, the class's share of
        the site's rows, so that the stratified support loss estimates the
        loss under the site's own class mix. Without it, adapting on a
        balanced support set moves the decision threshold toward balanced
        classes, which costs accuracy on imbalanced sites.

    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(100, 3)), rng.integers(0, 2, 100)
    >>> batch = EpisodeSampler(x, y, "t", classification=True, shots=4).sample(8)
    >>> tuple(batch.support_x.shape), tuple(batch.query_x.shape)
    ((8, 8, 3), (8, 16, 3))
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        task: str,
        classification: bool,
        shots: int = 5,
        query_size: int = 16,
        n_classes: int | None = None,
        seed: int | np.random.Generator = 0,
        prior_weighted: bool = True,
    ):
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"task {task!r}: {len(x)} feature rows but {len(y)} labels")
        if shots < 1:
            raise ValueError(f"task {task!r}: shots must be >= 1, got {shots}")
        if query_size < 1:
            raise ValueError(f"task {task!r}: query_size must be >= 1, got {query_size}")
        self.x, self.task, self.classification = x, task, classification
        self.shots, self.query_size = shots, query_size
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        if classification:
            self.y = y.astype(np.int64)
            self.n_classes = int(n_classes if n_classes is not None else self.y.max() + 1)
            self.by_class = [np.flatnonzero(self.y == c) for c in range(self.n_classes)]
            self.support_size = shots * self.n_classes
            counts = np.array([len(rows) for rows in self.by_class], np.float32)
            self.class_weight = counts / counts.sum() * self.n_classes if prior_weighted else np.ones(self.n_classes, np.float32)
        else:
            self.y = y.astype(np.float32)
            self.support_size = shots
        if len(x) < self.support_size and not classification:
            raise ValueError(f"task {task!r}: K={shots} shots need at least {shots} labelled rows, the site has {len(x)}")

    def _support_indices(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.classification:
            return self.rng.choice(len(self.x), self.shots, replace=False), np.ones(self.shots, np.float32)
        idx = np.zeros(self.support_size, np.int64)
        w = np.zeros(self.support_size, np.float32)
        for c, rows in enumerate(self.by_class):
            # A tiny class keeps one row back for the query set (unless it has only one).
            take = min(self.shots, len(rows) - 1 if len(rows) > 1 else len(rows))
            if take:
                chosen = self.rng.choice(rows, take, replace=False)
                idx[c * self.shots : c * self.shots + take] = chosen
                w[c * self.shots : c * self.shots + take] = self.class_weight[c]
        return idx, w

    def _one(self) -> tuple[np.ndarray, ...]:
        s_idx, s_w = self._support_indices()
        rest = np.setdiff1d(np.arange(len(self.x)), s_idx[s_w > 0], assume_unique=False)
        q_idx = self.rng.choice(rest, self.query_size, replace=len(rest) < self.query_size)
        q_w = np.ones(self.query_size, np.float32)
        if len(rest) < self.query_size:
            # Too few distinct rows: keep each once, pad the rest with zero weight.
            q_idx[: len(rest)] = self.rng.permutation(rest)
            q_w[len(rest) :] = 0.0
        return self.x[s_idx], self.y[s_idx], s_w, self.x[q_idx], self.y[q_idx], q_w

    def support_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One support set ``(x, y, w)`` alone, as site personalization draws it (no query rows needed)."""
        return self.support_and_rest()[0]

    def support_and_rest(self) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One support set, and every other row as ``(x, y, w)`` (for choosing how long to fine-tune)."""
        idx, w = self._support_indices()
        rest = np.setdiff1d(np.arange(len(self.x)), idx[w > 0])
        support = (torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx]), torch.from_numpy(w))
        return support, (torch.from_numpy(self.x[rest]), torch.from_numpy(self.y[rest]), torch.ones(len(rest)))

    def sample(self, batch_size: int) -> EpisodeBatch:
        """``batch_size`` independent episodes, stacked."""
        if len(self.x) <= (self.shots if not self.classification else 1):
            raise ValueError(f"task {self.task!r}: {len(self.x)} labelled rows are too few for a support and a query set")
        parts = list(zip(*(self._one() for _ in range(batch_size))))
        tensors = [torch.from_numpy(np.stack(p)) for p in parts]
        return EpisodeBatch(self.task, *tensors)
