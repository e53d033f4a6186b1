"""Near misses between column names: ``mean_radius`` for ``mean radius``, ``Age`` for ``age``, ``creatinin`` for ``creatinine``.

Sites export their files by hand, so one column often arrives under two
spellings. :func:`near_miss` says which known name a column most likely
meant, for "did you mean" hints; it is deliberately strict, because a hint
between two genuinely different columns (``bp_sys`` and ``bp_dia``,
``lab_1`` and ``lab_2``) would send the user the wrong way:

- names equal once case, spaces, underscores, hyphens and dots are set aside
  are the same column;
- otherwise the names (lower-cased, separators as one space) must be at
  least :data:`MIN_SIMILARITY` alike by rapidfuzz's ``fuzz.ratio`` and carry
  the same numbers.

>>> near_miss("mean_radius", ["mean radius", "mean texture"])
'mean radius'
>>> near_miss("bp_sys", ["bp_dia"]) is None
True
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: ``fuzz.ratio`` (0-100) from which two differently spelled names count as one column: a one-letter typo
#: in a name of eight letters or more passes (creatinin, 95), weight/height (83) and age/page (86) do not.
MIN_SIMILARITY = 88.0

_SEPARATORS = re.compile(r"[\s_\-.]+")
_NUMBERS = re.compile(r"\d+")


def spelled(name: str) -> str:
    """``name`` lower-cased, with each run of spaces, underscores, hyphens and dots as one space.

    >>> spelled("  Mean_Radius-2 ")
    'mean radius 2'
    """
    return _SEPARATORS.sub(" ", name.lower()).strip()


def similarity(a: str, b: str) -> float:
    """How alike two column names are, 0-100: 100 for the same name spelled differently."""
    a, b = spelled(a), spelled(b)
    if a.replace(" ", "") == b.replace(" ", ""):
        return 100.0
    if _NUMBERS.findall(a) != _NUMBERS.findall(b):
        return 0.0  # lab_1 and lab_2 are two measurements, however alike their names
    try:
        from rapidfuzz import fuzz
    except ImportError:  # the serving install has no rapidfuzz; there only the spelling rule above applies
        return 0.0
    return float(fuzz.ratio(a, b))


def near_miss(name: str, known: Iterable[str]) -> str | None:
    """The name in ``known`` (other than ``name`` itself) that ``name`` most likely meant, or None."""
    best, score = None, MIN_SIMILARITY
    for candidate in known:
        if candidate == name:
            continue
        s = similarity(name, candidate)
        if s >= score and (best is None or s > score):
            best, score = candidate, s
    return best


def did_you_mean(missing: Iterable[str], available: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the columns in ``missing`` that have a near miss in ``available``, else ``""``.

    >>> did_you_mean(["mean radius"], ["mean_radius", "id"])
    "; did you mean 'mean_radius'?"
    >>> did_you_mean(["age", "ward"], ["Age", "Ward "])
    "; did you mean 'Age' (for 'age'), 'Ward ' (for 'ward')?"
    >>> did_you_mean(["age"], ["id"])
    ''
    """
    available = list(available)
    pairs = [(m, near_miss(m, available)) for m in missing]
    pairs = [(m, hit) for m, hit in pairs if hit is not None]
    if not pairs:
        return ""
    if len(pairs) == 1:
        return f"; did you mean {pairs[0][1]!r}?"
    return "; did you mean " + ", ".join(f"{hit!r} (for {m!r})" for m, hit in pairs) + "?"
