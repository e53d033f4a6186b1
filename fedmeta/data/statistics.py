"""The federation's normalization from sites' sums, with every site's influence bounded.

A site reports, per numeric feature, the count, sum and sum of squares of its
training rows. Those are claims: one site answering ``[1e9, 1e15, 1e21]``
would move a plain pooled mean to 10^6. :func:`combine_sums_by_site` therefore
works on per-site means and variances and bounds what any one site can do:

1. **weight**: a site's count weighs at most :data:`COUNT_CAP` times the
   median site's count (a site claiming 10^9 rows weighs like a large
   hospital, not like the federation);
2. **far answers are dropped**: a site whose mean lies more than
   :data:`FAR` robust spreads from the median site mean, or whose std exceeds
   :data:`FAR` spreads (spread: the larger of the median site std and the
   MAD of the site means), is left out of the normalization with a warning
   naming it. Only gross lies are caught this way; a feature on which the
   sites' spread is zero (a pixel blank almost everywhere) is never judged;
3. **trimmed combination**: per feature, the :data:`TRIM` share of sites
   with the lowest and the highest means is dropped, and of the rest the
   share with the highest variances; the pooled mean and population std
   (within plus between sites) are taken over the rest. Below
   ``1 / TRIM`` sites nothing is trimmed and, without far answers, the
   result is the exact pooled mean and std of all rows.

So a minority of liars moves each statistic to at most the range the
honest sites span. A site left out still trains; it is encoded like
everyone else. If more than half the sites are far, no majority agrees and
:class:`StatisticsError` names them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

log = logging.getLogger("flwr.fedmeta")

#: Share of sites trimmed at each end of a feature's site means (and at the top of its site variances).
TRIM = 0.1
#: A site mean further than this many robust spreads from the median site mean is left out.
FAR = 100.0
#: A site weighs at most this many times the median site's count.
COUNT_CAP = 10.0

Sums = Mapping[str, Sequence[float]]


class StatisticsError(ValueError):
    """The sites' sums cannot be combined: no majority of them agrees."""


def _moments(sums: Mapping[str, Sums], feature: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per site: count, mean and population variance of ``feature``."""
    n = np.array([float(s[feature][0]) for s in sums.values()])
    mean = np.array([float(s[feature][1]) for s in sums.values()]) / n
    var = np.array([float(s[feature][2]) for s in sums.values()]) / n - mean**2
    return n, mean, np.maximum(var, 0.0)


def far_sites(sums: Mapping[str, Sums]) -> dict[str, str]:
    """``{site: why}`` for the sites whose answer lies far from the others' on some feature."""
    sites = list(sums)
    features = sorted({f for s in sums.values() for f in s})
    far: dict[str, str] = {}
    for feature in features:
        _, mean, var = _moments(sums, feature)
        std = np.sqrt(var)
        centre = float(np.median(mean))
        spread = max(float(np.median(std)), 1.4826 * float(np.median(np.abs(mean - centre))))
        if not spread > 0:
            continue  # every site states nearly the same constant: trimming alone bounds a liar here
        for site, m, sd in zip(sites, mean, std):
            if site in far:
                continue
            if abs(m - centre) > FAR * spread:
                far[site] = f"{feature} mean {m:.6g} against the sites' median {centre:.6g} (spread {spread:.3g})"
            elif sd > FAR * spread:
                far[site] = f"{feature} std {sd:.6g} against the sites' spread {spread:.3g}"
    return far


def _trimmed_pooled(n: np.ndarray, mean: np.ndarray, var: np.ndarray, totals: np.ndarray) -> tuple[float, float]:
    cut = int(math.floor(TRIM * len(n)))
    if cut == 0 and np.all(n <= COUNT_CAP * float(np.median(n))):
        # Nothing to trim or cap: the pooled statistics of all rows, from the summed sums (as numpy computes them).
        total_n, total_s, total_ss = totals
        return float(total_s / total_n), float(np.sqrt(max(total_ss / total_n - (total_s / total_n) ** 2, 0.0)))
    keep = np.argsort(mean, kind="stable")[cut : len(n) - cut]
    w = np.minimum(n, COUNT_CAP * float(np.median(n)))
    pooled_mean = float(np.sum(w[keep] * mean[keep]) / np.sum(w[keep]))
    # Variances: the same sites, less the highest-variance share (a site inflating its sum of squares).
    keep = keep[np.argsort(var[keep], kind="stable")[: len(keep) - cut]] if cut else keep
    within_and_between = var[keep] + (mean[keep] - pooled_mean) ** 2
    return pooled_mean, float(np.sqrt(np.sum(w[keep] * within_and_between) / np.sum(w[keep])))


def combine_sums_by_site(sums: Mapping[str, Sums]) -> dict[str, tuple[float, float]]:
    """``{feature: (mean, std)}`` from ``{site: {feature: (count, sum, sum_sq)}}``, robust to a minority of liars.

    Every site must answer for the same features (the caller checks); counts
    must be at least 2. A constant feature gets std 1 (it only shifts to 0).

    >>> honest = {f"h{i}": {"age": (100, 100.0 * (60 + i), 100.0 * ((60 + i) ** 2 + 15**2))} for i in range(9)}
    >>> stats = combine_sums_by_site({**honest, "liar": {"age": (1e9, 1e15, 1e21)}})
    >>> round(stats["age"][0], 1), round(stats["age"][1], 1)
    (64.0, 15.2)
    """
    if not sums:
        return {}
    far = far_sites(sums)
    for site, why in sorted(far.items()):
        log.warning("normalization: site %s left out: its sums are far from the other sites' (%s)", site, why)
    if 2 * len(far) > len(sums):
        raise StatisticsError(
            f"no majority of sites agrees on the normalization: {len(far)} of {len(sums)} answers are far from the median "
            f"({', '.join(sorted(far)[:5])}); check that every site maps the same features in the same units"
        )
    kept = {site: s for site, s in sums.items() if site not in far}
    out = {}
    for feature in sorted({f for s in kept.values() for f in s}):
        n, mean, var = _moments(kept, feature)
        if n.sum() <= 1:
            continue
        totals = np.sum([np.asarray(s[feature], dtype=np.float64) for s in kept.values()], axis=0)
        m, sd = _trimmed_pooled(n, mean, var, totals)
        out[feature] = (m, sd if sd > 1e-12 * max(1.0, abs(m)) else 1.0)
    return out


def combine_sums(sums) -> dict[str, tuple[float, float]]:
    """:func:`combine_sums_by_site` over an iterable of per-site sums (sites named by position).

    >>> combine_sums([{"age": (2, 100.0, 5000.0)}, {"age": (2, 140.0, 9800.0)}])
    {'age': (60.0, 10.0)}
    """
    return combine_sums_by_site({f"site {i}": dict(s) for i, s in enumerate(sums)})
