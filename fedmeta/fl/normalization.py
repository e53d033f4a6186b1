"""The federation's own normalization: sites' sums at the roll call, combined once, carried to the base model.

Numeric features whose ``mean``/``std`` the schema leaves unset are
normalized with statistics the federation computes itself:

1. at the roll call each site answers, besides its name and tasks, the count,
   sum and sum of squares of each such feature over its training rows
   (:meth:`SiteData.training_sums <fedmeta.data.site.SiteData.training_sums>`):
   three numbers per feature, never a row;
2. before the first sample the server checks and combines those of every
   site that answered (:func:`combine_site_sums`); the statistics are then
   fixed for the run and checkpointed;
3. every training and evaluation message carries them (``statistics`` in its
   config), and a site encodes its rows with them;
4. the base model keeps them, and personalization applies them to the site's
   schema (:meth:`GlobalBase.for_schema <fedmeta.personalize.base.GlobalBase.for_schema>`),
   refusing a schema that states other values; export and serving follow.

What this releases: each site's row count and per-feature sums and sums of
squares, to the coordinator, in the clear, outside the guarantees of DP's
(epsilon, delta) and of SecAgg+'s masking. A federation that must not
release them states ``mean`` and ``std`` in the schema instead
(``fedmeta schema infer --statistics`` computes them from the files given).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping

from fedmeta.data.schema import Schema, combine_sums
from fedmeta.data.site import SiteData

log = logging.getLogger("flwr.fedmeta")

#: Message config key of the statistics (JSON ``{feature: [mean, std]}``).
STATISTICS = "statistics"
#: Roll-call reply key of a site's sums (JSON ``{feature: [count, sum, sum_sq]}``).
SUMS = "feature-sums"

Statistics = dict[str, tuple[float, float]]


class NormalizationError(RuntimeError):
    """Sites whose sums cannot be combined into one normalization."""


def site_sums(site: SiteData) -> str:
    """What a site answers at the roll call: its sums over training rows for the features its schema leaves unset."""
    wanted = set(site.schema.unnormalized)
    return json.dumps({name: list(v) for name, v in site.training_sums().items() if name in wanted})


def _plausible(name: str, stats) -> bool:
    """Three finite numbers with count > 1 that some real values could have (sum of squares >= sum^2 / count)."""
    if not (isinstance(stats, list) and len(stats) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in stats)):
        return False
    n, s, ss = stats
    return n > 1 and ss >= 0 and ss * n >= s * s * (1 - 1e-9)


def combine_site_sums(sums: Mapping[str, str]) -> Statistics:
    """``{feature: (mean, std)}`` from ``{site: its roll-call answer}``.

    Raises :class:`NormalizationError` naming the sites when they disagree on
    which features the federation normalizes (their schemas differ). A site
    whose answer is not valid JSON of plausible sums (finite, count > 1, sum
    of squares at least sum squared over count) is left out, with a warning.

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
    features = {site: sorted(answer) for site, answer in parsed.items()}
    first_site, first = next(iter(features.items()))
    for site, names in features.items():
        if names != first:
            raise NormalizationError(
                f"sites disagree on which features the federation normalizes: {first_site} sends sums for {first}, "
                f"{site} for {names}; give every site the same schema.json (mean and std unset on the same features)"
            )
    statistics = combine_sums(parsed.values())
    if statistics:
        rows = int(sum(next(iter(a.values()))[0] for a in parsed.values()))
        log.info("normalization: means and stds of %d feature(s) from %d site(s), %d training rows", len(statistics), len(parsed), rows)
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
