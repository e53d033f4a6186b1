"""Asynchronous rounds (FedBuff) against hand computations, on a scripted federation.

The federation is a fake Flower ``Grid``: each site answers the roll call at
once and a training message after a fixed number of the server's pulls, with
an update of one value in every entry. Every server step can then be worked
out by hand: state -= lr * Σ n_i w(τ_i) Δ_i / Σ n_i, here with equal n_i.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedmeta.fl import asynchronous
from fedmeta.fl.app import initial_state, run_rounds
from fedmeta.fl.asynchronous import staleness_weight
from fedmeta.fl.config import ConfigError, RunConfig
from fedmeta.fl.privacy import PrivacyAccount
from fedmeta.fl.run_dir import RunDir
from fedmeta.fl.stragglers import site_delay
from tests.grids import ImmediateGrid, act_as_a_flower_task

TASK = "mortality"


class ScriptedSites(ImmediateGrid):
    """A Grid whose sites reply to a training message after ``delay`` pulls, with every entry of the update = ``value``."""

    def __init__(self, sites: dict[str, tuple[float, int]]):
        super().__init__({node: name for node, name in enumerate(sites, start=1)})
        self.sites = sites
        self.sent: list[tuple[str, int]] = []  # (site, model version) of every training message

    def delay(self, message: Message) -> int:
        return self.sites[self.nodes[message.metadata.dst_node_id]][1] if message.metadata.message_type == "train" else 0

    def reply(self, message: Message) -> Message:
        site = self.nodes[message.metadata.dst_node_id]
        value = self.sites[site][0]
        kind = message.metadata.message_type
        if kind == "train":
            self.sent.append((site, int(message.content["config"][asynchronous.MODEL_VERSION])))
        if value is None and kind == "train":  # a site whose training raises
            return Message(error=Error(code=0, reason="site failed"), reply_to=message)
        content = RecordDict({"site": ConfigRecord({"name": site}), "metrics": MetricRecord({"examples." + TASK: 10, "loss": value or 0.0})})
        if kind == "train":
            received = message.content["arrays"].to_torch_state_dict()
            content["arrays"] = ArrayRecord({k: torch.full_like(v, value) for k, v in received.items()})
        elif kind == "evaluate":
            content["metrics"] = MetricRecord({"examples." + TASK: 10, f"{TASK}.global.acc": 0.5})
        return Message(content=content, reply_to=message)


@pytest.fixture(autouse=True)
def in_a_flower_task(monkeypatch):
    """Flower builds a Message only inside a task: be the ServerApp's; and the loop need not sleep between pulls."""
    act_as_a_flower_task(monkeypatch)
    monkeypatch.setattr(asynchronous, "POLL", 0.0)


def config(rounds=3, **asynchronous_settings) -> RunConfig:
    settings = {"enabled": True, "buffer": 2, **asynchronous_settings}
    return RunConfig.from_dict({
        "rounds": rounds, "federation": {"kind": "hospitals", "n_sites": 3}, "model": {"hidden": [4]},
        "server": {"lr": 1.0, "min_sites": 1}, "asynchronous": settings,
    })


# a and b reply one pull after they are sent a model, c three pulls after.
SITES = {"a": (1.0, 1), "b": (2.0, 1), "c": (4.0, 3)}


def shift(state: dict, initial: dict) -> float:
    """How far every trained entry moved (they all move by the same amount here)."""
    moved = {k: float((initial[k] - v).flatten()[0]) for k, v in state.items() if not torch.equal(v, initial[k])}
    assert max(moved.values()) - min(moved.values()) < 1e-5, moved
    return next(iter(moved.values()))


def test_staleness_weights_are_fedbuffs_inverse_square_root_by_default():
    assert [staleness_weight(t, 0.5) for t in (0, 1, 3, 8)] == pytest.approx([1.0, 1 / math.sqrt(2), 0.5, 1 / 3])
    assert staleness_weight(5, 0.0) == 1.0


def test_each_server_step_is_the_staleness_weighted_mean_of_its_buffer(tmp_path):
    cfg = config(rounds=3)
    grid = ScriptedSites(SITES)
    state = run_rounds(grid, cfg, RunDir(tmp_path))
    # Pull 1: a and b (version 0) -> step 1 moves by (1 + 2) / 2. Pull 2: a and b again (version 1) -> step 2, the same.
    # Pull 3: c's update on version 0 arrives two steps late (weight 1 / sqrt(3)), then a's -> step 3.
    expected = 1.5 + 1.5 + (4.0 / math.sqrt(3) + 1.0) / 2
    assert shift(state, initial_state(cfg)) == pytest.approx(expected, rel=1e-6)
    rows = RunDir(tmp_path).read_metrics()
    step3 = {r["site"]: r for r in rows if r["round"] == 3 and r["phase"] == "train"}
    assert (step3["c"]["model_version"], step3["c"]["staleness"]) == (0, 2)
    assert step3["c"]["staleness_weight"] == pytest.approx(1 / math.sqrt(3))
    assert step3["*"]["staleness_max"] == 2 and step3["*"]["sites"] == 2


