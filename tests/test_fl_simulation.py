"""Federated meta-training in a real Flower simulation: gains, resumption and faults."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # Flower simulations or deployments: the suite's end-to-end runs

SMALL = """
name = "t"
rounds = {rounds}
seed = 0
[federation]
kind = "hospitals"
n_sites = {sites}
[model]
hidden = [32, 32]
[algorithm]
name = "fomaml"
lr = 0.05
adaptation_steps = 3
[local]
steps = 5
meta_batch = 4
[server]
optimizer = "sgd"
lr = 1.0
momentum = 0.5
min_sites = {min_sites}
retries = 0
[evaluation]
every = {every}
steps = 5
[simulation]
cpus_per_site = 1.0
failing_sites = {failing}
"""


def write_config(tmp_path: Path, rounds=3, sites=3, min_sites=2, every=100, failing=()):
    path = tmp_path / f"run_{rounds}_{sites}_{len(failing)}.toml"
    path.write_text(SMALL.format(rounds=rounds, sites=sites, min_sites=min_sites, every=every, failing=list(failing)))
    return path


def fedmeta(*args, check=True, **kwargs):
    return subprocess.run([sys.executable, "-m", "fedmeta.cli", *map(str, args)], capture_output=True, text=True, check=check, **kwargs)


def train_rows(run_dir: Path, phase="train"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["site"] == "*" and r["phase"] == phase]


def site_rows(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["site"] != "*"]


def base_state(run_dir: Path):
    return torch.load(run_dir / "base_model.pt", weights_only=False)["state"]


def untrained_metrics(config_path: Path, round_: int) -> dict[str, float]:
    """What the run's evaluation of ``round_`` would report for the round-0 model: the same sites, the same
    held-out rows, the same support draw and adaptation steps. The control a claim about training needs."""
    from fedmeta.data import hospital_federation
    from fedmeta.fl.app import initial_state
    from fedmeta.fl.config import RunConfig
    from fedmeta.fl.site_training import evaluate_site
    from fedmeta.fl.strategy import mean_site_metrics

    config = RunConfig.load(config_path)
    f = config.federation
    sites = hospital_federation(f.n_sites, f.seed, f.test_fraction)
    return mean_site_metrics([evaluate_site(config, site, initial_state(config), seed=config.seed + round_) for site in sites])


def test_personalized_model_beats_the_global_model(tmp_path):
    config = write_config(tmp_path, rounds=12, sites=6, every=4)
    fedmeta("train", "--config", config, "--run-dir", tmp_path / "run")
    final = train_rows(tmp_path / "run", phase="evaluate")[-1]
    assert final["round"] == 12
    # Sites differ most in length of stay; 5-shot adaptation must capture that.
    assert final["length_of_stay.personalized.mse"] < 0.9 * final["length_of_stay.global.mse"], final
    # Sites' base rates differ too: adapted accuracy, summed over the classification tasks, beats unadapted.
    tasks = ("mortality", "readmission_30d")
    personalized = sum(final[f"{t}.personalized.acc"] for t in tasks)
    assert personalized > sum(final[f"{t}.global.acc"] for t in tasks), final
    # Both hold for an untrained model too (adapting a random network helps it), so the control: the round-0
    # model adapted the same way. Measured: 1.445 untrained, 1.460 after one round, 1.566 after twelve.
    before = untrained_metrics(config, round_=12)
    assert personalized > sum(before[f"{t}.personalized.acc"] for t in tasks) + 0.06, (final, before)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in train_rows(tmp_path / "run", phase="evaluate")] == [4, 8, 12]
    per_site = [r for r in rows if r["phase"] == "evaluate" and r["site"] != "*"]
    assert len(per_site) == 3 * 6, "one evaluation row per site and evaluated round"


def test_a_killed_sampled_run_resumes_and_matches_an_uninterrupted_run(tmp_path):
    # Half the sites per round: sampling must follow the seed, not Flower's random node ids, for the runs to agree.
    config = write_config(tmp_path, rounds=4, sites=4, every=2)
    sampled = ["--set", "server.fraction_train=0.5"]
    fedmeta("train", "--config", config, "--run-dir", tmp_path / "straight", *sampled)

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmeta.cli", "train", "--config", str(config), "--run-dir", str(run), *sampled],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if (run / "checkpoint.pt").exists() and torch.load(run / "checkpoint.pt", weights_only=False)["round"] >= 2:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the run never checkpointed round 2")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "base_model.pt").exists(), "the run was killed before it finished"
    killed_at = torch.load(run / "checkpoint.pt", weights_only=False)
    assert killed_at["optimizer"]["buffers"], "momentum buffers are in the checkpoint"

    fedmeta("train", "--resume", run)
    assert [r["round"] for r in train_rows(run)] == [1, 2, 3, 4], "every round completes exactly once"
    assert [r["round"] for r in train_rows(run, phase="evaluate")] == [2, 4], "and is evaluated exactly once"
    trained = [sorted((r["round"], r["site"]) for r in site_rows(d) if r["phase"] == "train") for d in (tmp_path / "straight", run)]
    assert trained[0] == trained[1], "the resumed run trained the same sites in every round"
    assert len({site for _, site in trained[0]}) > 2, "and sampling did vary the sites between rounds"
    straight, resumed = base_state(tmp_path / "straight"), base_state(run)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-5, rtol=1e-4)


def test_a_raising_site_does_not_stop_training(tmp_path):
    config = write_config(tmp_path, rounds=2, sites=3, min_sites=2, failing=[1])
    fedmeta("train", "--config", config, "--run-dir", tmp_path / "run")
    rows = train_rows(tmp_path / "run")
    assert [(r["round"], r["sites"], r["failed_sites"], r["skipped"]) for r in rows] == [(1, 2, 1, False), (2, 2, 1, False)]


def test_a_round_with_too_few_replies_is_skipped_and_logged(tmp_path):
    config = write_config(tmp_path, rounds=2, sites=3, min_sites=2, failing=[0, 2])
    result = fedmeta("train", "--config", config, "--run-dir", tmp_path / "run")
    rows = train_rows(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [True, True]
    assert "fewer than server.min_sites = 2" in result.stderr + result.stdout
    assert (tmp_path / "run" / "base_model.pt").exists()


def test_one_ctrl_c_stops_training_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    config = write_config(tmp_path, rounds=500, sites=3)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmeta.cli", "train", "--config", str(config), "--run-dir", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint.pt").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "training never checkpointed a round"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground group
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=False)["round"]
    assert f"stopped after round {stopped_at} of 500" in " ".join(output.split()), output
    assert f"fedmeta train --resume {run}" in "".join(output.split("\n")), output
    assert not (run / "base_model.pt").exists()

    fedmeta("train", "--resume", run, "--rounds", stopped_at + 1)
    assert [r["round"] for r in train_rows(run)] == list(range(1, stopped_at + 2))
    again = fedmeta("train", "--resume", run)
    assert "is complete" in again.stdout and "final evaluation" not in again.stdout
