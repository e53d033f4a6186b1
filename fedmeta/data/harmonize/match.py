"""Matching a site's columns to the federation schema: evidence, a one-to-one assignment, confidence and review.

For every schema feature and task label (a *target*) and every site column,
name evidence (concept words from :mod:`~fedmeta.data.harmonize.vocabulary`,
the schema's synonyms and description, fuzzy similarity by ``rapidfuzz``)
and value evidence from the site's own rows (type, distinct values, unit
and fit to the published mean and std: :mod:`~fedmeta.data.harmonize.units`;
category spellings: :mod:`~fedmeta.data.harmonize.categories`) give a
score; ``scipy``'s ``linear_sum_assignment`` picks one column per target.

A decision is confident only when the name says so (values alone never
suffice: a decoy column can look like cholesterol), nothing else comes
close, the values do not contradict it, and its unit and categories are
sure. Everything else is written with ``review: true``: asking beats a
silent error. Pure functions of the schema and the frame; nothing leaves
the site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedmeta.data.harmonize.categories import CategoryMapping, map_categories
from fedmeta.data.harmonize.profile import ColumnProfile, profiles
from fedmeta.data.harmonize.units import UnitDecision, analyte_of, decide_unit
from fedmeta.data.harmonize.vocabulary import concept_words, fold, tokens
from fedmeta.data.mapping import ColumnMapping, Mapping
from fedmeta.data.schema import Schema

#: A pair scoring under this is no match at all.
MIN_SCORE = 0.35
#: Confidence at or above which a decision is not flagged for review; a decision's confidence never exceeds its name evidence.
CONFIDENT = 0.75


@dataclass(frozen=True)
class Target:
    """A schema feature or task label as matching sees it."""

    name: str
    kind: str  # "numeric" or "categorical"
    aliases: tuple[str, ...]
    unit: str | None = None
    statistics: tuple[float, float] | None = None
    categories: tuple[str, ...] = ()
    category_synonyms: dict[str, list[str]] = field(default_factory=dict)
    label_of: str | None = None  # the task, for a label


def targets(schema: Schema) -> list[Target]:
    out = []
    for f in schema.features:
        aliases = (f.name, *f.synonyms) + ((f.description,) if f.description else ())
        stats = (f.mean, f.std) if f.mean is not None else None
        out.append(Target(f.name, f.type, aliases, f.unit, stats, tuple(f.categories or ()), dict(f.category_synonyms or {})))
    for t in schema.tasks:
        aliases = (t.label, t.name, *t.synonyms)
        if t.is_classification:
            out.append(Target(t.label, "categorical", aliases, categories=tuple(t.classes), label_of=t.name))
        else:
            stats = None if (t.target_mean, t.target_std) == (0.0, 1.0) else (t.target_mean, t.target_std)
            out.append(Target(t.label, "numeric", aliases, statistics=stats, label_of=t.name))
    return out


def _compact(name: str) -> str:
    return "".join(tokens(name))


def name_score(column: ColumnProfile, target: Target) -> tuple[float, str]:
    """Name evidence in [0, 1] and what it rests on."""
    from rapidfuzz import fuzz

    best, why = 0.0, ""
    for alias in target.aliases:
        if _compact(alias) == _compact(column.name):
            return 1.0, f"name {'=' if alias == target.name else 'is a synonym:'} {alias!r}"
        words = concept_words(alias)
        if words and set(words) == set(column.words):
            score, reason = 0.95, f"name means {' '.join(words)!r}"
        else:
            a, b = " ".join(sorted(column.words)), " ".join(sorted(words))
            sort = fuzz.token_sort_ratio(a, b) / 100
            shared = sum(max((fuzz.ratio(w, v) for v in words), default=0) >= 88 for w in column.words)
            jaccard = shared / (len(set(column.words)) + len(set(words)) - shared) if shared else 0.0
            raw = fuzz.ratio(_compact(alias), _compact(column.name)) / 100
            score = max(0.5 * sort + 0.5 * jaccard, 0.9 * raw if raw >= 0.8 else 0.0)
            reason = f"name like {alias!r} ({score:.2f})"
        if score > best:
            best, why = score, reason
    return best, why


@dataclass(frozen=True)
class Candidate:
    """One site column as one target: scores and what the values say."""

    score: float
    name: float
    value: float | None
    why: str
    unit: UnitDecision | None = None
    categories: CategoryMapping | None = None


def candidate(column: ColumnProfile, target: Target) -> Candidate | None:
    """The evidence for ``column`` as ``target``; None where the types rule it out."""
    name, why = name_score(column, target)
    if column.present == 0:
        # An empty label column is a task the site does not record: its name is the evidence. An empty feature cannot be checked.
        if target.label_of is not None:
            return Candidate(_combined(name, None), name, None, f"{why}; empty (the site records no {target.label_of!r} labels)")
        return Candidate(_combined(name, None), name, None, f"{why}; empty: no values to check", categories=CategoryMapping({}, 0.5, False, "empty", 0.0))
    if target.kind == "numeric":
        if not column.numeric or len(column.numbers) == 0:
            return None
        unit = decide_unit(target.unit, analyte_of(concept_words(target.name) + tuple(fold(a) for a in target.aliases)), column.tokens, column.numbers,
                           target.statistics)
        value = None
        if target.statistics is not None:
            from fedmeta.data.harmonize.units import value_fit

            value = value_fit(column.numbers, *target.statistics, unit.scale, unit.offset)
            why += f"; values fit published mean/std {value:.2f}"
        if unit.evidence:
            why += f"; {unit.evidence}"
        return Candidate(_combined(name, value), name, value, why, unit=unit)
    if not column.distinct or column.n_distinct > max(2 * len(target.categories), len(target.categories) + 5):
        return None
    cats = map_categories(list(column.distinct), list(target.categories), target.category_synonyms, list(column.distinct.values()))
    value = cats.share_mapped if cats.confident or cats.share_mapped < 1 else 0.6
    return Candidate(_combined(name, value), name, value, f"{why}; {cats.evidence}", categories=cats)


def _combined(name: float, value: float | None) -> float:
    # Without value evidence a name counts for a little less: nothing could contradict it.
    return 0.85 * name if value is None else 0.6 * name + 0.4 * value


@dataclass(frozen=True)
class Decision:
    """Where one site column goes (``target`` None: nowhere), how, how sure, and why: one row of the printed table."""

    column: str
    target: str | None
    scale: float
    offset: float
    values: dict[str, str]
    confidence: float
    review: bool
    evidence: str

    def transform(self) -> str:
        parts = []
        if (self.scale, self.offset) != (1.0, 0.0):
            parts.append(f"x*{self.scale:g}" + (f"{self.offset:+g}" if self.offset else ""))
        changed = {k: v for k, v in self.values.items() if k != v}
        if changed:
            parts.append(f"{len(changed)} value(s) recoded")
        return ", ".join(parts) or "as is"


@dataclass(frozen=True)
class MatchResult:
    decisions: list[Decision]
    unmapped: list[str]  # targets no column reaches
    mapping: Mapping


def match_frame(schema: Schema, frame: pd.DataFrame) -> MatchResult:
    """Propose a mapping of ``frame``'s columns to ``schema`` (see the module docstring)."""
    from scipy.optimize import linear_sum_assignment

    cols, tgts = profiles(frame), targets(schema)
    cands = [[candidate(c, t) for t in tgts] for c in cols]
    score = np.array([[c.score if c else 0.0 for c in row] for row in cands]).reshape(len(cols), len(tgts))
    compatible = np.array([[c is not None for c in row] for row in cands], bool).reshape(score.shape)
    rows, picks = linear_sum_assignment(-score) if score.size else (np.array([], int), np.array([], int))
    assigned = {r: k for r, k in zip(rows, picks) if score[r, k] >= MIN_SCORE}
    decisions = []
    for r, col in enumerate(cols):
        if r not in assigned:
            decisions.append(_unassigned(col, score[r], compatible[r], tgts, set(assigned.values())))
            continue
        k = assigned[r]
        cand, target = cands[r][k], tgts[k]
        rivals = np.concatenate([np.delete(score[r], k), np.delete(score[:, k], r)])
        margin = cand.score - (rivals.max() if len(rivals) else 0.0)
        decisions.append(_decision(col, target, cand, margin))
    mapping = Mapping(
        schema_digest=schema.digest(),
        columns={
            d.column: ColumnMapping(feature=d.target, scale=d.scale, offset=d.offset, values=d.values, confidence=round(d.confidence, 3),
                                    review=d.review, evidence=d.evidence)
            for d in decisions
        },
    )
    reached = {d.target for d in decisions if d.target}
    return MatchResult(decisions, [t.name for t in tgts if t.name not in reached], mapping)


