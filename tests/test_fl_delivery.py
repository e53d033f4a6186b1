"""The model reaches the sites: what a site does with the base model it receives, and what the coordinator records."""

import json

import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.data import write_hospital_federation
from fedmeta.fl.app import initial_state
from fedmeta.fl.config import RunConfig
from fedmeta.fl.delivery import (
    MESSAGE_TYPE,
    DeliveryRefused,
    _delivery_message,
    after_run,
    base_model_at_sites,
    delivery_rows,
    describe,
    handle,
    node_site_name,
    personalized_at_sites,
    receive,
    reply_fields,
)
from fedmeta.fl.run_dir import RunDir
from fedmeta.manifest import sha256_bytes
from fedmeta.registry import SiteHome

ROWS = 90  # enough for every task to personalize, few enough to keep the choice of candidates fast
LINEAGE = {"run": "unit", "round": 1, "config_digest": "d" * 64, "flower_run_id": 42}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One hospital site's CSV and schema, and a base model trained for them (round 0 is enough to store and personalize)."""
    root = tmp_path_factory.mktemp("delivery")
    schema, paths = write_hospital_federation(root / "data", n_sites=2, seed=3)
    config = RunConfig.from_dict({"name": "unit", "rounds": 1, "federation": {"kind": "csv", "data_dir": str(root / "data")}, "model": {"hidden": [8]}})
    numeric = [f["name"] for f in json.loads(schema.read_text())["features"] if f["type"] == "numeric"]
    rows = pd.concat(pd.read_csv(p) for p in paths)
    statistics = {name: (float(rows[name].mean()), float(rows[name].std(ddof=0))) for name in numeric}
    run_dir = RunDir(root / "run")
    run_dir.save_base_model(initial_state(config), config, 1, statistics=statistics)
    return config, run_dir.base_model_path, schema, paths[0]


def node(home, data=None, schema=None, **extra):
    config = {"site-home": str(home), **extra}
    if data is not None:
        config.update({"data-path": str(data), "schema-path": str(schema)})
    return config


def test_a_tampered_base_model_is_refused_and_nothing_is_stored(federation, tmp_path):
    config, base_model, _, _ = federation
    data = base_model.read_bytes()
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(DeliveryRefused, match="refusing to store it"):
        receive(tampered, sha256_bytes(data), node(tmp_path / "home", **{"site-name": "st-marys"}), config, LINEAGE)
    assert not (tmp_path / "home").exists()


def test_the_base_model_is_registered_with_the_runs_lineage(federation, tmp_path):
    config, base_model, _, _ = federation
    data = base_model.read_bytes()
    fields, scores = receive(data, sha256_bytes(data), node(tmp_path / "home", **{"site-name": "st-marys"}), config, LINEAGE)
    assert (fields, scores) == ({"site": "st-marys", "stored": True, "version": "v1"}, {})
    home = SiteHome.existing(tmp_path / "home")
    version = home.registry.by_sha256(sha256_bytes(data))
    manifest, stored = home.load(version)
    assert stored == data and version.kind == "base"
    assert manifest.training["delivery"] == {**LINEAGE, "site": "st-marys"} and manifest.training["round"] == 1
    assert manifest.run_id == f"unit-{config.digest()[:12]}" and version.lineage["run_id"] == manifest.run_id
    assert base_model_at_sites(base_model, [tmp_path / "home", tmp_path / "elsewhere"]) == 1


def test_a_stored_base_whose_file_was_replaced_is_not_counted(federation, tmp_path):
    config, base_model, _, _ = federation
    data = base_model.read_bytes()
    receive(data, sha256_bytes(data), node(tmp_path / "home"), config, LINEAGE)
    (stored,) = (tmp_path / "home" / "models").glob("*/base_model.pt")
    stored.write_bytes(data + b"\0")
    assert base_model_at_sites(base_model, [tmp_path / "home"]) == 0


def test_a_write_that_fails_midway_leaves_no_base_model_and_no_registration(federation, tmp_path, monkeypatch):
    config, base_model, _, _ = federation
    data = base_model.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fedmeta.files.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        receive(data, sha256_bytes(data), node(tmp_path / "home"), config, LINEAGE)
    monkeypatch.undo()
    assert not list((tmp_path / "home").rglob("base_model.pt")), "no half-written file under its final name"
    assert base_model_at_sites(base_model, [tmp_path / "home"]) == 0


def test_a_site_without_a_site_home_stores_nothing_and_says_why(federation, tmp_path):
    config, base_model, _, _ = federation
    data = base_model.read_bytes()
    fields, _ = receive(data, sha256_bytes(data), {"site-name": "st-marys"}, config, LINEAGE)
    assert fields["stored"] is False and "no site-home" in fields["reason"] and fields["site"] == "st-marys"


