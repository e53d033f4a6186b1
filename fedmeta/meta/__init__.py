"""The meta-learning engine, on ``torch.func``: one inner loop, five algorithms, vmap over episodes."""

from fedmeta.meta.algorithms import (
    ALGORITHMS,
    ANIL,
    FOMAML,
    MAML,
    MetaAlgorithm,
    MetaSGD,
    MetaState,
    Reptile,
    make_algorithm,
    model_state,
)
from fedmeta.meta.inner import adapt, make_loss, per_row_loss, sgd_update

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "FOMAML",
    "MAML",
    "MetaAlgorithm",
    "MetaSGD",
    "MetaState",
    "Reptile",
    "adapt",
    "make_algorithm",
    "make_loss",
    "model_state",
    "per_row_loss",
    "sgd_update",
]
