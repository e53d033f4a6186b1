"""Aggregation rules, server optimizers and bounded node waits, without a federation."""

import random

import pytest
import torch

from fedmeta.fl.aggregation import ServerAdam, ServerSGD, SiteUpdate, group_updates, select_for_tasks, weighted_mean
from fedmeta.fl.config import ConfigError, RunConfig
from fedmeta.fl.strategy import MetaStrategy, TooFewSitesError, wait_for_nodes


def test_body_averages_over_all_sites_and_heads_over_sites_with_the_task():
    a = SiteUpdate("a", {"params.body.w": torch.tensor([1.0]), "params.heads.x.w": torch.tensor([1.0])}, {"x": 30})
    b = SiteUpdate("b", {"params.body.w": torch.tensor([4.0]), "params.heads.y.w": torch.tensor([7.0])}, {"y": 10, "z": 50})
    mean = weighted_mean(group_updates([a, b]))
    assert mean["params.body.w"].item() == pytest.approx((30 * 1 + 60 * 4) / 90)
    assert mean["params.heads.x.w"].item() == pytest.approx(1.0)
    assert mean["params.heads.y.w"].item() == pytest.approx(7.0)


def test_a_site_receives_the_body_and_only_its_heads():
    flat = {"params.body.w": 0, "params.heads.x.w": 1, "params.heads.y.w": 2, "inner_lrs.heads.y.w": 3}
    assert sorted(select_for_tasks(flat, ["y"])) == ["inner_lrs.heads.y.w", "params.body.w", "params.heads.y.w"]


def test_server_sgd_momentum_matches_torch():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([p], lr=0.5, momentum=0.9)
    ours, state = ServerSGD(0.5, 0.9), {"k": p.detach().clone()}
    for g in [torch.tensor([0.3, 0.1]), torch.tensor([-0.2, 0.4]), torch.tensor([0.5, 0.5])]:
        p.grad = g.clone()
        opt.step()
        state = ours.step(state, {"k": g})
    torch.testing.assert_close(state["k"], p.detach())


def test_server_adam_matches_torch_and_survives_a_state_round_trip():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.Adam([p], lr=0.1)
    ours, state = ServerAdam(0.1), {"k": p.detach().clone()}
    for i, g in enumerate([torch.tensor([0.3, 0.1]), torch.tensor([-0.2, 0.4]), torch.tensor([0.5, 0.5])]):
        p.grad = g.clone()
        opt.step()
        if i == 1:
            restored = ServerAdam(0.1)
            restored.load_state_dict(ours.state_dict())
            ours = restored
        state = ours.step(state, {"k": g})
    torch.testing.assert_close(state["k"], p.detach())


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def test_waiting_for_too_few_nodes_ends_with_a_clear_error():
    with pytest.raises(TooFewSitesError, match=r"only 1 site\(s\) connected after waiting 0 s; the run needs at least 3"):
        wait_for_nodes(_Grid([7]), minimum=3, timeout=0.3, poll=0.05)
    assert wait_for_nodes(_Grid([3, 1, 2]), minimum=3, timeout=0.1) == [1, 2, 3]


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[server]\nlr = -1\n")
    with pytest.raises(ConfigError, match=r"server.lr: Input should be greater than 0"):
        RunConfig.load(path)
    with pytest.raises(ConfigError, match="algorithm.name"):
        RunConfig.from_dict({}, ["algorithm.name=mamlx"])
    assert RunConfig.from_dict({}, ["server.lr=0.5", "rounds=3"]).server.lr == 0.5


def test_binary_auc_matches_scikit_learn_with_ties():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from fedmeta.scoring import binary_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    score = np.round(rng.random(300) + 0.3 * y, 1)  # rounding makes many ties
    assert binary_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


class _Reply:
    """What the strategy reads from a Flower reply message: content records and the sender."""

    def __init__(self, node, site, update, examples, loss):
        from types import SimpleNamespace

        from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

        metrics = {"loss": loss, "examples": sum(examples.values()), **{f"examples.{t}": n for t, n in examples.items()}}
        self.content = {"site": ConfigRecord({"name": site}), "arrays": ArrayRecord(update), "metrics": MetricRecord(metrics)}
        self.metadata = SimpleNamespace(src_node_id=node, reply_to_message_id=f"message-to-{node}")

    def has_error(self):
        return False


