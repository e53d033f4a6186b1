"""The multi-machine layout of examples/deployment/ on 127.0.0.1: what a site can reach, and a SuperLink restart.

One deployment, as the README sets it up: a TLS SuperLink with site authentication and a persistent
database, listening for the coordinator only; an nginx gateway (examples/deployment/coordinator/gateway.conf)
on the sites' address forwarding the Fleet API alone; two SuperNodes dialling the gateway under a restart
policy. The "site" connection is what every site holds: the gateway's address and ca.crt.
"""

import json
import time

import pytest

from fedmeta.data import write_hospital_federation
from fedmeta.fl.loopback import LoopbackDeployment

pytestmark = pytest.mark.slow  # a Deployment Engine with TLS, a gateway, and a restart: about two minutes

CONFIG = """
name = "restart"
rounds = 2
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
min_sites = 2
sampling_timeout = 120
[evaluation]
every = 2
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("network")
    schema, paths = write_hospital_federation(root / "data", n_sites=3, seed=3)
    (root / "late").mkdir()
    paths[2].rename(root / "late" / paths[2].name)  # the third hospital joins late, in one test
    paths = paths[:2]
    with LoopbackDeployment([(p, schema) for p in paths], log_dir=root, secure=True, gateway=True, supervise=True) as dep:
        assert dep.wait_online(2) == 2, dep.log("gateway") if (root / "gateway.log").exists() else ""
        yield dep, root


def test_a_site_cannot_register_a_node_key_while_the_coordinator_on_loopback_can(deployment):
    dep, _ = deployment
    assert dep.can_register_node("loopback"), "the control: the same command works on the coordinator's own address"
    assert not dep.site_can_register_node()


def test_a_site_cannot_start_a_run_while_the_coordinator_on_loopback_can(deployment):
    dep, _ = deployment
    assert dep.can_start_run("loopback"), "the control: the same command works on the coordinator's own address"
    assert not dep.site_can_start_run()


def _train_rounds(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["round"] for r in rows if r["site"] == "*" and r["phase"] == "train"]


def test_a_restarted_superlink_keeps_its_sites_and_a_relaunch_resumes_after_the_last_checkpoint(deployment):
    dep, root = deployment
    (root / "run.toml").write_text(CONFIG.format(data=root / "data"))
    run_dir = root / "run"
    before = sorted(n["node-id"] for n in dep.online_nodes())
    restarts = dict(dep.restarts)
    stream = dep.start_run(root / "run.toml", run_dir, root / "stream.log")
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoint.pt").exists():  # round 1 trained through the gateway and checkpointed
        assert stream.poll() is None and time.monotonic() < deadline, (root / "stream.log").read_text()
        time.sleep(0.2)
    dep.restart_superlink()
    assert stream.wait(30) != 0, "the log stream ends with the SuperLink that served it"
    assert dep.wait_online(2) == 2, "the sites reconnect by themselves"
    assert sorted(n["node-id"] for n in dep.online_nodes()) == before, "same nodes: registrations survived in the database"
    assert dep.restarts == restarts, "the SuperNodes retried their connection: none exited"
    result = dep.run(root / "run.toml", run_dir, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming {run_dir} after round 1" in result.stdout + result.stderr
    assert _train_rounds(run_dir) == [1, 2], "each round once: round 2 ran after the restart, round 1 not again"
    assert (run_dir / "base_model.pt").exists()


def test_a_site_started_before_its_key_is_registered_comes_online_once_it_is(deployment):
    dep, root = deployment
    name = dep.start_site(root / "late" / "hospital_002.csv", root / "data" / "schema.json", register=False)
    try:
        deadline = time.monotonic() + 60
        while not dep.restarts.get(name):  # refused, exited, started again by the restart policy
            assert time.monotonic() < deadline, dep.log(name)
            time.sleep(0.2)
        assert "Failed to activate SuperNode" in dep.log(name)
        dep.register(dep.site_keys[name], name)
        assert dep.wait_online(3) == 3, dep.log(name)
    finally:
        dep.stop_site(name)
    deadline = time.monotonic() + 60
    while len(dep.online_nodes()) != 2:  # the others' tests count the two original sites
        assert time.monotonic() < deadline, dep.online_nodes()
        time.sleep(0.5)
