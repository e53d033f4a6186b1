"""Privacy, robustness and compression in real Flower simulations; what a site's messages contain."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from test_fl_simulation import base_state, fedmeta, train_rows, write_config

from fedmeta.data import hospital_federation
from fedmeta.data.site import held_out_mask
from fedmeta.fl.app import initial_state
from fedmeta.fl.config import RunConfig
from fedmeta.fl.site_training import evaluate_site
from fedmeta.fl.strategy import mean_site_metrics
from fedmeta.personalize import load_base, register_base
from fedmeta.registry import SiteHome

pytestmark = pytest.mark.slow  # Flower simulations or deployments: the suite's end-to-end runs


def final_score(run_dir, metric="mortality.global.auc"):
    return train_rows(run_dir, phase="evaluate")[-1][metric]


def untrained_score(config_path, metric="mortality.global.auc"):
    """The same score for the round-0 model, on the same sites' held-out rows: the control every training test needs."""
    config = RunConfig.load(config_path)
    f = config.federation
    sites = hospital_federation(f.n_sites, f.seed, f.test_fraction)
    return mean_site_metrics([evaluate_site(config, site, initial_state(config), seed=0) for site in sites])[metric]


def test_dp_reports_epsilon_every_round_stops_at_the_budget_and_records_it(tmp_path):
    # epsilon depends on the noise multiplier and the sampling only; a small clip keeps the noisy model finite.
    config = write_config(tmp_path, rounds=6, sites=4, min_sites=2)
    result = fedmeta(
        "train", "--config", config, "--run-dir", tmp_path / "run",
        "--set", "privacy.clip_norm=0.01", "--set", "privacy.noise_multiplier=4.0", "--set", "privacy.max_epsilon=5.0",
    )
    rows = train_rows(tmp_path / "run")
    epsilons = [r["epsilon"] for r in rows]
    # The exact Gaussian (full participation, no amplification): 4.98 after 5 rounds, 5.55 after a sixth.
    assert len(rows) == 5, "sigma 4 over all 4 sites spends 4.98 after 5 rounds and would reach 5.55 in a sixth"
    assert all(a < b for a, b in zip(epsilons, epsilons[1:])) and epsilons[-1] <= 5.0
    # Every site is in every sample: knowing the sample gains an attacker nothing.
    assert all(r["epsilon_known_sample"] == pytest.approx(r["epsilon"], rel=1e-9) for r in rows)
    printed = " ".join(result.stdout.split())  # rich wraps long lines
    assert f"after {len(rows)} round(s)" in printed and "would exceed privacy.max_epsilon" in printed
    assert "against anyone who sees only the released models" in printed and "against a participating site that learns who was sampled" in printed
    base = load_base(tmp_path / "run")
    assert base.round == len(rows) and base.privacy["epsilon"] == epsilons[-1] and base.privacy["delta"] == 1e-5
    version = register_base(SiteHome(tmp_path / "home"), base)
    assert version.lineage["privacy"]["epsilon"] == epsilons[-1], "the registry's manifest records the epsilon spent"


def test_a_robust_rule_survives_a_sign_flipping_site_that_wrecks_the_mean(tmp_path):
    config = write_config(tmp_path, rounds=4, sites=5, min_sites=2, every=4)
    attack = ["--set", "simulation.byzantine_sites=[2]", "--set", 'simulation.attack="sign_flip"']
    fedmeta("train", "--config", config, "--run-dir", tmp_path / "mean", *attack)
    fedmeta("train", "--config", config, "--run-dir", tmp_path / "median", *attack, "--set", 'aggregation.rule="median"')
    # AUC, not accuracy: the untrained model already predicts the majority class about as well as a trained one.
    untrained = untrained_score(config)
    attacked, robust = final_score(tmp_path / "mean"), final_score(tmp_path / "median")
    assert robust > untrained + 0.1, (untrained, robust)
    assert attacked < robust - 0.1, (attacked, robust)


