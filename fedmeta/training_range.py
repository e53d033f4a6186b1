"""The range of each numeric feature seen in training, and which inputs fall outside it.

A site model's manifest records, per numeric feature, the smallest and the
largest value among the site rows that trained it (``feature_ranges``; the
rows stay at the site and so does the manifest). A model answers any input
it accepts, but far outside that range it extrapolates: the server and
:mod:`fedmeta.predict` still answer such rows and name, per row, the
features that lie outside, so an app can tell an age of 1e30 from an
ordinary patient.

Ranges are computed from the encoded training rows (standardized float32
values, mapped back to raw units), so each bound is widened by
:data:`SLACK` of its scale: a training row is never flagged for float
rounding.

>>> check = RangeCheck.from_manifest({"age": [18.0, 97.0]}, ["age", "sodium"])
>>> check.flagged({"age": np.array([40.0, 1e30], np.float32), "sodium": np.array([140.0, 135.0], np.float32)}, 2)
[{'row': 1, 'features': ['age']}]
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SLACK = 1e-5


def widened(values: np.ndarray, mean: float, std: float) -> list[float]:
    """``[min, max]`` of one feature's raw values, widened by :data:`SLACK` of their scale (std or magnitude)."""
    lo, hi = float(values.min()), float(values.max())
    return [lo - SLACK * max(std, abs(lo)), hi + SLACK * max(std, abs(hi))]


def merged(*ranges: Mapping[str, list[float]] | None) -> dict[str, list[float]] | None:
    """The union of ranges, feature by feature (a head's range: its parent's rows and its own)."""
    known = [r for r in ranges if r]
    if not known:
        return None
    out: dict[str, list[float]] = {}
    for r in known:
        for name, (lo, hi) in r.items():
            seen = out.get(name)
            out[name] = [lo, hi] if seen is None else [min(seen[0], lo), max(seen[1], hi)]
    return out


class RangeCheck:
    """Flags, per row, the numeric features whose value lies outside the training range."""

    def __init__(self, names: list[str], lo: np.ndarray, hi: np.ndarray):
        self.names = names
        self.lo = lo.astype(np.float32)[:, None]
        self.hi = hi.astype(np.float32)[:, None]
        self._lo, self._hi = self.lo.ravel().tolist(), self.hi.ravel().tolist()

    @classmethod
    def from_manifest(cls, ranges: Mapping[str, list[float]] | None, numeric: list[str]) -> RangeCheck | None:
        """The check for a model's numeric features, or None when its manifest records no ranges (older models)."""
        if not ranges:
            return None
        names = [n for n in numeric if n in ranges]
        lo = np.array([ranges[n][0] for n in names], np.float64)
        hi = np.array([ranges[n][1] for n in names], np.float64)
        return cls(names, lo, hi)

    def _matrix(self, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """The checked features' values, feature-major, in float32 (the precision the bounds and the model use)."""
        return np.concatenate([np.asarray(columns[name], np.float32).reshape(n) for name in self.names]).reshape(len(self.names), n)

    def all_inside(self, columns: Mapping[str, np.ndarray], n: int) -> bool:
        """True when no row of ``columns`` has a value outside the range, i.e. when :meth:`flagged` would be ``[]`` (a NaN may answer False).

        The server asks this once for all the rows of a batch of requests, and
        calls :meth:`flagged` per request only when it is False.

        >>> check = RangeCheck.from_manifest({"age": [18.0, 97.0]}, ["age"])
        >>> check.all_inside({"age": np.array([40.0, 97.0], np.float32)}, 2), check.all_inside({"age": np.array([40.0, 98.0], np.float32)}, 2)
        (True, False)
        """
        if not self.names:
            return True
        try:
            values = np.concatenate([columns[name] for name in self.names])  # feature-major, as the bounds
        except ValueError:  # a scalar column
            values = None
        if values is None or values.dtype != np.float32 or values.shape != (len(self.names) * n,):  # not the server's columns
            return not self.flagged(columns, n)
        # NaN fails every comparison, so it answers False here and flagged() decides (not flagged, as before).
        if n == 1:  # one row: Python's comparisons cost less than numpy's calls; float32 to float is exact, so they agree
            return all(lo <= x <= hi for x, lo, hi in zip(values.tolist(), self._lo, self._hi))
        return bool(((values.reshape(len(self.names), n) >= self.lo) & (values.reshape(len(self.names), n) <= self.hi)).all())

    def flagged(self, columns: Mapping[str, np.ndarray], n: int) -> list[dict]:
        """``[{"row": i, "features": [...]}, ...]`` for the rows with a value outside the range; ``[]`` when none."""
        if not self.names:
            return []
        matrix = self._matrix(columns, n)
        outside = (matrix < self.lo) | (matrix > self.hi)
        if not outside.any():
            return []
        rows = np.flatnonzero(outside.any(0))
        return [{"row": int(i), "features": [self.names[j] for j in np.flatnonzero(outside[:, i])]} for i in rows]


def counts(flagged: list[dict]) -> dict[str, int]:
    """How many flagged values each feature has (for ``/metrics`` and summaries)."""
    out: dict[str, int] = {}
    for row in flagged:
        for name in row["features"]:
            out[name] = out.get(name, 0) + 1
    return out
