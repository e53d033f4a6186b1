"""Flower's Deployment Engine on 127.0.0.1: a SuperLink, two SuperNodes with CSV site data, flwr run."""

import json
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch

from fedmeta.data import write_hospital_federation
from fedmeta.data.site import held_out_mask
from fedmeta.fl.loopback import LoopbackDeployment
from fedmeta.manifest import sha256_file
from fedmeta.registry import SiteHome

pytestmark = pytest.mark.slow  # Flower simulations or deployments: the suite's end-to-end runs

CONFIG = """
name = "deployment"
rounds = 2
[federation]
kind = "csv"
n_sites = {n_sites}
data_dir = "{data}"
[model]
hidden = [16]
[local]
steps = 2
meta_batch = 2
[server]
min_sites = {min_sites}
sampling_timeout = {sampling_timeout}
[evaluation]
every = 2
"""


def sites_left_to_normalize(folder, n_sites):
    """Hospital site files whose schema leaves every numeric feature's mean and std to the federation."""
    schema, paths = write_hospital_federation(folder, n_sites=n_sites, seed=3)
    raw = json.loads(schema.read_text())
    for feature in raw["features"]:
        feature.pop("mean", None), feature.pop("std", None)
    schema.write_text(json.dumps(raw))
    return schema, paths


def training_rows_statistics(paths, schema, seed=0, test_fraction=0.25):
    """The reference: pandas' mean and population std of each numeric feature over the sites' training rows."""
    frames = []
    for path in paths:
        frame = pd.read_csv(path)
        frames.append(frame[~held_out_mask(path.stem, len(frame), test_fraction, seed)])
    rows = pd.concat(frames)
    numeric = [f["name"] for f in json.loads(schema.read_text())["features"] if f["type"] == "numeric"]
    return {name: (rows[name].mean(), rows[name].std(ddof=0)) for name in numeric}


def assert_base_normalized_like(run_dir, expected):
    normalization = torch.load(run_dir / "base_model.pt", weights_only=True)["normalization"]
    assert sorted(normalization) == sorted(expected)
    for name, (mean, std) in expected.items():
        assert normalization[name] == pytest.approx([mean, std], rel=1e-6), name  # sites hold float32 rows


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    schema, paths = sites_left_to_normalize(root / "data", n_sites=2)
    with LoopbackDeployment([(p, schema) for p in paths], log_dir=root) as dep:
        yield dep, root
    for proc in dep.procs:
        assert proc.poll() is not None


def config(root, name, min_sites=2, sampling_timeout=60):
    path = root / f"{name}.toml"
    path.write_text(CONFIG.format(data=root / "data", n_sites=max(2, min_sites), min_sites=min_sites, sampling_timeout=sampling_timeout))
    return path


def test_two_supernodes_complete_two_rounds_on_their_csv_files(deployment):
    dep, root = deployment
    result = dep.run(config(root, "ok"), root / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["site"] == "*" and r["phase"] == "train"]
    assert [(r["round"], r["sites"], r["skipped"]) for r in train] == [(1, 2, False), (2, 2, False)]
    assert {r["site"] for r in rows if r["site"] != "*"} == {"hospital_000", "hospital_001"}, "sites name themselves from their node config"
    # The schema left normalization to the federation: the sites' roll-call sums make pandas' statistics of
    # their training rows together (held-out rows excluded), and the sites trained and scored with them.
    assert_base_normalized_like(root / "run", training_rows_statistics(sorted((root / "data").glob("*.csv")), root / "data" / "schema.json"))


def test_too_few_supernodes_end_the_run_with_a_clear_error(deployment):
    dep, root = deployment
    result = dep.run(config(root, "three", min_sites=3, sampling_timeout=2), root / "too_few", timeout=120)
    assert "only 2 site(s) connected after waiting 2 s; the run needs at least 3" in result.stdout + result.stderr
    assert not (root / "too_few" / "base_model.pt").exists()