def test_topk_uploads_and_int8_broadcasts_are_several_times_smaller_and_still_train(tmp_path):
    config = write_config(tmp_path, rounds=3, sites=3, min_sites=2, every=3)
    options = ["--set", 'compression.upload="topk"', "--set", "compression.topk_ratio=0.05", "--set", 'compression.broadcast="int8"']
    fedmeta("train", "--config", config, "--run-dir", tmp_path / "topk", *options)
    for row in train_rows(tmp_path / "topk"):
        # Everything a message carries (arrays, names, layout, metrics) against the float32 payload alone.
        assert row["upload_dense_bytes"] / row["upload_bytes"] > 5, row
        # The int8 layout (keys and shapes) travels with every broadcast: for this 2.7k-parameter model it is a
        # third of the message, so the gain is under the arrays' 4x.
        assert row["broadcast_dense_bytes"] / row["broadcast_bytes"] > 2.5, row
    untrained = untrained_score(config)
    assert final_score(tmp_path / "topk") > untrained + 0.1, (untrained, final_score(tmp_path / "topk"))


def test_secagg_gives_the_same_model_up_to_quantization_and_survives_a_dropout(tmp_path):
    config = write_config(tmp_path, rounds=2, sites=4, min_sites=2, failing=[1])
    fedmeta("train", "--config", config, "--run-dir", tmp_path / "plain")
    secure_run = fedmeta("train", "--config", config, "--run-dir", tmp_path / "secure", "--set", "secure.secagg=true", check=False)
    # The server cannot tell which site dropped out of SecAgg+ (or whether chaos testing asked it to), so the
    # command names the dropout and exits 1, as for any site the model was trained without.
    assert secure_run.returncode == 1 and "dropped out of the SecAgg+ protocol" in secure_run.stdout + secure_run.stderr, secure_run.stdout
    rows = train_rows(tmp_path / "secure")
    assert [(r["round"], r["sites"], r["failed_sites"], r["skipped"]) for r in rows] == [(1, 3, 1, False), (2, 3, 1, False)]
    assert "upload_bytes" not in rows[0], "the server never holds a site's update, so it reports no per-site bytes"
    plain, secure = base_state(tmp_path / "plain"), base_state(tmp_path / "secure")
    for key in plain:
        torch.testing.assert_close(secure[key], plain[key], atol=5e-4, rtol=0)
    initial = initial_state(RunConfig.load(config))
    assert max(float((plain[k] - initial[k]).abs().max()) for k in plain) > 0.05, "training moved the model far beyond the tolerance"


INSPECT = textwrap.dedent(
    """
    import json, sys
    import fedmeta.fl.exchange as wire
    from fedmeta.fl.config import RunConfig
    from fedmeta.fl.simulation import run_simulation

    seen = []
    exchange = wire.exchange

    def recording_exchange(grid, groups, timeout, poll=0.1):
        replies = exchange(grid, groups, timeout, poll)
        for phase, messages in replies.items():
            for m in messages:
                content = m.content
                seen.append({
                    "phase": phase,
                    "records": sorted(content.keys()),
                    "arrays": {k: [list(v.shape), v.dtype] for k, v in (content["arrays"].items() if "arrays" in content else [])},
                    "metrics": {k: type(v).__name__ for k, v in content["metrics"].items()},
                    "site": {k: type(v).__name__ for k, v in content["site"].items()},
                    "sums": content["site"].get("feature-sums"),
                    "mapping": content["site"].get("mapping-status"),
                    "name": content["site"].get("name"),
                })
        return replies

    wire.exchange = recording_exchange
    config = RunConfig.load(sys.argv[1], sys.argv[3:])
    run_simulation(config, sys.argv[2])
    print("SEEN " + json.dumps(seen))
    """
)


