"""Around a Deployment Engine run on 127.0.0.1: a second launch on a held run folder, a site killed mid-run.

The scenario is benchmarks/deployment_faults.py's (one 2-round run, three sites), run once for these tests.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from fedmeta.data import write_hospital_federation
from fedmeta.fl.loopback import LoopbackDeployment

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("deployment_faults", Path(__file__).parents[1] / "benchmarks" / "deployment_faults.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    schema, paths = write_hospital_federation(root / "data", n_sites=3, seed=3)
    with LoopbackDeployment([(p, schema) for p in paths], log_dir=root) as dep:
        assert faults.wait_until(lambda: len(dep.online_nodes()) == 3)
        yield faults.double_launch_and_killed_site(dep, root), root


def test_a_second_launch_on_a_held_run_folder_is_refused_and_writes_no_round_twice(scenario):
    result, root = scenario
    assert result["double_launch_refused"], result["second_output"][-2000:]
    assert "flwr stop" in result["second_output"], "the refusal says how to stop the holder"
    rounds = [json.loads(line)["round"] for line in (root / "faults" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["site"] == "*" and json.loads(line)["phase"] == "train"]
    assert rounds == [1, 2] and result["duplicate_rounds"] == 0


def test_a_site_killed_mid_run_is_named_in_the_summary_and_the_launch_exits_non_zero(scenario):
    result, root = scenario
    out = result["first_output"]
    assert result["killed_site_named"], out[-3000:]
    assert result["exit_status_with_dropped_site"] == 1
    assert "the base model was trained without 1 site(s) in some rounds: hospital_002 (node " in out
    assert "on node 1 failed" not in out, "a failure is not blamed on the SuperLink's own node id"
    sites = json.loads((root / "faults" / "sites.json").read_text())["sites"]
    assert sites["hospital_002"]["missed"] and not sites["hospital_000"]["missed"] and not sites["hospital_001"]["missed"]


def test_each_round_is_one_line_for_the_coordinator(scenario):
    result, _ = scenario
    for round_ in (1, 2):
        assert f"round {round_}/2: loss " in result["first_output"]
    assert "site(s) replied" in result["first_output"]


def test_the_surviving_sites_receive_the_base_model_and_the_summary_says_which(scenario):
    result, root = scenario
    assert result["base_model_at_sites"] == 2
    summary = json.loads((root / "faults" / "sites.json").read_text())["summary"]
    assert summary["delivered"] == ["hospital_000", "hospital_001"]
    assert "stored in 2 of 3 site homes" in result["first_output"]
