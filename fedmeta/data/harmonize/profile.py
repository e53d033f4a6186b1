"""A site column's local summary: what matching reads from the site's rows, which never leave the site."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedmeta.data.harmonize.vocabulary import concept_words, tokens
from fedmeta.data.mapping import site_values  # the one rule for how mapping.json keys a site value

#: A column with more distinct values than this is not a category (an identifier, a measurement).
MAX_CATEGORIES = 50


@dataclass(frozen=True)
class ColumnProfile:
    """One site column: its name's tokens and concept words, and its values' type, numbers and distinct values with counts."""

    name: str
    present: int  # rows with a value
    tokens: tuple[str, ...]
    words: tuple[str, ...]
    numeric: bool
    numbers: np.ndarray  # the present values as floats (empty unless numeric)
    distinct: dict[str, int]  # site value (as mapping.json keys it) -> rows; empty when more than MAX_CATEGORIES

    @property
    def n_distinct(self) -> int:
        return len(self.distinct) if self.distinct else (len(np.unique(self.numbers)) if self.numeric else MAX_CATEGORIES + 1)


def profile(name: str, column: pd.Series) -> ColumnProfile:
    present = column[column.notna()]
    parsed = pd.to_numeric(present, errors="coerce")
    numeric = len(present) > 0 and bool(parsed.notna().all())
    keys = site_values(column)
    counts = keys.value_counts()
    distinct = {str(k): int(v) for k, v in counts.items()} if len(counts) <= MAX_CATEGORIES else {}
    numbers = parsed.to_numpy(float) if numeric else np.empty(0)
    return ColumnProfile(name, len(present), tokens(name), concept_words(name), numeric, numbers, distinct)


def profiles(frame: pd.DataFrame) -> list[ColumnProfile]:
    return [profile(str(c), frame[c]) for c in frame.columns]
