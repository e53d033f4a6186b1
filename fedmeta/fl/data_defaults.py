"""Defaults chosen from the data: what a short config leaves unset, decided from the sites' rows before round 1.

A CSV federation's rows are read and checked before training starts
(:func:`fedmeta.fl.sites.prepare_federation`); this module then sizes the
settings that depend on them, for every one the configuration does not set:

- ``model.hidden``: two layers of 32 units below 2,000 training rows in the
  whole federation, 64 below 100,000, else 128 (a small federation over-fits
  a wide body);
- ``local.shots`` and ``evaluation.shots`` (K): a third of the median, over
  sites and classification tasks, of a site's smallest class (labelled
  training rows), between 1 and 5 (so that an episode's query set keeps rows
  of every class);
- ``local.query_size``: a quarter of the median labelled training rows of a
  site's task, between 4 and 16.

Learning rates keep their defaults: no rule from the rows alone beats them on
our federations. A value the configuration sets is never changed. The
choices and their reasons are printed by ``fedmeta train`` and written to
the run folder (``config.toml`` holds the values, ``defaults.json`` the
reasons), so a resumed run uses them as they were.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fedmeta.data import SiteData
from fedmeta.fl.config import RunConfig

SMALL_ROWS, LARGE_ROWS = 2_000, 100_000


@dataclass(frozen=True)
class Chosen:
    """One setting chosen from the data: its dotted key, the value, and why."""

    key: str
    value: object
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


def _hidden(rows: int) -> list[int]:
    width = 32 if rows < SMALL_ROWS else 64 if rows < LARGE_ROWS else 128
    return [width, width]


def choose(config: RunConfig, sites: list[SiteData], given: RunConfig | None = None) -> tuple[RunConfig, list[Chosen]]:
    """``config`` with the settings ``given`` (the configuration as the user wrote it; default ``config``) leaves unset chosen from ``sites``."""
    given = given or config
    if not sites:
        return config, []
    rows = sum(int((~s.test_mask).sum()) for s in sites)
    smallest_class, labelled = [], []
    for site in sites:
        for task in site.tasks:
            _, y = site.split(task, train=True)
            labelled.append(len(y))
            spec = site.schema.task(task)
            if spec.is_classification:
                counts = np.bincount(y, minlength=spec.n_classes)
                present = counts[counts > 0]
                smallest_class.append(int(present.min()))
    chosen: list[Chosen] = []
    updates: dict[str, dict] = {}

    def choose_one(section: str, name: str, value, why: str) -> None:
        if name in getattr(given, section).model_fields_set:
            return
        updates.setdefault(section, {})[name] = value
        chosen.append(Chosen(f"{section}.{name}", value, why))

    choose_one("model", "hidden", _hidden(rows), f"{rows:,} training rows over {len(sites)} sites")
    if smallest_class:
        median = int(np.median(smallest_class))
        k = int(np.clip(median // 3, 1, 5))
        why = f"median smallest class of a site's task: {median} labelled training rows"
        choose_one("local", "shots", k, why)
        choose_one("evaluation", "shots", k, why)
    if labelled:
        median = int(np.median(labelled))
        choose_one("local", "query_size", int(np.clip(median // 4, 4, 16)), f"median labelled training rows of a site's task: {median}")
    if not chosen:
        return config, []
    data = config.model_dump(mode="json")
    for section, values in updates.items():
        data[section].update(values)
    return RunConfig.from_dict(data, source="defaults chosen from the data"), chosen
