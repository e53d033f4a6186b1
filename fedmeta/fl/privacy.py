"""Client-level differential privacy: clipping, Gaussian noise and the (epsilon, delta) account.

The protected unit is a **site**: a neighbouring federation differs in one
site's entire data, so the guarantee covers everything a site contributes,
not only a row. The mechanism (DP-FedAvg, McMahan et al. 2018):

1. each site clips its whole update (body and heads together) to L2 norm C
   (:func:`clip_update`); the server clips again whatever it can see, so a
   site that skips it gains nothing;
2. the server sums the clipped updates with equal site weights and adds
   N(0, (sigma C)^2) to every coordinate of the sum (:func:`noisy_mean`);
3. :class:`PrivacyAccount` composes one sampled Gaussian release per round
   with Flower's Renyi-DP accountant (backed by Google's ``dp-accounting``)
   and reports the epsilon spent at the run's delta.

Example::

    >>> account = PrivacyAccount(noise_multiplier=1.0, delta=1e-5, sample_size=10, population=100)
    >>> account.spend()
    >>> round(account.epsilon, 2)
    2.28
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from flwr.serverapp import RdpAccountant
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod

FlatState = dict[str, torch.Tensor]


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a whole update, over every key."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[FlatState, float]:
    """``update`` scaled to L2 norm at most ``clip_norm``; also returns the norm before clipping."""
    norm = update_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: t * scale for k, t in update.items()}, norm


def noisy_mean(updates: Sequence[Mapping[str, torch.Tensor]], std: float, generator: torch.Generator) -> FlatState:
    """Per key, (sum of the sites that sent it + N(0, std^2)) / their count.

    Sites weigh equally: with example weights, one large site would move the
    mean by more than C / n and the noise would not cover it.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for update in updates:
        for key, t in update.items():
            sums[key] = sums[key] + t.double() if key in sums else t.double().clone()
            counts[key] = counts.get(key, 0) + 1
    out = {}
    for key, total in sums.items():
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float64) * std if std > 0 else 0.0
        out[key] = ((total + noise) / counts[key]).float()
    return out


class PrivacyBudgetExceeded(RuntimeError):
    """The next round would spend more epsilon than ``privacy.max_epsilon``."""


class PrivacyAccount:
    """The (epsilon, delta) a run has spent: one sampled Gaussian release per aggregated round.

    Sites are sampled uniformly without replacement (``sample_size`` of
    ``population``), the "replace one site" neighbouring relation, RDP
    composition converted to (epsilon, delta) at ``delta``.
    """

    def __init__(self, noise_multiplier: float, delta: float, sample_size: int, population: int, max_epsilon: float | None = None):
        if noise_multiplier <= 0:
            raise ValueError("privacy accounting needs noise_multiplier > 0")
        self.noise_multiplier, self.delta, self.max_epsilon = noise_multiplier, delta, max_epsilon
        self.event = GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=sample_size, population_size=population)
        sampling = SamplingMethod.WITHOUT_REPLACEMENT if sample_size < population else SamplingMethod.NO_AMPLIFICATION
        relation = NeighboringRelation.REPLACE_ONE if sample_size < population else NeighboringRelation.ADD_OR_REMOVE_ONE
        self._accountant = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population, neighboring_relation=relation, sampling_method=sampling))

    @property
    def epsilon(self) -> float:
        return 0.0 if self.rounds == 0 else self._accountant.get_epsilon(self.delta)

    @property
    def rounds(self) -> int:
        return self._accountant.num_releases

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon after ``rounds`` more releases, without spending them."""
        if rounds <= 0:
            return self.epsilon
        projected = PrivacyAccount(self.noise_multiplier, self.delta, self.event.sample_size, self.event.population_size)
        projected._accountant.load_state_dict(self._accountant.state_dict())
        projected._accountant.compose(self.event, rounds)
        return projected.epsilon

    def check_budget(self) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if one more round would pass ``max_epsilon``."""
        if self.max_epsilon is not None and self.epsilon_after(1) > self.max_epsilon:
            raise PrivacyBudgetExceeded(
                f"privacy budget reached: {self.rounds} round(s) spent epsilon = {self.epsilon:.3f} (delta = {self.delta:g}); "
                f"one more would reach {self.epsilon_after(1):.3f} > privacy.max_epsilon = {self.max_epsilon:g}"
            )

    def spend(self) -> None:
        self._accountant.compose(self.event)

    def state_dict(self) -> dict:
        return self._accountant.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._accountant.load_state_dict(state)

    def summary(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "rounds": self.rounds, "noise_multiplier": self.noise_multiplier, "accountant": "rdp"}


def noise_multiplier_for(epsilon: float, delta: float, rounds: int, sample_size: int, population: int) -> float:
    """The smallest noise multiplier (to 1%) whose ``rounds`` releases spend at most ``epsilon``."""
    def spent(sigma: float) -> float:
        account = PrivacyAccount(sigma, delta, sample_size, population)
        return account.epsilon_after(rounds)

    low, high = 0.05, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon = {epsilon} in {rounds} rounds")
    while high - low > 0.01 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > epsilon else (low, mid)
    return high
