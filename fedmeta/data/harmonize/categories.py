"""Categories: each site value of a categorical column mapped to a schema value, with how sure.

Evidence, strongest first: the value is a schema value (case aside); the
schema's ``category_synonyms`` or the built-in spellings name it (``male``,
``männlich``, ``hombre`` for ``M``; ``Y``/``true``/``ja`` for ``yes``); it
is the initials of a schema value's words (``TA`` = ``typical angina``) or a
prefix of one (``emerg``); fuzzy similarity. Numeric codes (``1..4``) carry
no meaning of their own: they are matched only by a published code book
(``category_synonyms``), or for yes/no and ``0``/``1`` classes by the
universal 0 = no, 1 = yes; otherwise they are mapped in the schema's order
and flagged for review.

>>> m = map_categories(["TA", "ATA", "NAP", "ASY"], ["typical", "atypical", "non-anginal", "asymptomatic"])
>>> m.values, m.confident
({'TA': 'typical', 'ATA': 'atypical', 'NAP': 'non-anginal', 'ASY': 'asymptomatic'}, True)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedmeta.data.harmonize.vocabulary import fold

#: Built-in spellings of common category values (folded), beside the schema's own ``category_synonyms``.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "m": ("male", "man", "men", "masculine", "maennlich", "mannlich", "mann", "hombre", "masculino", "homme", "masculin", "h"),
    "f": ("female", "woman", "women", "feminine", "weiblich", "frau", "w", "mujer", "femenino", "femme", "feminin"),
    "male": ("m", "man", "maennlich", "mannlich", "hombre", "masculino", "homme"),
    "female": ("f", "w", "woman", "weiblich", "mujer", "femenino", "femme"),
    "yes": ("1", "y", "true", "t", "ja", "j", "si", "oui", "o", "present", "positive", "pos"),
    "no": ("0", "n", "false", "nein", "non", "absent", "negative", "neg"),
    "1": ("yes", "y", "true", "t", "ja", "si", "oui", "positive", "pos", "died", "dead", "deceased", "fraud", "disease", "readmitted"),
    "0": ("no", "n", "false", "f", "nein", "non", "negative", "neg", "alive", "survived", "legit", "legitimate", "genuine", "healthy", "normal"),
    "typical": ("typical angina", "ta", "typisch", "tipica", "typique"),
    "atypical": ("atypical angina", "ata", "atypisch", "atipica", "atypique"),
    "non-anginal": ("non anginal pain", "nap", "nonanginal", "non anginal", "nicht anginos", "no anginoso", "non angineux"),
    "asymptomatic": ("asy", "asymptomatisch", "asintomatico", "asymptomatique", "none"),
    "emergency": ("er", "ed", "emerg", "notfall", "urgencia", "urgence", "emergencia"),
    "urgent": ("urg", "dringend", "urgente"),
    "elective": ("elec", "elektiv", "geplant", "programado", "electivo", "programmee", "planned"),
    "medical": ("med", "medicine", "innere", "innere medizin", "medicina", "medecine", "internal medicine"),
    "surgical": ("surg", "surgery", "chirurgie", "cirugia", "chirurgical"),
    "cardiology": ("card", "cardio", "kardiologie", "cardiologia", "cardiologie"),
    "icu": ("intensive care", "intensivstation", "its", "uci", "rea", "reanimation", "intensive care unit", "micu"),
    "grocery": ("groceries", "supermarket", "lebensmittel", "supermercado", "alimentation", "5411"),
    "fuel": ("gas", "petrol", "gas station", "tankstelle", "gasolinera", "carburant", "5541"),
    "restaurant": ("restaurants", "dining", "food", "gastronomie", "restaurante", "5812"),
    "travel": ("airline", "travel agency", "reise", "reisen", "viaje", "viajes", "voyage", "4722"),
    "online": ("ecommerce", "e commerce", "internet", "web", "en linea", "en ligne", "5969"),
    "electronics": ("electronic", "elektronik", "electronica", "electronique", "5732"),
}

_NUMBER = re.compile(r"^-?\d+(\.0+)?$")


def _key(value: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", fold(str(value))).strip()


@dataclass(frozen=True)
class CategoryMapping:
    """Site value -> schema value, a confidence, whether a person should look, and why."""

    values: dict[str, str]
    confidence: float
    confident: bool
    evidence: str
    share_mapped: float  # of the site's distinct values


@lru_cache(maxsize=1)
def _spellings() -> dict[str, tuple[str, ...]]:
    return {_key(k): v for k, v in SPELLINGS.items()}


def _initials(words: str) -> str:
    return "".join(w[0] for w in words.split() if w)


def value_score(site_value: str, category: str, synonyms: Sequence[str] = ()) -> float:
    """How surely a site value spells a schema value: 1 the same or a published synonym, less for initials, prefixes, near spellings."""
    v, c = _key(site_value), _key(category)
    if not v:
        return 0.0
    if v == c or v in {_key(s) for s in synonyms}:
        return 1.0
    spelled = {_key(s) for s in _spellings().get(c, ())}
    if v in spelled:
        return 0.95
    names = {c} | spelled
    if any(len(n.split()) > 1 and v.replace(" ", "") == _initials(n) for n in names):
        return 0.9
    if len(v) >= 3 and any(n.startswith(v) or (len(n) >= 3 and v.startswith(n)) for n in names if not _NUMBER.match(n)):
        return 0.85
    from rapidfuzz import fuzz

    best = max(fuzz.ratio(v, n) for n in names) / 100
    return best * 0.8 if best >= 0.75 else 0.0


def map_categories(site_values: Sequence[str], categories: Sequence[str], synonyms: Mapping[str, Sequence[str]] | None = None,
                   counts: Sequence[int] | None = None) -> CategoryMapping:
    """Map each distinct site value to a schema value (see the module docstring).

    ``counts`` (rows per site value) weighs the share of rows mapped; without it each value counts once.
    """
    from scipy.optimize import linear_sum_assignment

    synonyms = synonyms or {}
    site_values = [str(v) for v in site_values]
    if not site_values:
        return CategoryMapping({}, 0.0, False, "no values", 0.0)
    scores = np.array([[value_score(v, c, synonyms.get(c, ())) for c in categories] for v in site_values])
    values: dict[str, str] = {}
    sure: list[float] = []
    # One schema value per site value; several site spellings of one value (M, male) are allowed, so each row picks its best
    # unless two values tie, where the one-to-one assignment decides.
    rows, cols = linear_sum_assignment(-scores) if len(site_values) <= len(categories) else (np.arange(len(site_values)), scores.argmax(axis=1))
    for r, c in zip(rows, cols):
        if scores[r, c] >= 0.6:
            values[site_values[r]] = categories[c]
            others = np.delete(scores[r], c)
            margin = scores[r, c] - (others.max() if len(others) else 0.0)
            sure.append(min(scores[r, c], 0.65 + margin))  # a near tie (fuzzy spellings of two values) is never confident
    weights = np.ones(len(site_values)) if counts is None else np.asarray(counts, float)
    mapped = np.array([v in values for v in site_values])
    share = float(weights[mapped].sum() / weights.sum())
    if share == 1.0:
        conf = float(min(sure))
        return CategoryMapping(values, conf, conf >= 0.8, _describe(values, "spellings"), 1.0)
    codes = [v for v in site_values if _NUMBER.match(v)]
    if len(codes) == len(site_values) and not values:
        return _codes(site_values, categories)
    evidence = f"{int((~mapped).sum())} of {len(site_values)} site value(s) match no schema value: add them to 'values'"
    return CategoryMapping(values, min(sure, default=0.0) * share, False, evidence, share)


def _codes(site_values: Sequence[str], categories: Sequence[str]) -> CategoryMapping:
    """Numeric codes with no published code book: in the schema's order when their number fits, never confident."""
    ordered = sorted(site_values, key=float)
    if len(ordered) == len(categories):
        values = dict(zip(ordered, categories))
        return CategoryMapping(values, 0.4, False, f"numeric codes {', '.join(ordered)} taken in the schema's order {list(categories)}: confirm the code book", 1.0)
    if len(ordered) < len(categories):
        return CategoryMapping({}, 0.2, False, f"{len(ordered)} numeric codes for {len(categories)} schema values: map them by hand", 0.5)
    return CategoryMapping({}, 0.0, False, f"{len(ordered)} numeric codes for {len(categories)} schema values", 0.0)


def _describe(values: Mapping[str, str], how: str) -> str:
    changed = {k: v for k, v in values.items() if k != v}
    if not changed:
        return "values as in the schema"
    shown = ", ".join(f"{k}->{v}" for k, v in list(changed.items())[:4]) + (" ..." if len(changed) > 4 else "")
    return f"values by {how}: {shown}"
