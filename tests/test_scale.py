"""A round's cost does not grow with the population (issue 27, item 5; measured by benchmarks/scale.py).

What each fix keeps true: Flower's simulation hands out waiting messages in
one pass over them (not one pass per node) to as many sites at once as it
has actors (not the machine's cores + 4), a simulated FedProx site draws
only its own rows yet is bit-identical to the whole federation's, and a
round's roster writes what changed without re-encoding every site.
"""

import json
import os
import random
import threading

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

import fedmeta.fl.roster as roster_module
from fedmeta.data.synthetic import FedProxSites, fedprox_synthetic
from fedmeta.fl.roster import Roster
from fedmeta.fl.simulation_polling import install, pending_messages


@pytest.fixture
def link(monkeypatch):
    """Flower's in-memory LinkState with 1,000 registered simulated nodes and a run, as run_simulation sets them up."""
    for name, value in (("_task_id", 8), ("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)  # Flower's process-wide identity, which run_simulation sets
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = _register_nodes(1000, factory)
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 8, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[8] = Task(task_id=8, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def _push(grid, node_ids):
    messages = [Message(content=RecordDict({"config": ConfigRecord({"i": i})}), message_type=MessageType.QUERY, dst_node_id=n) for i, n in enumerate(node_ids)]
    return list(grid.push_messages(messages))


def test_a_sweep_hands_out_each_nodes_oldest_message_once_checking_the_store_once(link):
    state, grid, nodes = link
    a, b, c = list(nodes)[:3]
    first, second, third = _push(grid, [a, a, b])
    checks = []
    check = state._check_stored_messages
    state._check_stored_messages = lambda ids, run_id=None: (checks.append(len(ids)), check(ids, run_id))
    handed = pending_messages(state, nodes)
    # Flower's own loop asks each of the 1,000 nodes in turn, each time re-checking every stored message.
    assert checks == [3]
    assert {(m.metadata.dst_node_id, m.metadata.message_id) for m in handed} == {(a, first), (b, third)}
    assert all(m.metadata.delivered_at for m in handed)
    assert [m.metadata.message_id for m in pending_messages(state, nodes)] == [second]
    assert pending_messages(state, nodes) == []
    assert c not in {m.metadata.dst_node_id for m in handed}


def test_the_simulation_runtime_runs_every_worker_at_once_beyond_the_cores_plus_four(monkeypatch):
    for name in ("add_messages_to_queue", "ThreadPoolExecutor"):
        monkeypatch.setattr(vce_api, name, getattr(vce_api, name))  # install() replaces both; restored afterwards
    install()
    workers = (os.cpu_count() or 1) + 8  # one per actor: 20 at cpus_per_site 0.1 on 2 cores
    together = threading.Barrier(workers, timeout=30)  # generous: a busy machine starts threads late; the capped pool never fills it
    with vce_api.ThreadPoolExecutor() as pool:  # as Flower's run_api builds it
        futures = [pool.submit(together.wait) for _ in range(workers)]
    # Flower's workers loop until the run stops: one the pool cannot start at once never serves its actor.
    assert [f.exception() for f in futures] == [None] * workers


def test_a_fedprox_site_drawn_alone_is_the_whole_federations_site_bit_for_bit():
    whole = fedprox_synthetic(0.5, 1.0, n_sites=40, seed=3, test_fraction=0.3)
    sites = FedProxSites(0.5, 1.0, n_sites=40, seed=3, test_fraction=0.3, cached=2)
    order = list(range(40))
    random.Random(0).shuffle(order)
    for k in order + order[:5]:  # out of order, past the cache, and again from the saved start states
        site = sites[k]
        assert site.name == whole[k].name
        assert np.array_equal(site.x, whole[k].x) and np.array_equal(site.labels["label"], whole[k].labels["label"])
        assert np.array_equal(site.test_mask, whole[k].test_mask)
    with pytest.raises(IndexError, match="site 40 of a FedProx federation of 40 sites"):
        sites[40]


def _population(n):
    return {1000 + i: f"site_{i:04d}" for i in range(n)}


def test_a_rounds_roster_encodes_only_the_sites_it_changed(tmp_path, monkeypatch):
    nodes = _population(1000)
    roster = Roster(tmp_path)
    roster.record(1, nodes, list(nodes), ["site_0001", "site_0002"], ["site_0001", "site_0002"], [])
    roster.save()
    encoded = []
    dumps = json.dumps
    monkeypatch.setattr(roster_module.json, "dumps", lambda obj, **kw: (encoded.append(obj), dumps(obj, **kw))[1])
    roster.record(2, nodes, list(nodes), ["site_0003"], ["site_0003"], [])
    roster.save()
    site_records = [obj for obj in encoded if isinstance(obj, dict) and "status" in obj]
    # site_0003 trained; site_0001 and site_0002 went back to "not sampled"; the other 997 are untouched.
    assert len(site_records) == 3


def test_the_saved_roster_is_every_sites_current_status_after_rounds_that_change_few(tmp_path):
    nodes = _population(30)
    roster = Roster(tmp_path)
    roster.record(1, nodes, list(nodes), ["site_0001", "site_0002"], ["site_0001"], [("site_0002", "boom")])
    roster.save()
    gone = [n for n in nodes if nodes[n] != "site_0005"]
    roster.record(2, nodes, gone, ["site_0003"], ["site_0003"], [])
    roster.save()
    roster.record(3, nodes, list(nodes), ["site_0004"], [], [])
    roster.save({"round": 3})
    saved = json.loads((tmp_path / "sites.json").read_text())
    assert saved["sites"] == roster.sites and saved["round"] == 3 and saved["summary"] == {"round": 3}
    status = {name: site["status"] for name, site in saved["sites"].items()}
    assert (status["site_0001"], status["site_0002"], status["site_0003"], status["site_0004"], status["site_0005"]) == (
        "not sampled", "not sampled", "not sampled", "no reply", "not sampled",
    )
    assert saved["sites"]["site_0005"]["missed"] == {"2": "not connected"}
    assert Roster.load(tmp_path).sites == roster.sites


def test_a_failure_that_names_no_known_site_leaves_every_row_as_it_was(tmp_path):
    roster = Roster(tmp_path)
    nodes = {1: "north", 2: "south"}
    roster.record(1, nodes, [1, 2], ["north", "south"], ["north", "south"], [])
    # SecAgg+ reports its dropouts as one failure about several sites, not a site of the roster.
    roster.record(2, nodes, [1, 2], ["north", "south"], ["north"], [("(several)", "1 site(s) dropped out of the SecAgg+ protocol")])
    assert sorted(roster.sites) == ["north", "south"]
    assert (roster.sites["south"]["status"], roster.sites["south"]["missed"]) == ("no reply", {"2": "no reply within server.round_timeout"})