def test_an_update_older_than_max_staleness_is_dropped_and_its_site_named(tmp_path, caplog):
    cfg = config(rounds=3, max_staleness=1)
    with caplog.at_level(logging.WARNING, logger="flwr.fedmeta"):
        state = run_rounds(ScriptedSites(SITES), cfg, RunDir(tmp_path))
    # c's update is 2 steps old: dropped, so step 3 is a and b again.
    assert shift(state, initial_state(cfg)) == pytest.approx(4.5)
    lines = [r.getMessage() for r in caplog.records if "max_staleness" in r.getMessage()]
    assert lines[0] == "site c: its update on model version 0 arrived 2 server step(s) later, more than asynchronous.max_staleness = 1; dropped"
    assert lines[1].startswith("fedmeta: the base model was trained without 1 site(s) in some rounds: c (node 3): round 3, update dropped")
    assert "c" not in {r["site"] for r in RunDir(tmp_path).read_metrics() if r["round"] == 3 and r["phase"] == "train"}


def test_a_resumed_run_continues_from_its_last_step_and_sends_the_checkpointed_model_again(tmp_path):
    first = run_rounds(ScriptedSites(SITES), config(rounds=2), RunDir(tmp_path))
    grid = ScriptedSites(SITES)
    state = run_rounds(grid, config(rounds=3), RunDir(tmp_path))
    # The resumed run starts at version 2 with nothing in flight: c's stale update from before the stop never arrives.
    assert {version for _, version in grid.sent} == {2}
    assert shift(state, first) == pytest.approx(1.5)
    assert shift(state, initial_state(config())) == pytest.approx(4.5)
    steps = [r["round"] for r in RunDir(tmp_path).read_metrics() if r["site"] == "*" and r["phase"] == "train"]
    assert steps == [1, 2, 3]