def test_the_coordinator_logs_one_line_naming_a_site_that_stored_nothing():
    answers = {5: {"site": "st-marys", "stored": False, "reason": "its node config has no site-home"}}
    (row,) = delivery_rows({5: "st-marys"}, answers, {5}, round_=3, sha="a" * 64, seconds=0.5)
    assert (row["phase"], row["site"], row["node"], row["stored"], row["round"]) == ("deliver", "st-marys", 5, False, 3)
    assert describe(row, timeout=600) == "site st-marys (node 5): stored nothing: its node config has no site-home"


def test_a_site_that_does_not_reply_or_left_is_recorded_as_not_stored_one_row_per_site_by_name():
    rows = delivery_rows({6: "a", 5: "b"}, {}, sent={6}, round_=1, sha="a" * 64, seconds=1.0)
    assert [(r["site"], r["stored"], r["reason"]) for r in rows] == [("a", False, "no reply"), ("b", False, "not connected at the end of the run")]
    assert "no reply within 600 s (deployment.timeout)" in describe(rows[0], timeout=600)


def test_a_site_names_itself_from_its_node_config_else_from_its_data_file():
    assert node_site_name({"site-name": "st-marys", "data-path": "/data/site.csv"}) == "st-marys"
    assert node_site_name({"data-path": "/data/st-marys.csv"}) == "st-marys"
    assert node_site_name({"data-path": "/data/st-marys/train.csv"}) == "st-marys"


def test_fedmeta_trains_simulation_delivers_nothing(federation):
    config, base_model, _, _ = federation
    simulation = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    assert after_run(None, config, RunDir(base_model.parent), {1: "a"}, 1, simulation) == []
    assert after_run(None, config, RunDir(base_model.parent), {1: "a"}, 1, None) == []


@pytest.mark.slow  # the default personalization weighs its candidates on validation folds: several seconds even on 90 rows
def test_with_personalize_the_site_promotes_a_personalized_model_under_its_node_name_and_replies_only_scores(federation, tmp_path):
    config, base_model, schema, data_path = federation
    site_file = tmp_path / "site.csv"  # the documented node config's file name: the site must not be registered as "site"
    pd.read_csv(data_path).head(ROWS).to_csv(site_file, index=False)
    personalizing = config.model_copy(update={"deployment": config.deployment.model_copy(update={"personalize": True})})
    data = base_model.read_bytes()
    fields, scores = receive(data, sha256_bytes(data), node(tmp_path / "home", site_file, schema, **{"site-name": "st-marys"}), personalizing, LINEAGE)
    assert fields["personalized"] is True and fields["candidate"] and fields["personalized_version"] == "v2"
    home = SiteHome.existing(tmp_path / "home")
    assert home.registry.sites() == ["st-marys"]
    promoted = home.current("st-marys")
    assert promoted.kind == "personalized" and promoted.lineage["base_sha256"] == sha256_bytes(data)
    assert scores and all(".base." in k or ".personalized." in k for k in scores) and all(isinstance(v, float) for v in scores.values())
    assert personalized_at_sites(base_model, [tmp_path / "home"]) == 1


@pytest.fixture
def in_a_flower_task(monkeypatch):
    """Flower builds a Message only inside a task (a ServerApp's or a ClientApp's): be one."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def sent(config, data, sha, node_id=5):
    message = _delivery_message(node_id, config, data, sha, LINEAGE)
    message.metadata.__dict__["_message_id"] = message.object_id  # what Grid.push_messages does
    return message


def test_the_message_the_server_sends_is_stored_byte_for_byte_at_the_site(federation, tmp_path, in_a_flower_task):
    config, base_model, _, _ = federation
    data = base_model.read_bytes()
    message = sent(config, data, sha256_bytes(data))
    assert message.metadata.message_type == MESSAGE_TYPE == "query.deliver_model"
    context = Context(run_id=1, node_id=5, node_config=node(tmp_path / "home", **{"site-name": "st-marys"}), state=RecordDict(), run_config={})
    assert reply_fields(handle(message, context)) == {"site": "st-marys", "stored": True, "version": "v1"}
    home = SiteHome.existing(tmp_path / "home")
    assert home.load(home.registry.by_sha256(sha256_bytes(data)))[1] == data


def test_a_tampered_message_is_answered_with_the_refusal_and_nothing_is_stored(federation, tmp_path, in_a_flower_task):
    config, base_model, _, _ = federation
    data = base_model.read_bytes()
    message = sent(config, data[:-1] + bytes([data[-1] ^ 1]), sha256_bytes(data))
    context = Context(run_id=1, node_id=5, node_config=node(tmp_path / "home", **{"site-name": "st-marys"}), state=RecordDict(), run_config={})
    answer = reply_fields(handle(message, context))
    assert answer["stored"] is False and "refusing to store it" in answer["reason"]
    assert not (tmp_path / "home").exists()
