"""Client-level differential privacy: clipping, Gaussian noise and the (epsilon, delta) account.

The protected unit is a **site**: a neighbouring federation differs in one
site's entire data, so the guarantee covers everything a site contributes,
not only a row. The mechanism (DP-FedAvg, McMahan et al. 2018):

1. each site clips its whole update (body and heads together) to L2 norm C
   (:func:`clip_update`); the server clips again whatever it can see, so a
   site that skips it gains nothing;
2. the server sums each group's clipped updates with equal site weights and
   adds N(0, (sigma C)^2) to every coordinate of the sum (:func:`noisy_mean`),
   drawing the noise from the operating system's CSPRNG (:func:`secure_normal`);
3. :class:`PrivacyAccount` composes one Gaussian release per round with
   Google's ``dp-accounting`` and reports epsilon at delta, twice (below).

The account, stated once (docs/privacy-and-security.md repeats it):

- **relation**: replace-one (a neighbouring federation swaps one site's data
  for another's), the relation under which fixed-size sampling is analysed;
- **sampling**: ``m`` of ``n`` sites uniformly without replacement, where
  ``n`` is the population the round actually sampled from (the connected
  sites) and ``m`` the sample it drew (``server.min_sites`` may raise it);
  with ``m = n`` there is no amplification. Under DP the sample comes from
  the coordinator's secret generator (:mod:`fedmeta.fl.sampling`);
- **sensitivity**: swapping one site moves a clipped sum by up to
  ``2 C`` (its update ``u`` leaves, ``u'`` arrives, ``|u - u'| <= 2C``), so
  noise of std ``sigma C`` is a Gaussian mechanism with noise multiplier
  ``z = sigma / 2`` relative to the sensitivity (:data:`SENSITIVITY`).

Two figures, because who sees the sample matters:

- :attr:`PrivacyAccount.epsilon`, against anyone who sees only the released
  models: the tighter of dp-accounting's RDP accountant over the sampled
  releases (``SampledWithoutReplacementDpEvent``; its PLD accountant does
  not support that event) and the exact epsilon of the unsampled Gaussian
  composed over every round (dp-accounting's ``GaussianPrivacyLoss``: ``T``
  releases of multiplier ``z`` are one Gaussian of sensitivity ``sqrt(T)``).
  With full participation only the exact figure applies. Valid only while
  the sample is secret;
- :attr:`PrivacyAccount.epsilon_known_sample`, against a participating site
  that learns the sample (SecAgg+ tells every sampled site who else was
  sampled): no amplification, the exact Gaussian composed over the rounds
  in which the most-sampled site took part.

Example (50 of 500 sites, sigma = 1.36, 20 rounds, delta = 1e-5)::

    >>> account = PrivacyAccount(noise_multiplier=1.36, delta=1e-5, sample_size=50, population=500)
    >>> for _ in range(20):
    ...     account.spend()
    >>> round(account.epsilon, 2)
    13.33
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedmeta.fl.aggregation import FlatState, Group

#: L2 sensitivity of a sum of updates clipped to C, in units of C, under the replace-one relation.
SENSITIVITY = 2.0


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a whole update, over every key."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[FlatState, float]:
    """``update`` scaled to L2 norm at most ``clip_norm``; also returns the norm before clipping."""
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ValueError("cannot clip a non-finite update (its norm is not a number)")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: t * scale for k, t in update.items()}, norm


def secure_normal(shape: Sequence[int], std: float) -> torch.Tensor:
    """N(0, std^2) entries (float64) from the operating system's CSPRNG, by the Box-Muller transform.

    A seeded pseudo-random generator would let whoever learns or guesses its
    state subtract the noise; ``secrets`` reads the kernel's CSPRNG.
    """
    n = math.prod(shape)
    pairs = (n + 1) // 2
    raw = np.frombuffer(secrets.token_bytes(16 * pairs), dtype=np.uint64)
    # 53 random bits per uniform, shifted off zero so the logarithm is finite.
    uniform = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    radius = np.sqrt(-2.0 * np.log(uniform[:pairs]))
    angle = 2.0 * math.pi * uniform[pairs:]
    normal = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
    return torch.from_numpy(normal * std).reshape(tuple(shape))


def noisy_mean(groups: Sequence[Group], std: float, noise=secure_normal) -> FlatState:
    """Per group and key, (sum over the group's holders + N(0, std^2)) / their count.

    Sites weigh equally: with example weights, one large site would move the
    mean by more than C / n and the noise would not cover it. ``noise(shape,
    std)`` draws the noise (tests pass a seeded one).
    """
    out: FlatState = {}
    for group in groups:
        for key in group.keys:
            total = sum(u.update[key].double() for u in group.holders)
            if std > 0:
                total = total + noise(tuple(total.shape), std)
            out[key] = (total / len(group.holders)).float()
    return out


class PrivacyBudgetExceeded(RuntimeError):
    """The next round would spend more epsilon than ``privacy.max_epsilon``."""


def _release(noise_multiplier: float, sample_size: int, population: int):
    """One round's release (a ``dp_accounting.DpEvent``): the Gaussian mechanism on the sum, sampled ``sample_size`` of ``population``."""
    import dp_accounting  # 0.7 s of imports (scipy.signal): only where epsilon is computed, not in every site's process

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / SENSITIVITY)
    if sample_size >= population:
        return gaussian
    return dp_accounting.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The exact epsilon at ``delta`` of ``rounds`` unsampled releases (no amplification).

    ``rounds`` Gaussian mechanisms of multiplier ``z = sigma / 2`` compose
    into one of sensitivity ``sqrt(rounds)``; dp-accounting's
    ``GaussianPrivacyLoss`` gives its delta at any epsilon exactly, and the
    epsilon is found by bisection (to 1e-9). This equals dp-accounting's PLD
    accountant on the same events, in a millisecond instead of seconds.
    """
    if rounds <= 0:
        return 0.0
    from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss

    loss = GaussianPrivacyLoss(standard_deviation=noise_multiplier / SENSITIVITY, sensitivity=math.sqrt(rounds))
    low, high = 0.0, 1.0
    while loss.get_delta_for_epsilon(high) > delta:
        low, high = high, 2 * high
    while high - low > 1e-9 * max(high, 1.0):
        mid = (low + high) / 2
        low, high = (mid, high) if loss.get_delta_for_epsilon(mid) > delta else (low, mid)
    return high


class PrivacyAccount:
    """The (epsilon, delta) a run has spent: one (sampled) Gaussian release per aggregated round.

    ``sample_size`` and ``population`` are the defaults for :meth:`spend` and
    :meth:`check_budget`; a round passes the sample it actually drew, and the
    names of the sites in it (which only the coordinator knows under DP).
    The state is the list of releases and each site's rounds, so a checkpoint
    restores it exactly. ``max_epsilon`` bounds :attr:`epsilon`, the figure
    against whoever sees only the released models.
    """

    def __init__(self, noise_multiplier: float, delta: float, sample_size: int, population: int, max_epsilon: float | None = None):
        if noise_multiplier <= 0:
            raise ValueError("privacy accounting needs noise_multiplier > 0")
        if not 1 <= sample_size <= population:
            raise ValueError(f"privacy accounting needs 1 <= sample_size <= population, got {sample_size} of {population}")
        self.noise_multiplier, self.delta, self.max_epsilon = noise_multiplier, delta, max_epsilon
        self.sample_size, self.population = sample_size, population
        self.releases: list[tuple[int, int]] = []  # (sample_size, population) of each spent round
        self.participation: dict[str, int] = {}  # site -> spent rounds it was sampled in
        self.unattributed = 0  # spent rounds whose sample was not named: counted against every site

    @property
    def rounds(self) -> int:
        return len(self.releases)

    @property
    def epsilon(self) -> float:
        """Against anyone who sees only the released models (amplification by the secret sample)."""
        return self._epsilon(self.releases)

    @property
    def epsilon_known_sample(self) -> float:
        """Against a participating site that knows who was sampled: no amplification, over the most-sampled site's rounds."""
        return gaussian_epsilon(self.noise_multiplier, self.most_sampled_rounds, self.delta)

    @property
    def most_sampled_rounds(self) -> int:
        return max(self.participation.values(), default=0) + self.unattributed

    def _epsilon(self, releases: list[tuple[int, int]]) -> float:
        if not releases:
            return 0.0
        unsampled = gaussian_epsilon(self.noise_multiplier, len(releases), self.delta)
        if all(m >= n for m, n in releases):
            return unsampled
        import dp_accounting
        from dp_accounting import rdp

        accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        counts: dict[tuple[int, int], int] = {}
        for release in releases:
            counts[release] = counts.get(release, 0) + 1
        for (m, n), count in counts.items():
            accountant.compose(_release(self.noise_multiplier, m, n), count)
        # Both bound the same releases; RDP's conversion is loose where sampling amplifies little.
        return min(float(accountant.get_epsilon(self.delta)), unsampled)

    def _round(self, sample_size: int | None, population: int | None) -> tuple[int, int]:
        m = self.sample_size if sample_size is None else sample_size
        n = self.population if population is None else population
        if not 1 <= m <= n:
            raise ValueError(f"a round cannot sample {m} of {n} sites")
        return m, n

    def epsilon_after(self, rounds: int, sample_size: int | None = None, population: int | None = None) -> float:
        """Epsilon after ``rounds`` more releases of ``sample_size`` of ``population``, without spending them."""
        return self._epsilon(self.releases + [self._round(sample_size, population)] * max(rounds, 0))

    def check_budget(self, sample_size: int | None = None, population: int | None = None) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if one more such round would pass ``max_epsilon``."""
        if self.max_epsilon is None:
            return
        after = self.epsilon_after(1, sample_size, population)
        if after > self.max_epsilon:
            m, n = self._round(sample_size, population)
            raise PrivacyBudgetExceeded(
                f"privacy budget reached: {self.rounds} round(s) spent epsilon = {self.epsilon:.3f} (delta = {self.delta:g}); "
                f"one more round sampling {m} of {n} sites would reach {after:.3f} > privacy.max_epsilon = {self.max_epsilon:g}"
            )

    def spend(self, sample_size: int | None = None, population: int | None = None, sites: Sequence[str] | None = None) -> None:
        """Record one release; ``sites`` names the sample (unnamed, the round counts against every site)."""
        m, n = self._round(sample_size, population)
        if sites is not None and len(set(sites)) != m:
            raise ValueError(f"a round sampling {m} sites names {len(set(sites))}")
        self.releases.append((m, n))
        if sites is None:
            self.unattributed += 1
        else:
            for site in set(sites):
                self.participation[site] = self.participation.get(site, 0) + 1

    def state_dict(self) -> dict:
        return {"releases": [list(r) for r in self.releases], "participation": dict(self.participation), "unattributed": self.unattributed}

    def load_state_dict(self, state: dict) -> None:
        if "releases" not in state:
            raise ValueError("the checkpoint's privacy account was written by an older fedmeta (before the replace-one sensitivity fix); start a new run")
        self.releases = [(int(m), int(n)) for m, n in state["releases"]]
        self.participation = {str(k): int(v) for k, v in state.get("participation", {}).items()}
        # A checkpoint from before samples were named: every round counts against every site.
        self.unattributed = int(state.get("unattributed", self.rounds if "participation" not in state else 0))

    def summary(self) -> dict:
        sampled = any(m < n for m, n in self.releases)
        return {
            "epsilon": self.epsilon, "epsilon_known_sample": self.epsilon_known_sample, "delta": self.delta, "rounds": self.rounds,
            "most_sampled_rounds": self.most_sampled_rounds, "noise_multiplier": self.noise_multiplier,
            "accountant": "min(rdp, exact gaussian)" if sampled else "exact gaussian (pld)",
            "relation": "replace-one", "sensitivity": f"{SENSITIVITY:g} x clip_norm",
            "sampling": sorted({f"{m} of {n}" for m, n in self.releases}),
        }


def noise_multiplier_for(epsilon: float, delta: float, rounds: int, sample_size: int, population: int) -> float:
    """The smallest noise multiplier (to 1%) whose ``rounds`` releases spend at most ``epsilon``.

    >>> sigma = noise_multiplier_for(4.0, 1e-5, rounds=20, sample_size=50, population=500)
    >>> PrivacyAccount(sigma, 1e-5, 50, 500).epsilon_after(20) <= 4.0
    True
    """
    def spent(sigma: float) -> float:
        return PrivacyAccount(sigma, delta, sample_size, population).epsilon_after(rounds)

    low, high = 0.05, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon = {epsilon} in {rounds} rounds")
    while high - low > 0.01 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > epsilon else (low, mid)
    return high
