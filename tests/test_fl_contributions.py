"""Contributions (fedmeta.fl.contributions): Shapley values against hand computations, and a run's ledger on real site code.

The run tests drive the real ClientApp functions (roll call, training,
evaluation) in this process through :class:`InProcessSites`, a ``Grid`` that
answers each message at once: real local meta-training on the hospitals'
generated rows, no Flower engine.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from flwr.app import Context, RecordDict

from fedmeta.fl import contributions, site_app
from fedmeta.fl.app import run_rounds
from fedmeta.fl.aggregation import SiteUpdate, group_updates, weighted_mean
from fedmeta.fl.config import ConfigError, RunConfig
from fedmeta.fl.run_dir import RunDir
from tests.grids import ImmediateGrid, act_as_a_flower_task

TASK = "t"


def test_exact_shapley_matches_the_hand_computed_values_of_a_three_site_game():
    # v(S) for sites a, b, c; by hand: phi_a = 1/3 [v(a)] + 1/6 [v(ab)-v(b) + v(ac)-v(c)] + 1/3 [v(abc)-v(bc)]
    v = {"": 0, "a": 4, "b": 2, "c": 0, "ab": 8, "ac": 4, "bc": 3, "abc": 9}
    value = lambda s: v["".join(sorted(s))]  # noqa: E731
    phi = contributions.exact_shapley("abc", value)
    by_hand = {
        "a": 4 / 3 + (8 - 2 + 4 - 0) / 6 + (9 - 3) / 3,
        "b": 2 / 3 + (8 - 4 + 3 - 0) / 6 + (9 - 4) / 3,
        "c": 0 / 3 + (4 - 4 + 3 - 2) / 6 + (9 - 8) / 3,
    }
    assert {p: round(float(x), 9) for p, x in phi.items()} == {p: round(x, 9) for p, x in by_hand.items()}
    assert math.isclose(sum(float(x) for x in phi.values()), v["abc"])  # efficiency


def test_the_permutation_estimate_converges_to_exact_shapley_on_the_three_site_game():
    v = {"": 0, "a": 4, "b": 2, "c": 0, "ab": 8, "ac": 4, "bc": 3, "abc": 9}
    value = lambda s: v["".join(sorted(s))]  # noqa: E731
    exact = contributions.exact_shapley("abc", value)
    mean, se = contributions.permutation_shapley("abc", value, samples=3000, rng=random.Random(0), truncation=0.0)
    for p in "abc":
        assert abs(float(mean[p]) - float(exact[p])) < 4 * float(se[p]) + 1e-9
        assert float(se[p]) < 0.1


def test_truncation_stops_a_permutation_once_its_prefix_is_worth_the_whole_round():
    calls = []

    def value(s):
        calls.append(s)
        return 1.0 if "a" in s else 0.0  # only a is worth anything

    mean, _ = contributions.permutation_shapley("abcdef", value, samples=50, rng=random.Random(1), truncation=0.01)
    assert float(mean["a"]) == pytest.approx(1.0) and all(float(mean[p]) == 0 for p in "bcdef")
    # Without truncation each permutation evaluates its 5 proper prefixes; with it, those after a are skipped.
    assert len(calls) < 2 + 50 * 5 * 0.75


def updates(*values: float, examples: int = 10) -> list[SiteUpdate]:
    return [SiteUpdate(name, {"params.body.w": torch.tensor([v, 0.0])}, {TASK: examples}) for name, v in zip("abcdefghijkl", values)]


def mean_rule(us):
    return weighted_mean(group_updates(us))


def test_a_site_is_valued_by_the_other_sites_gradients_to_first_order():
    # Server lr 1, gradient (1, 0) everywhere: v(S) = mean of S's values; with a, b, c = 1, 2, 3 (all within
    # the median norm 2 except c, clipped to 2), v = {a:1, b:2, c:2, ab:1.5, ac:1.5, bc:2, abc:5/3}.
    grads = {s: {"params.body.w": torch.tensor([1.0, 0.0])} for s in "abc"}
    values = contributions.round_values(updates(1, 2, 3), grads, mean_rule, lr=1.0, samples=1, rng=random.Random(0))
    v = {"": 0, "a": 1, "b": 2, "c": 2, "ab": 1.5, "ac": 1.5, "bc": 2, "abc": 5 / 3}
    exact = contributions.exact_shapley("abc", lambda s: v["".join(sorted(s))])
    assert {s: round(x, 6) for s, (x, *_) in values.items()} == {s: round(float(exact[s]), 6) for s in "abc"}


def test_the_mean_rules_closed_form_values_coalitions_as_combining_their_updates_does():
    torch.manual_seed(0)
    shapes = {"params.body.w": (4, 3), "params.heads.a.w": (2,), "params.heads.b.w": (3,)}
    sites = []
    for i in range(7):  # every third site has no task b: it holds no head b
        examples = {"a": 10 + 7 * i, **({"b": 5 + i} if i % 3 else {})}
        sites.append(SiteUpdate(f"s{i}", {k: torch.randn(s) for k, s in shapes.items() if k != "params.heads.b.w" or "b" in examples}, examples))
    grads = {u.site: {k: torch.randn(s) for k, s in shapes.items()} for u in sites}
    closed = contributions.round_values(sites, grads, None, 0.5, 1, random.Random(0))
    combined = contributions.round_values(sites, grads, mean_rule, 0.5, 1, random.Random(0))
    assert set(closed) == set(combined)
    for site in closed:
        assert closed[site] == pytest.approx(combined[site], rel=1e-5, abs=1e-7), site


def test_a_site_never_scores_itself_and_one_lying_scorer_cannot_move_the_median():
    honest = {"params.body.w": torch.tensor([1.0, 0.0])}
    grads = {s: honest for s in "abcd"}
    fair = contributions.round_values(updates(1, 1, 1, 1), grads, mean_rule, lr=1.0, samples=1, rng=random.Random(0))
    # d claims a huge gradient along the others' updates (to make its own look good) and against nobody else's.
    lying = contributions.round_values(updates(1, 1, 1, 1), {**grads, "d": {"params.body.w": torch.tensor([1e6, 0.0])}}, mean_rule, 1.0, 1, random.Random(0))
    assert lying["d"][0] == pytest.approx(fair["d"][0])
    assert all(lying[s][0] == pytest.approx(fair[s][0]) for s in "abc")
    # With two sites each is valued by the other alone: the liar's own gradient still counts for nothing.
    pair = contributions.round_values(updates(1, 1), {"a": honest, "b": {"params.body.w": torch.tensor([1e6, 0.0])}}, mean_rule, 1.0, 1, random.Random(0))
    assert pair["b"][0] == pytest.approx(0.5)


def test_scaling_an_update_up_earns_no_more_than_a_typical_step():
    grads = {s: {"params.body.w": torch.tensor([1.0, 0.0])} for s in "abcd"}
    normal = contributions.round_values(updates(1, 1, 1, 1), grads, mean_rule, 1.0, 1, random.Random(0))
    inflated = contributions.round_values(updates(1, 1, 1, 100), grads, mean_rule, 1.0, 1, random.Random(0))
    assert inflated["d"][0] == pytest.approx(normal["d"][0])


def test_a_free_rider_and_a_harmful_update_come_out_below_the_helpful_ones():
    grads = {s: {"params.body.w": torch.tensor([1.0, 0.0])} for s in "abcd"}
    values = contributions.round_values(updates(1, 0.8, 0, -1), grads, mean_rule, 1.0, 1, random.Random(0))
    # c sends nothing (it dilutes the mean), d pushes the wrong way.
    assert values["d"][0] < values["c"][0] < 0 < values["b"][0] < values["a"][0]


def test_contributions_are_refused_with_differential_privacy_and_with_asynchronous_rounds():
    with pytest.raises(ConfigError, match="contributions.enabled cannot run with privacy.clip_norm"):
        RunConfig.from_dict({"contributions": {"enabled": True}, "privacy": {"clip_norm": 1.0}})
    with pytest.raises(ConfigError, match="contributions.enabled needs synchronous rounds"):
        RunConfig.from_dict({"contributions": {"enabled": True}, "asynchronous": {"enabled": True}})


def test_turning_contributions_on_changes_the_digest_but_the_section_left_off_does_not():
    off = RunConfig()
    assert RunConfig.from_dict({"contributions": {"enabled": False}}).digest() == off.digest()
    assert RunConfig.from_dict({"contributions": {"enabled": True}}).digest() != off.digest()


# --- a run on real site code ------------------------------------------------------------------------------


class InProcessSites(ImmediateGrid):
    """Sites that are the real ClientApp functions, called in this process (partition i = node i + 1)."""

    def __init__(self, config: RunConfig):
        super().__init__({i + 1: f"partition {i}" for i in range(config.federation.n_sites)})
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": node - 1}, state=RecordDict(), run_config={}) for node in self.nodes}

    def reply(self, message):
        handler = {"train": site_app.train, "evaluate": site_app.evaluate, "query": site_app.roll_call}[message.metadata.message_type]
        return handler(message, self.contexts[message.metadata.dst_node_id])


@pytest.fixture(autouse=True)
def in_a_flower_task(monkeypatch):
    act_as_a_flower_task(monkeypatch)


def run_config(rounds=3, **extra) -> RunConfig:
    return RunConfig.from_dict({
        "rounds": rounds, "federation": {"kind": "hospitals", "n_sites": 4}, "model": {"hidden": [8]},
        "local": {"steps": 3, "meta_batch": 2}, "server": {"lr": 1.0, "momentum": 0.0, "min_sites": 2}, "evaluation": {"every": 100},
        "regions": {"rounds": 0}, "contributions": {"enabled": True}, **extra,
    })


def contributions_of(run_dir, config) -> dict:
    run_rounds(InProcessSites(config), config, RunDir(run_dir))
    return json.loads((run_dir / contributions.REPORT).read_text())


def test_a_run_writes_each_sites_contribution_and_a_site_that_free_rides_loses_its_value(tmp_path):
    honest = contributions_of(tmp_path / "honest", run_config())
    report = contributions_of(tmp_path / "free", run_config(simulation={"free_riders": [0]}))
    sites = report["sites"]
    assert report["method"] == contributions.FIRST_ORDER and len(sites) == 4
    assert all(s["rounds"] == 3 and s["seconds"] > 0 and s["rows"] and s["failures"] == 0 for s in sites.values())
    assert all(s["ci"][0] <= s["contribution"] <= s["ci"][1] for s in sites.values())
    rider = sorted(sites)[0]  # the hospitals' partition 0
    assert honest["sites"][rider]["contribution"] > 0, "the control: the same site, training honestly, helps the others"
    assert sites[rider]["contribution"] < 0, "sending nothing while claiming its rows dilutes everyone's step"


def test_a_resumed_run_keeps_the_rounds_its_checkpoint_kept_and_continues_the_estimates(tmp_path):
    whole = tmp_path / "whole"
    config = run_config(rounds=3)
    run_rounds(InProcessSites(config), config, RunDir(whole))
    cut = tmp_path / "cut"
    run_rounds(InProcessSites(run_config(rounds=2)), run_config(rounds=2), RunDir(cut))
    report = json.loads((cut / contributions.REPORT).read_text())
    report["by_round"].append({"round": 3, "values": {"x": [99.0, 0.0]}, "seconds": {}, "rows": {}})  # written after the checkpoint
    (cut / contributions.REPORT).write_text(json.dumps(report))
    run_rounds(InProcessSites(config), config, RunDir(cut))
    resumed = json.loads((cut / contributions.REPORT).read_text())
    expected = json.loads((whole / contributions.REPORT).read_text())
    assert [r["round"] for r in resumed["by_round"]] == [1, 2, 3]
    assert {s: v["contribution"] for s, v in resumed["sites"].items()} == pytest.approx({s: v["contribution"] for s, v in expected["sites"].items()})


def test_under_secagg_the_server_takes_each_sites_self_score_and_the_report_says_so(tmp_path):
    from types import SimpleNamespace

    from fedmeta.fl.aggregation import ServerSGD
    from fedmeta.fl.secagg import secure_vector
    from fedmeta.fl.strategy import MetaStrategy

    # A site's self score: lr * g . u, its own update against its own held-out gradient.
    assert contributions.self_score({"params.body.w": torch.tensor([1.0, -2.0])}, {"params.body.w": torch.tensor([3.0, 1.0])}, lr=0.5) == pytest.approx(0.5)
    config = RunConfig.from_dict({"secure": {"secagg": True}, "contributions": {"enabled": True}})
    current = {"params.body.w": torch.zeros(2)}
    sites = [(1, "x", 0.25), (2, "y", -0.5)]
    vectors = [secure_vector(config, ["params.body.w"], {"params.body.w": torch.ones(2)}, {TASK: 10}) for _ in sites]
    replies = [(n, {"site-name": s, "loss": 1.0, "examples": 10, f"examples.{TASK}": 10, contributions.SELF_SCORE: score, "seconds": 0.1}) for n, s, score in sites]
    secure = SimpleNamespace(nodes=[1, 2], replies=replies, aggregate=[sum(parts) for parts in zip(*vectors)], broadcast_bytes=0, broadcast_dense_bytes=0)
    strategy = MetaStrategy(config, ServerSGD(lr=1.0), random.Random(0))
    strategy.current = current
    strategy.aggregate_secure(1, secure)
    assert strategy.round_contributions == {"x": (0.25, 0.0, 1), "y": (-0.5, 0.0, 1)}, "one scorer each: the site itself"
    ledger = contributions.Ledger(contributions.SELF_SCORED)
    report = contributions.record_round(ledger, tmp_path, 1, strategy.round_contributions, strategy.site_rows, {})
    assert report["method"] == contributions.SELF_SCORED and report["sites"]["y"]["contribution"] == -0.5
    # A self-report is one number with no spread to estimate its error from: no interval, and no site named to check on it.
    assert report["sites"]["y"]["ci"] is None and contributions.to_check(report) == []


def test_a_damaged_report_is_refused_on_resume_in_one_line(tmp_path):
    (tmp_path / contributions.REPORT).write_text("{}")
    with pytest.raises(ValueError, match="contributions.json: not a contributions report"):
        contributions.Ledger.load(tmp_path, after_round=2)


def test_a_few_rounds_of_three_sites_give_a_students_t_interval_that_does_not_name_a_site_the_normal_one_would():
    from scipy.stats import t

    ledger = contributions.Ledger()
    for round_ in (1, 2):  # three sites: each value is the median of two scorers, an error of one degree of freedom
        ledger.add(round_, {"a": (-0.08, 0.03, 2), "b": (0.05, 0.03, 2), "c": (0.04, 0.03, 2)}, {}, {})
    report = ledger.report()
    variance = 2 * 0.03**2
    df = variance**2 / (2 * 0.03**4 / 1)  # Welch-Satterthwaite over the two rounds: 2
    half = t.ppf(0.975, df) * variance**0.5
    assert report["sites"]["a"]["ci"] == pytest.approx([-0.16 - half, -0.16 + half], abs=1e-6)
    assert -0.16 + 1.96 * variance**0.5 < 0, "the control: 1.96 errors would have named site a"
    assert contributions.to_check(report) == []


def test_many_rounds_of_many_scorers_give_about_the_normal_interval_and_a_clear_loser_is_named():
    ledger = contributions.Ledger()
    for round_ in range(1, 31):
        ledger.add(round_, {"a": (-0.02, 0.01, 9), "b": (0.03, 0.01, 9)}, {}, {})
    lo, hi = ledger.report()["sites"]["a"]["ci"]
    normal = 1.96 * (30 * 0.01**2) ** 0.5
    assert (hi - lo) / 2 == pytest.approx(normal, rel=0.01)
    assert contributions.to_check(ledger.report()) == ["a"]


def test_a_round_with_one_other_scorer_leaves_the_interval_unknown_and_the_site_is_never_named():
    ledger = contributions.Ledger()
    ledger.add(1, {"a": (-0.5, 0.0, 1), "b": (0.2, 0.0, 1)}, {}, {})  # two sites: each scored by the other alone
    ledger.add(2, {"a": (-0.5, 0.01, 4), "b": (0.2, 0.01, 4)}, {}, {})
    report = ledger.report()
    assert report["sites"]["a"]["ci"] is None and report["sites"]["a"]["contribution"] == -1.0
    assert contributions.to_check(report) == []
    from fedmeta.fl.contribution_report import rows

    assert [r[2] for r in rows(report)] == ["unknown", "unknown"]


def test_two_sites_in_a_round_are_each_scored_by_one_other():
    updates = [SiteUpdate(name, {"params.body.w": torch.tensor([v])}, {TASK: 10}) for name, v in (("a", 1.0), ("b", -1.0))]
    gradients = {name: {"params.body.w": torch.tensor([1.0])} for name in "ab"}
    values = contributions.round_values(updates, gradients, None, lr=1.0, samples=8, rng=random.Random(0))
    assert {site: v[2] for site, v in values.items()} == {"a": 1, "b": 1}
