"""Regional bases against hand computations, on a scripted federation.

Every site answers a training message with an update of one value in every
entry and ten examples, so each server step moves every entry by the mean of
the values of the sites in it (server lr 1, no momentum): a regional base that
took in another region's update, or the global rounds', is off by a known amount.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmeta.fl.app import RoundObserver, initial_state, run_rounds
from fedmeta.fl.config import RunConfig
from fedmeta.fl.regions import REGION, declared_region, plan_regions, regional_base_path
from fedmeta.fl.run_dir import RunDir
from fedmeta.fl.simulation import is_complete
from tests.grids import ImmediateGrid, act_as_a_flower_task
from tests.test_fl_asynchronous import TASK, shift

# name -> (update value, region or None)
SITES = {
    "a": (1.0, "north"), "b": (2.0, "north"), "c": (6.0, "north"),
    "d": (10.0, "south"), "e": (20.0, "south"), "f": (60.0, "south"),
    "g": (100.0, "east"),  # alone in its region: below regions.min_sites
    "h": (7.0, None),  # declares no region
}


class RegionalSites(ImmediateGrid):
    """Sites that reply at once: to the roll call with their region, to training with an update of one value."""

    def __init__(self, sites: dict[str, tuple[float, str | None]]):
        super().__init__({node: name for node, name in enumerate(sites, start=1)})
        self.sites = sites
        self.trained: list[tuple[int, str]] = []  # (round, site) of every training message

    def reply(self, message: Message) -> Message:
        site = self.nodes[message.metadata.dst_node_id]
        value, region = self.sites[site]
        content = RecordDict({"site": ConfigRecord({"name": site}), "metrics": MetricRecord({"examples." + TASK: 10, "loss": value})})
        kind = message.metadata.message_type
        if kind == "train":
            self.trained.append((int(message.content["config"]["round"]), site))
            content["arrays"] = ArrayRecord({k: torch.full_like(v, value) for k, v in message.content["arrays"].to_torch_state_dict().items()})
        elif kind == "evaluate":
            content["metrics"] = MetricRecord({"examples." + TASK: 10, f"{TASK}.global.acc": 0.5, f"{TASK}.personalized.acc": value / 100})
        elif region:  # the roll call
            content["site"][REGION] = region
        return Message(content=content, reply_to=message)


@pytest.fixture(autouse=True)
def in_a_flower_task(monkeypatch):
    act_as_a_flower_task(monkeypatch)


def config(rounds=1, regional_rounds=2, **regions) -> RunConfig:
    return RunConfig.from_dict({
        "rounds": rounds, "federation": {"kind": "hospitals", "n_sites": len(SITES)}, "model": {"hidden": [4]},
        "server": {"lr": 1.0, "momentum": 0.0, "min_sites": 1}, "regions": {"rounds": regional_rounds, **regions},
    })


def regional_state(run_dir, region: str) -> dict:
    path = regional_base_path(run_dir, region)
    assert path is not None, f"region {region} has no base"
    return torch.load(path, weights_only=False)


def test_each_regional_base_is_the_global_base_stepped_by_its_own_sites_only(tmp_path):
    cfg = config(rounds=1, regional_rounds=2)
    grid = RegionalSites(SITES)
    final = run_rounds(grid, cfg, RunDir(tmp_path))
    initial = initial_state(cfg)
    global_shift = sum(v for v, _ in SITES.values()) / len(SITES)  # round 1: every site, equal examples
    assert shift(final, initial) == pytest.approx(global_shift)
    north, south = regional_state(tmp_path, "north"), regional_state(tmp_path, "south")
    # Two regional rounds each: the mean of the region's own values, twice, from the global base.
    assert shift(north["state"], initial) == pytest.approx(global_shift + 2 * (1 + 2 + 6) / 3)
    assert shift(south["state"], initial) == pytest.approx(global_shift + 2 * (10 + 20 + 60) / 3)
    assert {site for round_, site in grid.trained if round_ > 1} == {"a", "b", "c", "d", "e", "f"}  # never g (east) or h (none)
    assert north["lineage"]["global_sha256"] and north["lineage"]["sites"] == ["a", "b", "c"] and north["lineage"]["global_round"] == 1


def test_a_region_below_the_minimum_keeps_the_global_base_and_says_so(tmp_path):
    run_rounds(RegionalSites(SITES), config(), RunDir(tmp_path))
    regions = json.loads((tmp_path / "regions.json").read_text())["regions"]
    assert regions["east"]["trained"] is False
    assert regions["east"]["note"] == "kept the global base: 1 site(s), fewer than regions.min_sites = 3"
    assert regional_base_path(tmp_path, "east") is None and not (tmp_path / "regions" / "east").exists()
    assert sorted(regions) == ["east", "north", "south"]  # h declared none: global level only


def test_regions_are_off_by_default_and_the_run_says_its_sites_declare_some(tmp_path, caplog):
    # Off by default: on the hierarchy benchmark's fresh seeds the regional level cost the sites accuracy (docs/benchmarks.md).
    cfg = RunConfig.from_dict({k: v for k, v in config().model_dump(mode="json", exclude_none=True).items() if k != "regions"})
    told = {}

    class Observer(RoundObserver):  # `fedmeta train` prints region_done (fedmeta.cli.output)
        def region_done(self, region, outcome):
            told[region] = outcome

    with caplog.at_level("INFO", logger="flwr.fedmeta"):
        run_rounds(RegionalSites(SITES), cfg, RunDir(tmp_path), observer=Observer())
    assert not (tmp_path / "regions.json").exists() and not (tmp_path / "regions").exists()
    assert sorted(told) == ["east", "north", "south"] and told["north"].sites == ["a", "b", "c"] and not told["north"].trained
    assert told["north"].note.startswith("declared by 3 site(s); no regional base: [regions] rounds = 0")
    assert "region north: declared by 3 site(s); no regional base" in caplog.text
    control = RunDir(tmp_path / "control")  # the same run with regional rounds asked for trains them
    run_rounds(RegionalSites(SITES), config(regional_rounds=1), control)
    assert (control.path / "regions.json").exists() and regional_base_path(control.path, "north") is not None


def test_a_run_is_complete_only_once_its_regional_stage_is_written(tmp_path):
    cfg = config()
    run_rounds(RegionalSites(SITES), cfg, RunDir(tmp_path))
    assert is_complete(RunDir(tmp_path), cfg)
    (tmp_path / "regions.json").unlink()
    assert not is_complete(RunDir(tmp_path), cfg)


def test_a_resumed_regional_stage_keeps_the_regions_already_trained(tmp_path):
    cfg = config()
    run_rounds(RegionalSites(SITES), cfg, RunDir(tmp_path))
    before = (tmp_path / "regions" / "north" / "base_model.pt").read_bytes()
    # As if the run stopped during south's rounds: the file written after north, and no base for south.
    partial = json.loads((tmp_path / "regions.json").read_text())
    partial.update(complete=False, regions={"north": partial["regions"]["north"]})
    (tmp_path / "regions.json").write_text(json.dumps(partial))
    (tmp_path / "regions" / "south" / "base_model.pt").unlink()
    assert not is_complete(RunDir(tmp_path), cfg)
    grid = RegionalSites(SITES)
    run_rounds(grid, cfg, RunDir(tmp_path))
    assert (tmp_path / "regions" / "north" / "base_model.pt").read_bytes() == before
    assert {site for _, site in grid.trained} == {"d", "e", "f"}
    assert is_complete(RunDir(tmp_path), cfg)


def test_a_regional_base_under_dp_spends_more_than_the_global_one(tmp_path):
    cfg = RunConfig.from_dict({
        **config().model_dump(mode="json", exclude_none=True),
        "privacy": {"clip_norm": 1000.0, "noise_multiplier": 1.0, "delta": 1e-5},
    })
    run_rounds(RegionalSites(SITES), cfg, RunDir(tmp_path))
    global_eps = torch.load(RunDir(tmp_path).base_model_path, weights_only=False)["privacy"]["epsilon"]
    north = regional_state(tmp_path, "north")["privacy"]
    assert north["rounds"] == 1 + 2 and north["sampling"] == ["3 of 3", "8 of 8"]
    assert north["epsilon"] > global_eps


def test_a_malformed_declared_region_is_ignored():
    assert declared_region("a", "north-1") == "north-1"
    assert declared_region("a", "../etc") is None and declared_region("a", "x" * 65) is None and declared_region("a", 3) is None


def test_the_plan_counts_only_connected_sites():
    plan = plan_regions({"a": "n", "b": "n", "c": "n", "d": "s"}, connected={"a", "b", "d"}, min_sites=2)
    assert plan["n"].sites == ["a", "b"] and not plan["n"].note
    assert plan["s"].note.startswith("kept the global base: 1 site(s)")


def test_a_robust_rule_that_needs_more_sites_than_a_region_has_keeps_the_global_base(tmp_path, caplog):
    cfg = RunConfig.from_dict({**config().model_dump(mode="json", exclude_none=True), "aggregation": {"rule": "krum", "byzantine_sites": 1}})
    run_rounds(RegionalSites(SITES), cfg, RunDir(tmp_path))  # 8 sites globally: Krum with f = 1 needs 5 per round
    regions = json.loads((tmp_path / "regions.json").read_text())["regions"]
    assert regions["north"]["trained"] is False and regions["north"]["note"] == "kept the global base: no regional round was aggregated"
    assert regional_base_path(tmp_path, "north") is None
