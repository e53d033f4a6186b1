"""Byzantine-robust aggregation rules, applied per parameter group.

A group is the shared body (every replying site) or one task's head (the
sites that have that task), so a rule only ever compares updates of the same
parameters. Sites weigh equally: an attacker could inflate its example count.

- :func:`coordinate_median`: the coordinate-wise median (Yin et al. 2018);
- :func:`trimmed_mean`: per coordinate, the mean after dropping the
  ``fraction`` largest and smallest values (Yin et al. 2018);
- :func:`krum`: the update closest to its n - f - 2 nearest neighbours;
  ``select = m > 1`` gives Multi-Krum, the mean of the m best (Blanchard et
  al. 2017). It assumes at most ``f`` attackers.

:func:`robust_mean` applies one of them to the round's groups
(:func:`~fedmeta.fl.aggregation.group_updates`). Krum's guarantee needs
n > 2f + 2 sites in a group; a group with fewer is refused, by name.

Example::

    >>> import torch
    >>> stack = torch.tensor([[1.0], [2.0], [3.0], [100.0]])
    >>> coordinate_median(stack).item(), trimmed_mean(stack, 0.25).item()
    (2.5, 2.5)
    >>> krum(torch.tensor([[0.0], [2.0], [3.0], [3.5], [100.0]]), byzantine=1).item()
    3.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedmeta.fl.aggregation import FlatState, Group

RULES = ("median", "trimmed_mean", "krum", "multikrum")


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Median of each column of ``stack`` (sites x coordinates); the mean of the middle two for even n."""
    n = stack.shape[0]
    ordered = stack.sort(dim=0).values
    return ordered[(n - 1) // 2 : n // 2 + 1].mean(dim=0)


def trimmed_mean(stack: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per column, the mean after dropping ``ceil(fraction * n)`` values at each end (at most down to the median)."""
    n = stack.shape[0]
    # ceil, not floor: a head that only three sites share must still lose its extremes.
    k = min(math.ceil(fraction * n), (n - 1) // 2)
    ordered = stack.sort(dim=0).values
    return ordered[k : n - k].mean(dim=0)


def krum_scores(stack: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Each row's summed squared distance to its ``n - f - 2`` nearest other rows (at least one)."""
    n = stack.shape[0]
    distances = torch.cdist(stack, stack).pow(2)
    neighbours = max(1, min(n - byzantine - 2, n - 1))
    # Row i's own zero distance sorts first; skip it.
    return distances.sort(dim=1).values[:, 1 : neighbours + 1].sum(dim=1)


def krum(stack: torch.Tensor, byzantine: int, select: int = 1) -> torch.Tensor:
    """The mean of the ``select`` rows with the lowest Krum scores (``select = 1``: Krum itself)."""
    if stack.shape[0] == 1:
        return stack[0]
    best = krum_scores(stack, byzantine).argsort()[: max(1, min(select, stack.shape[0]))]
    return stack[best].mean(dim=0)


class TooFewHoldersError(ValueError):
    """A group with too few sites for Krum's guarantee (n > 2f + 2)."""


def krum_holders_needed(byzantine: int) -> int:
    """The fewest sites Krum and Multi-Krum need to tolerate ``byzantine`` attackers: 2f + 3."""
    return 2 * byzantine + 3


def robust_mean(groups: Sequence[Group], rule: str, trim_fraction: float = 0.2, byzantine: int = 1, select: int | None = None) -> tuple[FlatState, list[str]]:
    """Combine each group's holders with ``rule`` (one of :data:`RULES`).

    Returns the combined update and the groups left out: under Krum a group
    held by ``n <= 2f + 2`` sites has no guarantee, so it is not updated this
    round (and said so) rather than silently combined.
    """
    if rule not in RULES:
        raise ValueError(f"unknown robust rule {rule!r}; choose one of {', '.join(RULES)}")
    out: FlatState = {}
    refused: list[str] = []
    for group in groups:
        holders, keys = group.holders, group.keys
        if rule in ("krum", "multikrum") and len(holders) < krum_holders_needed(byzantine):
            refused.append(
                f"{group.name}: {len(holders)} site(s) hold it; {rule} with aggregation.byzantine_sites = {byzantine} needs "
                f"at least {krum_holders_needed(byzantine)} (n > 2f + 2)"
            )
            continue
        shapes = [holders[0].update[k].shape for k in keys]
        stack = torch.stack([torch.cat([u.update[k].reshape(-1).float() for k in keys]) for u in holders])
        if rule == "median":
            combined = coordinate_median(stack)
        elif rule == "trimmed_mean":
            combined = trimmed_mean(stack, trim_fraction)
        elif rule == "krum":
            combined = krum(stack, byzantine)
        else:
            combined = krum(stack, byzantine, select or max(1, len(holders) - byzantine))
        for key, piece, shape in zip(keys, combined.split([math.prod(s) for s in shapes]), shapes):
            out[key] = piece.reshape(shape)
    return out, refused