ASYNCHRONOUS = """
name = "async"
rounds = 6
[federation]
kind = "csv"
n_sites = 2
data_dir = "{data}"
[model]
hidden = [16]
[local]
steps = 2
meta_batch = 2
[server]
min_sites = 1
[asynchronous]
enabled = true
buffer = 1
max_staleness = 0
[compression]
upload = "int8"
[stragglers]
sites = {{hospital_000 = 1.0, hospital_001 = 4.0}}
"""


def test_asynchronous_rounds_with_int8_uploads_step_on_the_fast_site_and_drop_and_name_the_slow_sites_stale_update(deployment):
    dep, root = deployment
    (root / "async.toml").write_text(ASYNCHRONOUS.format(data=root / "data"))
    result = dep.run(root / "async.toml", root / "async")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (root / "async" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["phase"] == "train" and r["site"] != "*"]
    # One update per server step (buffer = 1), each on the newest model: staleness 0 is all max_staleness = 0 lets through.
    assert [(r["round"], r["model_version"], r["staleness"]) for r in steps] == [(n, n - 1, 0) for n in range(1, 7)]
    assert {r["site"] for r in steps} == {"hospital_000"}
    # hospital_001 waits 4 s per message: each of its updates arrives after a step on hospital_000's and is named, then dropped.
    assert "site hospital_001: its update on model version 0 arrived" in result.stdout + result.stderr
    assert "hospital_001" in json.loads((root / "async" / "sites.json").read_text())["summary"]["trained_without"]
    assert {r["site"] for r in rows if r["phase"] == "evaluate" and r["site"] != "*"} == {"hospital_000", "hospital_001"}


def test_every_process_started_is_stopped(tmp_path):
    schema, paths = write_hospital_federation(tmp_path / "data", n_sites=1, seed=0)
    with LoopbackDeployment([(paths[0], schema)], log_dir=tmp_path) as dep:
        pids = [p.pid for p in dep.procs]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _wait_until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_with_tls_and_site_keys_registered_sites_train_under_secagg_and_an_unregistered_site_is_refused(tmp_path):
    schema, paths = sites_left_to_normalize(tmp_path / "data", n_sites=2)
    with LoopbackDeployment([(p, schema) for p in paths], log_dir=tmp_path, secure=True, intruders=1) as dep:
        intruder = dep.supernodes["intruder0"]
        assert _wait_until(lambda: intruder.poll() is not None), "the unregistered SuperNode is turned away and exits"
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in dep.log("intruder0")
        assert "No SuperNode found with the given public key" in dep.log("superlink")
        assert _wait_until(lambda: len(dep.online_nodes()) == 2), dep.online_nodes()
        path = tmp_path / "run.toml"
        text = CONFIG.format(data=tmp_path / "data", n_sites=2, min_sites=2, sampling_timeout=60)
        path.write_text(text.replace("rounds = 2", "rounds = 1").replace("[evaluation]", "[secure]\nsecagg = true\n[evaluation]"))
        result = dep.run(path, tmp_path / "run")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Secure aggregation completed." in result.stdout + result.stderr, "the round ran SecAgg+ over the TLS link"
        train = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [(r["round"], r["sites"]) for r in train if r["site"] == "*" and r["phase"] == "train"] == [(1, 2)]
        # SecAgg+ messages carry the federation's statistics too (a site refuses to train on raw values).
        assert_base_normalized_like(tmp_path / "run", training_rows_statistics(paths, schema))
        assert "--insecure" not in " ".join(dep.procs[0].args), "the SuperLink serves TLS only"


def _one_round(dep, root, name, n_sites, round_timeout=None):
    path = root / f"{name}.toml"
    text = CONFIG.format(data=root / "data", n_sites=n_sites, min_sites=2, sampling_timeout=60).replace("rounds = 2", "rounds = 1")
    if round_timeout is not None:
        text = text.replace("[evaluation]", f"round_timeout = {round_timeout:.0f}\n[evaluation]")
    path.write_text(text)
    result = dep.run(path, root / name)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return rows, result.stdout + result.stderr


