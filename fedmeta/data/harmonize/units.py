"""Units: conversions between units of one quantity (scale and offset), and the evidence for a site's unit.

A conversion takes a site value to the schema's unit as ``value * scale +
offset`` (the mapping file's rule). Mass and molar concentrations convert
through the analyte's molar mass, so ``mg/dL``↔``mmol/L`` differs for
cholesterol (38.67) and glucose (18.016), and creatinine goes ``mg/dL``↔
``umol/L`` (88.4). A site's unit is read from its column's name
(``cholesterol_mmol_l``, ``bp_kpa``) and from its values against the
schema's published mean and std (:func:`value_fit`).

>>> conversion("mmol/L", "mg/dL", "cholesterol")
(38.67, 0.0)
>>> scale, offset = conversion("[degF]", "Cel")
>>> round(98.6 * scale + offset, 2)
37.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedmeta.data.harmonize.vocabulary import fold

#: unit -> (quantity, factor to the quantity's base unit, offset to it): base = value * factor + offset.
_UNITS: dict[str, tuple[str, float, float]] = {
    "mmHg": ("pressure", 1.0, 0.0),
    "kPa": ("pressure", 7.50062, 0.0),
    "kg": ("mass", 1.0, 0.0),
    "[lb_av]": ("mass", 1 / 2.20462, 0.0),
    "g": ("mass", 0.001, 0.0),
    "Cel": ("temperature", 1.0, 0.0),
    "[degF]": ("temperature", 5 / 9, -32 * 5 / 9),
    "a": ("time", 12.0, 0.0),
    "mo": ("time", 1.0, 0.0),
    "wk": ("time", 12 / 52.1775, 0.0),
    "d": ("time", 12 / 365.25, 0.0),
    "mg/dL": ("mass concentration", 1.0, 0.0),
    "g/dL": ("mass concentration", 1000.0, 0.0),
    "g/L": ("mass concentration", 100.0, 0.0),
    "mg/L": ("mass concentration", 0.1, 0.0),
    "mmol/L": ("molar concentration", 1.0, 0.0),
    "umol/L": ("molar concentration", 0.001, 0.0),
    "cm": ("length", 1.0, 0.0),
    "m": ("length", 100.0, 0.0),
    "[in_i]": ("length", 2.54, 0.0),
    "1": ("money", 1.0, 0.0),
    "[cents]": ("money", 0.01, 0.0),
}
_ALIASES = {"lb": "[lb_av]", "lbs": "[lb_av]", "degF": "[degF]", "degC": "Cel", "°C": "Cel", "°F": "[degF]", "µmol/L": "umol/L", "year": "a", "years": "a",
            "month": "mo", "months": "mo", "in": "[in_i]"}

#: mg/dL per mmol/L, by analyte (molar mass / 10).
MG_DL_PER_MMOL_L = {"cholesterol": 38.67, "glucose": 18.016, "creatinine": 1000 / 88.4, "triglycerides": 88.57, "urea": 6.006}  # creatinine: 1 mg/dL = 88.4 umol/L

#: name tokens -> the unit they state (several tokens in a row first: ``mmol l``, ``mg dl``)
NAME_UNITS: dict[tuple[str, ...], str] = {
    ("kpa",): "kPa", ("mmhg",): "mmHg", ("mmol",): "mmol/L", ("mmol", "l"): "mmol/L", ("mmoll",): "mmol/L", ("umol",): "umol/L",
    ("umol", "l"): "umol/L", ("umoll",): "umol/L", ("mg", "dl"): "mg/dL", ("mgdl",): "mg/dL", ("g", "dl"): "g/dL", ("gdl",): "g/dL",
    ("g", "l"): "g/L", ("gl",): "g/L", ("kg",): "kg", ("kgs",): "kg", ("lb",): "[lb_av]", ("lbs",): "[lb_av]", ("pounds",): "[lb_av]",
    ("celsius",): "Cel", ("degc",): "Cel", ("fahrenheit",): "[degF]", ("degf",): "[degF]", ("f",): "[degF]", ("c",): "Cel",
    ("years",): "a", ("yrs",): "a", ("yr",): "a", ("jahre",): "a", ("anos",): "a", ("ans",): "a",
    ("months",): "mo", ("mo",): "mo", ("mos",): "mo", ("monate",): "mo", ("meses",): "mo", ("mois",): "mo", ("cents",): "[cents]",
}


def canonical(unit: str) -> str:
    """A unit's spelling in the table (``lb`` -> ``[lb_av]``); unknown units are returned as given."""
    return _ALIASES.get(unit, unit)


def quantity(unit: str) -> str | None:
    spec = _UNITS.get(canonical(unit))
    return spec[0] if spec else None


def conversion(site_unit: str, schema_unit: str, analyte: str | None = None) -> tuple[float, float] | None:
    """``(scale, offset)`` taking a value in ``site_unit`` to ``schema_unit``; None if they measure different things.

    Mass and molar concentrations convert only for an analyte with a known molar mass.
    """
    a, b = _UNITS.get(canonical(site_unit)), _UNITS.get(canonical(schema_unit))
    if a is None or b is None:
        return (1.0, 0.0) if canonical(site_unit) == canonical(schema_unit) else None
    (qa, fa, oa), (qb, fb, ob) = a, b
    bridge = 1.0
    if qa != qb:
        if {qa, qb} != {"mass concentration", "molar concentration"} or analyte not in MG_DL_PER_MMOL_L:
            return None
        per = MG_DL_PER_MMOL_L[analyte]  # mg/dL per mmol/L
        bridge = per if qa == "molar concentration" else 1 / per
    # site -> base_a -> (bridge) -> base_b -> schema unit
    scale = fa * bridge / fb
    offset = (oa * bridge - ob) / fb
    return (_tidy(scale), _tidy(offset))


