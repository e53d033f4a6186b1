"""Validation bases: each site's regional base trained without it, against hand computations on the scripted federation of :mod:`tests.test_fl_regions`."""

from __future__ import annotations

import pytest
import torch

from fedmeta.fl.app import initial_state, run_rounds
from fedmeta.fl.config import ConfigError, RunConfig
from fedmeta.fl.regions import validation_base_path
from fedmeta.fl.run_dir import RunDir
from tests.test_fl_asynchronous import shift
from tests.test_fl_regions import SITES, RegionalSites, config, in_a_flower_task  # noqa: F401 (the autouse fixture)


def test_each_site_gets_its_regions_rounds_run_on_the_other_sites_only(tmp_path):
    cfg = config(rounds=1, regional_rounds=2, validation_bases=True)
    run_rounds(RegionalSites(SITES), cfg, RunDir(tmp_path))
    initial = initial_state(cfg)
    global_shift = sum(v for v, _ in SITES.values()) / len(SITES)
    without_a = torch.load(validation_base_path(tmp_path, "north", "a"), weights_only=False)
    # North's two rounds on b (2) and c (6) only: a's own value (1) never enters.
    assert shift(without_a["state"], initial) == pytest.approx(global_shift + 2 * (2 + 6) / 2)
    without_f = torch.load(validation_base_path(tmp_path, "south", "f"), weights_only=False)
    assert shift(without_f["state"], initial) == pytest.approx(global_shift + 2 * (10 + 20) / 2)
    assert without_a["lineage"]["without"] == "a" and without_a["lineage"]["sites"] == ["b", "c"]


def test_a_site_of_a_region_without_a_base_or_of_no_region_has_no_validation_base(tmp_path):
    run_rounds(RegionalSites(SITES), config(validation_bases=True), RunDir(tmp_path))
    assert validation_base_path(tmp_path, "east", "g") is None  # east kept the global base
    assert validation_base_path(tmp_path, "north", "h") is None  # h is in no region
    assert all(validation_base_path(tmp_path, "north", s) for s in "abc")


def test_validation_bases_are_off_by_default_and_refused_with_differential_privacy(tmp_path):
    run_rounds(RegionalSites(SITES), config(), RunDir(tmp_path))
    assert not any(validation_base_path(tmp_path, "north", s) for s in "abc")
    with pytest.raises(ConfigError, match="regions.validation_bases cannot run with privacy"):
        RunConfig.from_dict({"regions": {"rounds": 20, "validation_bases": True}, "privacy": {"clip_norm": 1.0}})
    with pytest.raises(ConfigError, match="regions.validation_bases needs regional bases to validate: set regions.rounds"):
        RunConfig.from_dict({"regions": {"validation_bases": True}})  # regions.rounds is 0 by default