def test_a_site_that_vanishes_is_waited_for_once_and_the_survivors_aggregate(tmp_path):
    schema, paths = write_hospital_federation(tmp_path / "data", n_sites=3, seed=3)
    with LoopbackDeployment([(p, schema) for p in paths], log_dir=tmp_path) as dep:
        assert _wait_until(lambda: len(dep.online_nodes()) == 3)
        # The control: a healthy run on this machine as loaded as it is now. Its final evaluation is one exchange with
        # every site, each starting its app process for the message; the timeout is derived from it.
        healthy = next(r["seconds"] for r in _one_round(dep, tmp_path, "healthy", n_sites=3)[0] if r["site"] == "*" and r["phase"] == "evaluate")
        gone = dep.supernodes["supernode2"]
        os.killpg(gone.pid, signal.SIGKILL)  # no goodbye: the SuperLink still lists it for a while
        gone.wait()
        rows, log = _one_round(dep, tmp_path, "vanished", n_sites=3, round_timeout=max(10.0, 2 * healthy))
        train = [r for r in rows if r["site"] == "*" and r["phase"] == "train"]
        assert [(r["round"], r.get("sites"), r["skipped"]) for r in train] == [(1, 2, False)], train
        assert {r["site"] for r in rows if r["site"] != "*"} == {"hospital_000", "hospital_001"}
        # The silent node is named once, at its roll call, and not waited for again: training and the final evaluation
        # skip it. Which words the roll call uses depends on timing: if the SuperLink has already missed the node's
        # heartbeats it answers "Node Unavailable" at once, otherwise the roll call waits out round_timeout.
        lines = log.splitlines()
        roll_call = [i for i, line in enumerate(lines) if "roll call:" in line]
        assert len(roll_call) == 1 and ("did not answer within" in lines[roll_call[0]] or "Node Unavailable" in lines[roll_call[0]]), log
        assert not any("did not reply within" in line for line in lines[roll_call[0] + 1 :]), log


REGIONAL = CONFIG + """
[regions]
rounds = 1
min_sites = 2
"""


def test_sites_that_declare_a_region_in_their_node_config_train_its_base_and_receive_it(tmp_path):
    schema, paths = sites_left_to_normalize(tmp_path / "data", n_sites=3)
    regions = {"hospital_000": "north", "hospital_001": "north", "hospital_002": "south"}
    with LoopbackDeployment([(p, schema) for p in paths], log_dir=tmp_path, regions=regions) as dep:
        path = tmp_path / "regional.toml"
        path.write_text(REGIONAL.format(data=tmp_path / "data", n_sites=3, min_sites=3, sampling_timeout=60))
        result = dep.run(path, tmp_path / "run")
        assert result.returncode == 0, result.stdout + result.stderr
        north = SiteHome.existing(dep.site_homes["supernode0"])  # the homes go with the deployment
        assert north.registry.get(2).parent == 1 and north.registry.get(2).sha256 == sha256_file(tmp_path / "run" / "regions" / "north" / "base_model.pt")
    plan = json.loads((tmp_path / "run" / "regions.json").read_text())["regions"]
    assert plan["north"]["trained"] and plan["north"]["sites"] == ["hospital_000", "hospital_001"]
    assert plan["south"]["note"] == "kept the global base: 1 site(s), fewer than regions.min_sites = 2"
    rows = [json.loads(line) for line in (tmp_path / "run" / "regions" / "north" / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows if r["phase"] == "train" and r["site"] != "*"} == {"hospital_000", "hospital_001"}
    delivered = {r["site"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if r["phase"] == "deliver"}
    assert delivered["hospital_000"]["regional_version"] == "v2" and "regional_version" not in delivered["hospital_002"]