def _tidy(x: float) -> float:
    """Rounded to 9 significant digits: exact enough for any measurement, short enough for a person to read in the file."""
    return 0.0 if x == 0 else float(f"{x:.9g}")


def alternatives(schema_unit: str, analyte: str | None = None) -> dict[str, tuple[float, float]]:
    """Every unit a site might use for the schema unit's quantity, with its conversion (the schema's own unit included)."""
    out = {}
    for unit in _UNITS:
        c = conversion(unit, schema_unit, analyte)
        if c is not None:
            out[unit] = c
    return out or {schema_unit: (1.0, 0.0)}  # a unit the table does not know converts to nothing but itself


def unit_in_name(name_tokens: tuple[str, ...]) -> str | None:
    """The unit a column's name states (``('cholesterol', 'mmol', 'l')`` -> ``mmol/L``), else None."""
    found = None
    for i in range(len(name_tokens)):
        for length in (2, 1):
            key = tuple(name_tokens[i : i + length])
            if len(key) == length and key in NAME_UNITS:
                found = NAME_UNITS[key]
                break
    return found


@dataclass(frozen=True)
class UnitDecision:
    """The site's unit for one column: the conversion to the schema's unit, how sure, and why."""

    unit: str
    scale: float
    offset: float
    confidence: float
    evidence: str


def value_fit(values: np.ndarray, mean: float, std: float, scale: float = 1.0, offset: float = 0.0) -> float:
    """How well a site's values, converted, agree with the published mean and std: 1 alike, near 0 far apart.

    Sites differ (case mix): a converted mean within about one published std,
    and a spread within a factor of about two, is agreement; a unit error
    moves both by the conversion factor.
    """
    v = np.asarray(values, float) * scale + offset
    if len(v) < 2 or not np.isfinite(v).all():
        return 0.0
    z = abs(float(v.mean()) - mean) / std
    spread = math.log(max(float(v.std()), 1e-12) / std)
    return float(math.exp(-0.5 * (z / 1.2) ** 2) * math.exp(-0.5 * (spread / 0.7) ** 2))


def decide_unit(schema_unit: str | None, analyte: str | None, name_tokens: tuple[str, ...], values: np.ndarray,
                statistics: tuple[float, float] | None) -> UnitDecision:
    """The site's unit from its name and its values (see the module docstring); the schema's own unit unless evidence says otherwise.

    Confident only when the evidence agrees: the name's unit confirmed by the values (or no statistics to contradict it),
    or the values alone when one unit fits and every other is far off. Otherwise the best guess, not confident.
    """
    if schema_unit is None:
        return UnitDecision("", 1.0, 0.0, 0.9, "")
    options = alternatives(schema_unit, analyte)
    named = unit_in_name(name_tokens)
    named = named if named in options else None
    if statistics is None:
        if named:
            s, o = options[named]
            return UnitDecision(named, s, o, 0.9, f"unit {named} from the name" + ("" if (s, o) == (1.0, 0.0) else f" -> {schema_unit}"))
        if len(options) <= 1:
            return UnitDecision(schema_unit, 1.0, 0.0, 0.9, "")
        return UnitDecision(schema_unit, 1.0, 0.0, 0.6, f"taken as {schema_unit}: neither the name nor published statistics tell the unit")
    mean, std = statistics
    fits = {u: value_fit(values, mean, std, *c) for u, c in options.items()}
    best = max(fits, key=fits.get)
    runner_up = max((f for u, f in fits.items() if u != best and options[u] != options[best]), default=0.0)
    s, o = options[best]
    change = "" if (s, o) == (1.0, 0.0) else f" -> {schema_unit}"
    if named:
        ns, no = options[named]
        if fits[named] >= 0.2 and (named == best or fits[named] >= 0.5 * fits[best]):
            return UnitDecision(named, ns, no, 0.95, f"unit {named} from the name, values agree (fit {fits[named]:.2f})" + ("" if (ns, no) == (1.0, 0.0) else f" -> {schema_unit}"))
        return UnitDecision(best, s, o, 0.3, f"the name says {named} but the values fit {best} (fit {fits[best]:.2f} vs {fits[named]:.2f}): check")
    if fits[best] >= 0.3 and runner_up <= 0.25 * fits[best]:
        conf = 0.9 if (s, o) == (1.0, 0.0) else 0.85
        return UnitDecision(best, s, o, conf, (f"values fit {best} (fit {fits[best]:.2f}, next {runner_up:.2f})" + change) if change else "")
    return UnitDecision(best, s, o, 0.4, f"unit unclear: values fit {best} {fits[best]:.2f}, next {runner_up:.2f}{change}: check")


def analyte_of(words: tuple[str, ...]) -> str | None:
    """The analyte a feature measures, for mass/molar conversion (``('cholesterol',)`` -> ``cholesterol``)."""
    for w in words:
        if fold(w) in MG_DL_PER_MMOL_L:
            return fold(w)
    return None
