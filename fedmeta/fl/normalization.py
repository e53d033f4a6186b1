"""The federation's own normalization: sites' sums at the roll call, combined once, carried to the base model.

Numeric features whose ``mean``/``std`` the schema leaves unset are
normalized with statistics the federation computes itself:

1. at the roll call each site answers, besides its name and tasks, the count,
   sum and sum of squares of each such feature over its training rows
   (:meth:`SiteData.training_sums <fedmeta.data.site.SiteData.training_sums>`):
   three numbers per feature, never a row;
2. before the first sample the server checks and combines those of every
   site that answered (:func:`combine_site_sums`), bounding each site's
   influence (:mod:`fedmeta.data.statistics`): one site cannot set the
   federation's normalization, and one that disagrees is left out rather than
   halting the run; the statistics are then fixed for the run and checkpointed;
3. every training and evaluation message carries them (``statistics`` in its
   config), and a site encodes its rows with them;
4. the base model keeps them, and personalization applies them to the site's
   schema (:meth:`GlobalBase.for_schema <fedmeta.personalize.base.GlobalBase.for_schema>`),
   refusing a schema that states other values; export and serving follow.

What this releases, all of it outside DP's (epsilon, delta) and SecAgg+'s
masking: each site's row count and per-feature sums and sums of squares, to
the coordinator, in the clear; and the combined, un-noised means and stds to
every sampled site in every message, into ``base_model.pt``, into every
personalized model's manifest and ONNX graph, and so to every holder of a
served model's key. A federation that must not release them states ``mean``
and ``std`` in the schema instead (``fedmeta schema infer --statistics``
computes them from the training rows of the files given).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence

from fedmeta.data.schema import Schema
from fedmeta.data.statistics import StatisticsError, combine_sums_by_site
from fedmeta.data.site import SiteData

log = logging.getLogger("flwr.fedmeta")

#: Message config key of the statistics (JSON ``{feature: [mean, std]}``).
STATISTICS = "statistics"
#: Roll-call reply key of a site's sums (JSON ``{feature: [count, sum, sum_sq]}``).
SUMS = "feature-sums"

Statistics = dict[str, tuple[float, float]]


class NormalizationError(RuntimeError):
    """Sites whose sums cannot be combined into one normalization."""


def site_sums(site: SiteData, features: Sequence[str] | None = None) -> str:
    """What a site answers at the roll call: its sums over training rows for ``features`` (default: those its
    schema leaves unset)."""
    wanted = set(site.schema.unnormalized if features is None else features)
    return json.dumps({name: list(v) for name, v in site.training_sums().items() if name in wanted})


def _plausible(name: str, stats) -> bool:
    """Three finite numbers with count > 1 that some real values could have (sum of squares >= sum^2 / count)."""
    if not (isinstance(stats, list) and len(stats) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in stats)):
        return False
    n, s, ss = stats
    return n > 1 and ss >= 0 and ss * n >= s * s * (1 - 1e-9)


def combine_site_sums(sums: Mapping[str, str]) -> Statistics:
    """``{feature: (mean, std)}`` from ``{site: its roll-call answer}``, no site able to set it alone.

    An answer that is not valid JSON of plausible sums (finite, count > 1,
    sum of squares at least sum squared over count) is left out, with a
    warning naming the site. Sites must answer for the same features (their
    schemas leave the same ones unset): those outside the largest group are
    left out with a warning, and :class:`NormalizationError` is raised only
    if no group holds a majority. The rest are combined with every site's
    influence bounded (:func:`fedmeta.data.statistics.combine_sums_by_site`:
    capped weights, far answers left out, trimmed across sites).

    >>> combine_site_sums({"a": '{"age": [2, 100.0, 5000.0]}', "b": '{"age": [2, 140.0, 9800.0]}'})
    {'age': (60.0, 10.0)}
    """
    parsed: dict[str, dict] = {}
    for site, text in sorted(sums.items()):
        try:
            answer = json.loads(text)
        except (TypeError, ValueError):
            answer = None
        if not isinstance(answer, dict) or not all(_plausible(k, v) for k, v in answer.items()):
            log.warning("normalization: site %s sent sums that cannot be real (not finite, count < 2, or sum of squares too small); left out", site)
            continue
        parsed[site] = answer
    if not parsed:
        return {}
    groups: dict[tuple[str, ...], list[str]] = {}
    for site, answer in parsed.items():
        groups.setdefault(tuple(sorted(answer)), []).append(site)
    features, agreeing = max(groups.items(), key=lambda item: (len(item[1]), item[0]))
    if 2 * len(agreeing) <= len(parsed):
        listed = "; ".join(f"{sites[0]}{f' and {len(sites) - 1} more' if len(sites) > 1 else ''} for {list(names)}" for names, sites in sorted(groups.items()))
        raise NormalizationError(
            f"sites disagree on which features the federation normalizes and no majority agrees: {listed}; "
            "give every site the same schema.json (mean and std unset on the same features)"
        )
    for names, sites in sorted(groups.items()):
        if names != features:
            log.warning("normalization: site(s) %s left out: they send sums for %s, the majority for %s (another schema.json?)", ", ".join(sites), list(names), list(features))
    try:
        statistics = combine_sums_by_site({site: parsed[site] for site in agreeing})
    except StatisticsError as e:
        raise NormalizationError(str(e)) from None
    if statistics:
        log.info("normalization: means and stds of %d feature(s) from %d site(s)", len(statistics), len(agreeing))
    return statistics


def to_text(statistics: Statistics) -> str:
    return json.dumps({k: list(v) for k, v in statistics.items()})


def applied(schema: Schema, text: str | None) -> Schema:
    """``schema`` with the statistics a message carries (unchanged when it carries none)."""
    statistics = from_text(text)
    return schema.with_statistics(statistics) if statistics else schema


def from_text(text: str | None) -> Statistics | None:
    """The statistics a message carries, or None when it carries none."""
    if not text:
        return None
    return {k: (float(v[0]), float(v[1])) for k, v in json.loads(str(text)).items()}