def test_a_malformed_update_is_dropped_and_the_rest_aggregate():
    strategy = MetaStrategy(RunConfig(), ServerSGD(lr=1.0), random.Random(0))
    strategy.current = {"params.body.w": torch.zeros(3), "params.heads.a.w": torch.zeros(2)}
    good = {"params.body.w": torch.ones(3), "params.heads.a.w": torch.ones(2)}
    replies = [
        _Reply(1, "x", good, {"a": 10}, loss=1.0),
        _Reply(2, "y", {k: 3 * v for k, v in good.items()}, {"a": 10}, loss=3.0),
        _Reply(3, "z", {"params.body.w": torch.ones(4), "params.heads.a.w": torch.ones(2)}, {"a": 10}, loss=100.0),
        _Reply(4, "n", {"params.body.w": torch.full((3,), float("nan")), "params.heads.a.w": torch.ones(2)}, {"a": 10}, loss=100.0),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    state = arrays.to_torch_state_dict()
    assert torch.allclose(state["params.body.w"], torch.full((3,), -2.0)), "the mean of x and y only, applied with lr 1"
    assert (metrics["sites"], metrics["failed_sites"], metrics["loss"]) == (2, 2, 2.0)
    assert any("site z" in f for f in strategy.failures) and any("non-finite" in f for f in strategy.failures)


def test_the_server_step_does_not_depend_on_the_order_replies_arrive_in():
    # Flower hands replies over as they arrive. The mean is summed in float64 so that the step does not depend on
    # their order (float32 sums in another order differ in their last bits: this test failed on such a mean).
    g = torch.Generator().manual_seed(0)
    current = {"params.body.w": torch.zeros(64), "params.heads.a.w": torch.zeros(8)}
    replies = [_Reply(n, f"site-{n}", {k: torch.randn(v.shape, generator=g) for k, v in current.items()}, {"a": 7 * n + 3}, loss=float(n))
               for n in range(1, 13)]
    states = []
    for order in (replies, replies[::-1], replies[5:] + replies[:5]):
        strategy = MetaStrategy(RunConfig(), ServerSGD(lr=1.0), random.Random(0))
        strategy.current = dict(current)
        states.append(strategy.aggregate_train(1, order)[0].to_torch_state_dict())
    for state in states[1:]:
        assert all(torch.equal(state[k], states[0][k]) for k in current), "bit-identical whatever the arrival order"


def test_secagg_sums_give_the_same_step_and_loss_as_the_plain_weighted_mean():
    from types import SimpleNamespace

    from fedmeta.fl.secagg import secure_vector

    config = RunConfig()
    current = {"params.body.w": torch.zeros(3), "params.heads.a.w": torch.zeros(2), "params.heads.b.w": torch.zeros(2)}
    sites = [  # (node, site, update, examples per task, loss, rows): y has no head b; z labels few rows for b
        (1, "x", {k: torch.full(v.shape, 1.0) for k, v in current.items()}, {"a": 10, "b": 10}, 1.0, 10),
        (2, "y", {"params.body.w": torch.full((3,), 4.0), "params.heads.a.w": torch.full((2,), 4.0)}, {"a": 40}, 3.0, 40),
        (3, "z", {k: torch.full(v.shape, -2.0) for k, v in current.items()}, {"a": 20, "b": 5}, 2.0, 20),
    ]
    plain = MetaStrategy(config, ServerSGD(lr=1.0), random.Random(0))
    plain.current = dict(current)
    arrays, expected = plain.aggregate_train(1, [_Reply(n, s, u, e, loss=l) for n, s, u, e, l, _ in sites])

    keys = sorted(current)
    vectors = [secure_vector(config, keys, {k: u.get(k, torch.zeros_like(current[k])) for k in keys}, e) for _, _, u, e, _, _ in sites]
    replies = [(n, {"site-name": s, "loss": l, "examples": rows, **{f"examples.{t}": c for t, c in e.items()}}) for n, s, _, e, l, rows in sites]
    secure = SimpleNamespace(nodes=[1, 2, 3], replies=replies, aggregate=[sum(parts) for parts in zip(*vectors)], broadcast_bytes=0, broadcast_dense_bytes=0)
    strategy = MetaStrategy(config, ServerSGD(lr=1.0), random.Random(0))
    strategy.current = dict(current)
    secure_arrays, metrics = strategy.aggregate_secure(1, secure)
    for key, value in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(secure_arrays.to_torch_state_dict()[key], value, atol=1e-6, rtol=0)
    assert metrics["loss"] == pytest.approx(expected["loss"]), "the round's loss is weighted alike on both paths"
    assert metrics["sites"] == 3


def test_upload_bytes_count_everything_a_compressed_reply_carries_and_a_misnamed_layout_is_refused():
    from fedmeta.fl.compression import TopKCodec, keys_digest

    config = RunConfig.from_dict({"compression": {"upload": "topk", "topk_ratio": 0.5}})
    strategy = MetaStrategy(config, ServerSGD(lr=1.0), random.Random(0))
    strategy.current = {"params.body.w": torch.zeros(8), "params.heads.a.w": torch.zeros(2)}
    update = {"params.body.w": torch.arange(8.0), "params.heads.a.w": torch.ones(2)}
    replies = []
    for node, digest in ((1, keys_digest(sorted(update))), (2, keys_digest(sorted(update))), (3, keys_digest(["params.heads.a.w", "params.body.w"]))):
        strategy.sent_keys[node] = sorted(update)
        packed, _ = TopKCodec(0.5).encode(update, {})
        reply = _Reply(node, f"s{node}", packed, {"a": 10}, loss=1.0)
        reply.content["site"]["keys-digest"] = digest
        replies.append(reply)
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["sites"] == 2 and any("not laid out as the parameters it was sent" in f for f in strategy.failures)
    # What Flower counts for every reply received: arrays, the site record (name, layout fingerprint) and the metrics.
    sent = sum(r.content["arrays"].count_bytes() + r.content["site"].count_bytes() + r.content["metrics"].count_bytes() for r in replies)
    assert metrics["upload_bytes"] == sent > sum(r.content["arrays"].count_bytes() for r in replies)


class _JoiningGrid:
    """Nodes that register over time, as a simulation's do at start-up."""

    def __init__(self, nodes, per_call):
        self.nodes, self.per_call, self.calls = nodes, per_call, 0

    def get_node_ids(self):
        self.calls += 1
        return self.nodes[: self.per_call * self.calls]


def test_the_first_sample_waits_for_the_whole_federation_not_the_first_sites_to_connect():
    assert wait_for_nodes(_JoiningGrid(list(range(10)), per_call=3), minimum=2, timeout=30, poll=0.01, wanted=10) == list(range(10))
    # At the deadline, as many as connected will do if there are at least min_sites.
    assert wait_for_nodes(_Grid([4, 5, 6]), minimum=2, timeout=0.05, poll=0.01, wanted=10) == [4, 5, 6]


def test_a_sites_app_process_does_not_import_the_privacy_accountant():
    # Every message of a deployment starts a fresh ClientApp process; dp_accounting (and the scipy.signal it pulls in)
    # added 0.7 s to each start, and only the server computes epsilon.
    import subprocess
    import sys

    code = "import sys, fedmeta.fl.site_app; print(sorted(m for m in ('dp_accounting', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout
    assert out.strip() == "[]", out


def _sums_text(site):
    import json

    return json.dumps({name: list(v) for name, v in site.training_sums().items()})


def test_the_federations_normalization_from_roll_call_sums_equals_numpy_over_the_training_rows_together():
    import numpy as np

    from fedmeta.data import SiteData
    from fedmeta.data.schema import numeric_schema
    from fedmeta.data.synthetic import fedprox_schema
    from fedmeta.fl.normalization import combine_site_sums

    rng = np.random.default_rng(0)
    schema = numeric_schema(3, fedprox_schema().tasks)
    sites = [SiteData.from_arrays(f"s{i}", schema, rng.normal(10 * i, i + 1, size=(40 + 30 * i, 3)), {}, 0.25, 0) for i in range(3)]
    statistics = combine_site_sums({s.name: _sums_text(s) for s in sites})
    rows = np.concatenate([s.x[~s.test_mask] for s in sites]).astype(np.float64)  # training rows only: held-out rows take no part
    for j in range(3):
        assert statistics[f"x{j}"] == pytest.approx((rows[:, j].mean(), rows[:, j].std()), rel=1e-9)
    everything = np.concatenate([s.x for s in sites]).astype(np.float64)
    assert statistics["x0"][0] != pytest.approx(everything[:, 0].mean(), rel=1e-6), "the control: held-out rows would move the mean"


def test_roll_call_sums_that_cannot_be_real_are_left_out_and_only_a_federation_without_a_majority_stops():
    from fedmeta.fl.normalization import NormalizationError, combine_site_sums

    good = {"a": '{"age": [2, 100.0, 5000.0]}', "b": '{"age": [2, 140.0, 9800.0]}'}
    for bad in ('{"age": [2, 100.0, 10.0]}', '{"age": [1, 5.0, 25.0]}', '{"age": [2, NaN, 5.0]}', '{"age": [2, 1e400, 5.0]}', "not json", '{"age": 3}'):
        assert combine_site_sums({**good, "liar": bad}) == {"age": (60.0, 10.0)}, bad
    # A site with another schema (other features unset) is left out: two of three agree.
    assert combine_site_sums({**good, "c": '{"age": [2, 1.0, 1.0], "sodium": [2, 280.0, 39200.0]}'}) == {"age": (60.0, 10.0)}
    with pytest.raises(NormalizationError, match=r"no majority agrees: a for \['age'\]; c for \['age', 'sodium'\]"):
        combine_site_sums({"a": good["a"], "c": '{"age": [2, 1.0, 1.0], "sodium": [2, 280.0, 39200.0]}'})


def _honest_sites(n=9):
    """Nine hospitals' ages: means 58-66, stds 12-16, 80-400 training rows."""
    import numpy as np

    rng = np.random.default_rng(1)
    return {f"h{i}": rng.normal(58 + i, 12 + i / 2, size=80 + 40 * i) for i in range(n)}


@pytest.mark.parametrize(
    "liar",
    ["[1e9, 1e15, 1e21]", "[1e9, 0, 1e33]", "[1e9, 7e10, 5.125e12]", '"other features"'],
    ids=["mean 1e6", "std 1e12", "plausible values, a billion rows", "sums for other features"],
)
def test_one_malicious_site_cannot_move_the_normalization_outside_the_honest_sites_range(liar):
    import json

    import numpy as np

    from fedmeta.fl.normalization import combine_site_sums

    honest = _honest_sites()
    sums = {site: json.dumps({"age": [len(v), float(v.sum()), float((v**2).sum())]}) for site, v in honest.items()}
    attack = '{"sodium": [500, 70000.0, 9800000.0]}' if liar == '"other features"' else f'{{"age": {liar}}}'
    mean, std = combine_site_sums({**sums, "mallory": attack})["age"]
    site_means = [v.mean() for v in honest.values()]
    pooled = np.concatenate(list(honest.values()))
    assert min(site_means) <= mean <= max(site_means), mean
    assert min(v.std() for v in honest.values()) <= std <= 1.05 * pooled.std(), std
    if liar != '"other features"':
        # The control: the plain pooled combination the federation used before, on the same answers.
        n, s, ss = np.sum([json.loads(t)["age"] for t in (*sums.values(), attack)], axis=0)
        plain_mean, plain_std = s / n, np.sqrt(max(ss / n - (s / n) ** 2, 0))
        within = min(site_means) <= plain_mean <= max(site_means) and min(v.std() for v in honest.values()) <= plain_std <= 1.05 * pooled.std()
        assert not within, (plain_mean, plain_std)


def test_a_strategy_whose_roll_call_holds_a_liar_goes_on_sampling_with_the_honest_statistics():
    import json
    import random

    from fedmeta.fl.aggregation import ServerSGD
    from fedmeta.fl.config import RunConfig
    from fedmeta.fl.strategy import MetaStrategy

    honest = _honest_sites()
    config = RunConfig.from_dict({"federation": {"n_sites": 10}, "server": {"fraction_train": 0.5}})
    strategy = MetaStrategy(config, ServerSGD(1.0), random.Random(0))
    names = [*honest, "mallory"]
    strategy.roll_call = lambda grid, unknown: strategy.node_sites.update({n: names[n] for n in unknown})
    strategy.site_sums = {site: json.dumps({"age": [len(v), float(v.sum()), float((v**2).sum())]}) for site, v in honest.items()}
    strategy.site_sums["mallory"] = '{"age": [1e9, 1e15, 1e21]}'

    class Grid:
        def get_node_ids(self):
            return list(range(10))

    assert len(strategy._sample(Grid(), 0.5)) == 5
    assert 58 <= strategy.statistics["age"][0] <= 66