def _hospitals_leaving_age_to_the_federation(folder, n_sites, seed=0):
    """The hospitals as CSV sites whose schema states every numeric feature's mean and std but age's; returns the frames."""
    from fedmeta.data.synthetic import hospital_federation_frames

    schema, frames = hospital_federation_frames(n_sites, seed)
    rows = pd.concat(frames.values())
    stated = {f.name: (rows[f.name].mean(), rows[f.name].std(ddof=0) or 1.0) for f in schema.features if f.type == "numeric" and f.name != "age"}
    schema = schema.with_statistics(stated)
    schema = schema.model_copy(update={"features": [f.model_copy(update={"mean": None, "std": None}) if f.name == "age" else f for f in schema.features]})
    folder.mkdir()
    schema.save(folder / "schema.json")
    for name, frame in frames.items():
        frame.to_csv(folder / f"{name}.csv", index=False)
    assert schema.unnormalized == ["age"]
    return frames


def test_sites_send_only_updates_of_the_model_shapes_and_scalar_metrics(tmp_path):
    config_path = write_config(tmp_path, rounds=2, sites=3, min_sites=2, every=1)
    # Age's statistics are left to the federation, so the roll call's sums branch carries data.
    frames = _hospitals_leaving_age_to_the_federation(tmp_path / "sites", n_sites=3)
    on_disk = ['federation.kind="csv"', f'federation.data_dir="{tmp_path / "sites"}"']
    out = subprocess.run([sys.executable, "-c", INSPECT, config_path, tmp_path / "run", *on_disk], capture_output=True, text=True, check=True)
    federation = RunConfig.load(config_path, on_disk).federation
    seen = json.loads(out.stdout.split("SEEN ", 1)[1])
    model = torch.load(tmp_path / "run" / "base_model.pt", weights_only=True)["state"]
    shapes = {k: list(v.shape) for k, v in model.items()}
    assert {m["phase"] for m in seen} == {"roll-call", "train", "evaluate"} and len(seen) == 3 + 3 * 2 + 3
    allowed = re.compile(r"^(evaluation\.)?(loss|seconds|restarts|examples|examples\.\w+|\w+\.(global|personalized)\.(acc|auc|mse))$")
    for message in seen:
        assert set(message["records"]) <= {"arrays", "metrics", "site"}
        if message["phase"] == "roll-call":
            # Besides its name, the roll call's only other answers: per feature the federation normalizes, three numbers,
            # and its mapping's digest and counts (none here: the sites are in the schema's dialect).
            assert message["site"] == {"name": "str", "feature-sums": "str", "mapping-status": "str"}
            assert json.loads(message["mapping"]) == {"digest": None, "mapped": 0, "converted": 0, "recoded": 0, "review": 0}
            # Age's count, sum and sum of squares over the site's training rows; nothing for the stated features.
            frame = frames[message["name"]]
            age = frame["age"].to_numpy(np.float64)[~held_out_mask(message["name"], len(frame), federation.test_fraction, federation.seed)]
            assert json.loads(message["sums"]) == {"age": pytest.approx([len(age), age.sum(), (age**2).sum()], rel=1e-9)}
        else:
            assert message["site"] == {"name": "str"}
        # Every number a site reports is one scalar about the site, never a list of per-row values.
        assert all(kind in ("int", "float") for kind in message["metrics"].values()), message["metrics"]
        assert all(allowed.match(key) for key in message["metrics"]), sorted(message["metrics"])
        if message["phase"] == "train":
            assert message["arrays"], "a training reply carries its update"
            for key, (shape, dtype) in message["arrays"].items():
                assert shapes.get(key) == shape, f"{key}: {shape} is not a parameter of the model"
                assert dtype == "float32"
        else:
            assert message["arrays"] == {}, "roll-call and evaluation replies carry metrics only"
    assert sorted(m["name"] for m in seen if m["phase"] == "roll-call") == sorted(frames)
    # The base model normalizes age with those sums combined: the mean and population std of every training row.
    training = np.concatenate([f["age"].to_numpy(np.float64)[~held_out_mask(name, len(f), federation.test_fraction, federation.seed)] for name, f in frames.items()])
    normalization = torch.load(tmp_path / "run" / "base_model.pt", weights_only=True)["normalization"]
    assert normalization["age"] == pytest.approx([training.mean(), training.std()], rel=1e-6)