def _decision(col: ColumnProfile, target: Target, cand: Candidate, margin: float) -> Decision:
    doubts = []
    conf = min(cand.name, 0.5 + margin)
    if cand.name < CONFIDENT:
        doubts.append("name evidence weak")
    if margin < 0.1:
        doubts.append(f"another match scores within {max(margin, 0):.2f}")
    if cand.value is not None and cand.value < 0.25:
        conf = min(conf, 0.4)
        doubts.append("values disagree with the published statistics")
    scale, offset, values = 1.0, 0.0, {}
    if cand.unit is not None:
        scale, offset = cand.unit.scale, cand.unit.offset
        conf = min(conf, cand.unit.confidence)
        if cand.unit.confidence < CONFIDENT:
            doubts.append("unit unsure")
    if cand.categories is not None:
        values = dict(cand.categories.values)
        conf = min(conf, cand.categories.confidence)
        if not cand.categories.confident:
            doubts.append("categories unsure")
    review = conf < CONFIDENT or bool(doubts)
    evidence = cand.why + (f"; review: {', '.join(doubts)}" if doubts else "")
    return Decision(col.name, target.name, scale, offset, values, float(conf), review, evidence)


def _unassigned(col: ColumnProfile, scores: np.ndarray, compatible: np.ndarray, tgts: list[Target], taken: set[int]) -> Decision:
    """A column no target took: ignored, and flagged when a target left without a column could be it (its type fits)."""
    open_ = [k for k in range(len(tgts)) if k not in taken and compatible[k]]
    if open_:
        k = max(open_, key=lambda i: scores[i])
        return Decision(col.name, None, 1.0, 0.0, {}, float(1 - scores[k]), True,
                        f"ignored; might be {tgts[k].name!r} (score {scores[k]:.2f}), which no column reaches: map it by hand if so")
    best = int(scores.argmax()) if len(scores) else None
    hint = f" (closest: {tgts[best].name!r}, {scores[best]:.2f})" if best is not None and scores[best] > 0 else ""
    return Decision(col.name, None, 1.0, 0.0, {}, float(1 - (scores.max() if len(scores) else 0.0)), False, f"ignored: matches no schema column{hint}")