def test_under_dp_every_step_is_charged_without_amplification_by_sampling(tmp_path):
    cfg = RunConfig.from_dict({**config().model_dump(mode="json"), "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}})
    run_rounds(ScriptedSites(SITES), cfg, RunDir(tmp_path))
    last = [r for r in RunDir(tmp_path).read_metrics() if r["site"] == "*" and r["phase"] == "train"][-1]
    assert last["epsilon"] == pytest.approx(PrivacyAccount(1.0, cfg.privacy.delta, 2, 2).epsilon_after(3))
    privacy = torch.load(RunDir(tmp_path).base_model_path, weights_only=False)["privacy"]
    # Each buffer is charged as if it were the whole population: no claim rests on who happened to be fast.
    assert (privacy["rounds"], privacy["sampling"], privacy["accountant"]) == (3, ["2 of 2"], "exact gaussian (pld)")


def test_dp_clips_each_update_before_its_staleness_weight(tmp_path):
    cfg = RunConfig.from_dict({**config().model_dump(mode="json"), "privacy": {"clip_norm": 1.0}})
    state = run_rounds(ScriptedSites(SITES), cfg, RunDir(tmp_path))
    initial = initial_state(cfg)
    entries = sum(v.numel() for k, v in initial.items() if not k.startswith("params.heads.") or f".{TASK}." in k)
    clipped = 1.0 / math.sqrt(entries)  # every update has equal entries: clipped to norm 1, each entry is 1 / sqrt(entries)
    assert shift(state, initial) == pytest.approx(clipped * (1 + 1 + (1 / math.sqrt(3) + 1) / 2), rel=1e-5)


def test_secure_aggregation_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="secure.secagg cannot run with asynchronous.enabled yet"):
        RunConfig.from_dict({"asynchronous": {"enabled": True}, "secure": {"secagg": True}})


def test_a_straggler_delay_is_the_same_for_a_site_everywhere_and_spread_as_documented():
    cfg = RunConfig.from_dict({"stragglers": {"delay": 1.0, "sigma": 1.8, "sites": {"slow": 30.0}}})
    assert site_delay(cfg, "slow") == 30.0
    assert site_delay(cfg, "north") == site_delay(cfg, "north") != site_delay(cfg, "south")
    waits = sorted(site_delay(cfg, f"site-{i}") for i in range(4000))
    median, tenth = waits[len(waits) // 2], waits[int(0.9 * len(waits))]
    assert tenth / median == pytest.approx(math.exp(1.2816 * 1.8), rel=0.15)  # the docstring's "about 10x"


def test_keep_every_keeps_each_steps_model_with_the_seconds_since_the_roll_call(tmp_path):
    cfg = RunConfig.from_dict({**config().model_dump(mode="json", exclude_none=True), "server": {"lr": 1.0, "min_sites": 1, "keep_every": 2}})
    state = run_rounds(ScriptedSites(SITES), cfg, RunDir(tmp_path))
    kept = sorted((tmp_path / "models").iterdir())
    assert [p.name for p in kept] == ["round-00002.pt"]
    saved = torch.load(kept[0], weights_only=False)
    assert saved["round"] == 2 and saved["elapsed"] >= 0
    assert shift(saved["state"], initial_state(cfg)) == pytest.approx(3.0)  # two steps of (1 + 2) / 2
    assert shift(state, saved["state"]) == pytest.approx((4.0 / math.sqrt(3) + 1.0) / 2)
    assert cfg.digest() == config().digest()  # keeping models does not change what is trained: a resume may turn it on


def test_a_robust_rule_combines_the_buffers_staleness_weighted_updates(tmp_path):
    cfg = RunConfig.from_dict({**config(rounds=2, buffer=3).model_dump(mode="json", exclude_none=True), "aggregation": {"rule": "median"}})
    state = run_rounds(ScriptedSites({"a": (1.0, 1), "b": (2.0, 1), "c": (30.0, 2)}), cfg, RunDir(tmp_path))
    # Each step buffers a, b and then c, all on the newest version: median(1, 2, 30) = 2, where the mean would move 11.
    assert shift(state, initial_state(cfg)) == pytest.approx(4.0)


def test_a_run_folder_keeps_the_straggler_table_it_was_given(tmp_path):
    cfg = RunConfig.from_dict({"stragglers": {"delay": 0.5, "sites": {"hospital_018": 5.0, "st. mary's": 7.5}}})
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert RunConfig.load(path) == cfg


def test_when_the_other_sites_failed_a_short_buffer_of_min_sites_updates_makes_the_step(tmp_path, caplog):
    cfg = config(rounds=1, buffer=3)  # server.min_sites = 1
    with caplog.at_level(logging.WARNING, logger="flwr.fedmeta"):
        state = run_rounds(ScriptedSites({"a": (1.0, 1), "b": (2.0, 1), "c": (None, 1)}), cfg, RunDir(tmp_path))
    assert shift(state, initial_state(cfg)) == pytest.approx(1.5)
    assert "server step 1 from 2 update(s), fewer than asynchronous.buffer = 3: no other site can answer now" in caplog.text


def test_with_fewer_than_min_sites_able_to_answer_the_run_ends_in_one_line_after_its_retries(tmp_path):
    cfg = RunConfig.from_dict({
        **config(rounds=1, buffer=2).model_dump(mode="json", exclude_none=True), "federation": {"kind": "hospitals", "n_sites": 2}, "server": {"min_sites": 2, "retries": 1},
    })
    grid = ScriptedSites({"a": (1.0, 1), "b": (None, 1)})
    with pytest.raises(RuntimeError, match=r"asynchronous rounds: 1 update\(s\) buffered and no other site can answer \(server.min_sites = 2, 2 site\(s\) connected, 1 failed or stale\)"):
        run_rounds(grid, cfg, RunDir(tmp_path))
    assert [site for site, _ in grid.sent].count("b") == 2  # asked once more (server.retries = 1)


def test_a_buffer_larger_than_the_federation_is_refused_at_the_start(tmp_path):
    with pytest.raises(RuntimeError, match="asynchronous.buffer = 5 needs at least 5 sites; 3 answered the roll call"):
        run_rounds(ScriptedSites(SITES), config(buffer=5), RunDir(tmp_path))


def test_by_default_a_step_takes_half_the_sites_updates_rounded_up(tmp_path):
    state = run_rounds(ScriptedSites(SITES), config(rounds=3, buffer=None), RunDir(tmp_path))
    # Three sites: a step every two updates, as in the hand computation with buffer = 2.
    assert shift(state, initial_state(config())) == pytest.approx(1.5 + 1.5 + (4.0 / math.sqrt(3) + 1.0) / 2, rel=1e-6)
