"""The coordinator sees each site's mapping status, never its columns or values (issue 26, item 4)."""

from __future__ import annotations

import json
import logging
import random
from types import SimpleNamespace

import pandas as pd
import pytest

from fedmeta.data.mapping import ColumnMapping, Mapping, status
from fedmeta.data.synthetic import hospital_federation_frames
from fedmeta.fl.aggregation import ServerSGD
from fedmeta.fl.config import RunConfig
from fedmeta.fl.mapping_status import STATUS, StatusError, column_limit, site_status, table, validated
from fedmeta.fl.strategy import MetaStrategy

UMOL_PER_MG_DL = 88.42  # creatinine


def hospitals_in_folders(root, dialect_site="hospital_001"):
    """Three hospital sites as ``<site>/train.csv``; ``dialect_site`` exports its own names, 0/1 sex codes and
    creatinine in µmol/L, with a mapping a person has reviewed (``review: false`` everywhere)."""
    schema, frames = hospital_federation_frames(3, 0)
    schema.save(root / "schema.json")
    for name, frame in frames.items():
        (root / name).mkdir(parents=True)
        if name == dialect_site:
            frame = frame.rename(columns={"age": "AGE_YRS", "sex": "Sex", "creatinine": "creat_umol_l"})
            frame["Sex"] = frame["Sex"].map({"F": 0, "M": 1})
            frame["creat_umol_l"] = frame["creat_umol_l"] * UMOL_PER_MG_DL
            frame.insert(0, "mrn", [f"m{i:05d}" for i in range(len(frame))])
            Mapping(schema_digest=schema.digest(), columns={
                "mrn": ColumnMapping(feature=None),
                "AGE_YRS": ColumnMapping(feature="age", confidence=0.9),
                "Sex": ColumnMapping(feature="sex", values={"0": "F", "1": "M"}, confidence=0.6, review=False, evidence="cleared by hand"),
                "creat_umol_l": ColumnMapping(feature="creatinine", scale=1 / UMOL_PER_MG_DL, confidence=0.8),
            }).save(root / name / "mapping.json")
        frame.to_csv(root / name / "train.csv", index=False, float_format="%.17g")
    return schema


GOOD = {"digest": "ab" * 32, "mapped": 4, "converted": 1, "recoded": 2, "review": 1}


def test_a_real_mappings_status_passes_the_servers_check_unchanged():
    mapping = Mapping(columns={"Sex": ColumnMapping(feature="sex", values={"M": "1"}), "chol_mmol": ColumnMapping(feature="chol", scale=38.67, review=True)})
    sent = json.dumps(status(mapping))
    assert validated(sent, limit=2) == status(mapping) == {"digest": mapping.digest(), "mapped": 2, "converted": 1, "recoded": 1, "review": 1}
    assert validated(json.dumps(status(None)), limit=2) == {"digest": None, "mapped": 0, "converted": 0, "recoded": 0, "review": 0}


MALFORMED = [
    (b"{}", "not JSON text but bytes"),
    ("x" * 300, "300 characters"),
    ("{not json", "not JSON"),
    (json.dumps([GOOD]), "expected digest"),
    (json.dumps({**GOOD, "columns": ["Sex"]}), "expected digest"),  # a column name has no field to travel in
    (json.dumps({k: v for k, v in GOOD.items() if k != "review"}), "expected digest"),
    (json.dumps({**GOOD, "digest": "Sex->sex"}), "digest 'Sex->sex'"),
    (json.dumps({**GOOD, "digest": "AB" * 32}), "lowercase hex"),
    (json.dumps({**GOOD, "digest": "a" * 65}), "lowercase hex"),
    (json.dumps({**GOOD, "mapped": -1}), "mapped = -1 is not an integer from 0 to 15"),
    (json.dumps({**GOOD, "mapped": 16}), "mapped = 16 is not an integer from 0 to 15"),
    (json.dumps({**GOOD, "mapped": 4.0}), "mapped = 4.0"),
    (json.dumps({**GOOD, "review": True}), "review = True"),
    (json.dumps({**GOOD, "recoded": "2"}), "recoded = '2'"),
    (json.dumps({**GOOD, "converted": 5}), "converted = 5 is more than mapped = 4"),
    (json.dumps({**GOOD, "digest": None}), "mapped = 4 without a mapping"),
]


@pytest.mark.parametrize("sent, named", MALFORMED, ids=[named for _, named in MALFORMED])
def test_the_server_refuses_a_status_that_cannot_be_real_naming_the_field(sent, named):
    assert validated(json.dumps(GOOD), limit=15)["mapped"] == 4  # the control: the same status, well formed
    with pytest.raises(StatusError, match="^[^\n]*$") as e:
        validated(sent, limit=15)
    assert named in str(e.value)


def test_no_mapping_can_count_more_than_the_schemas_features_and_labels():
    schema, _ = hospital_federation_frames(3, 0)
    assert column_limit(schema) == 12 + 3


class _RollCallReply:
    def __init__(self, node, site, mapping_status=None):
        from flwr.app import ConfigRecord, MetricRecord

        record = {"name": site} if mapping_status is None else {"name": site, STATUS: mapping_status}
        self.content = {"site": ConfigRecord(record), "metrics": MetricRecord({"examples.mortality": 10})}
        self.metadata = SimpleNamespace(src_node_id=node, reply_to_message_id=f"roll-call-to-{node}")

    def has_error(self):
        return False


def test_a_malformed_status_is_one_line_naming_the_site_and_the_roll_call_goes_on(monkeypatch, caplog):
    from flwr.supercore.task_identity import TaskIdentity

    from fedmeta.fl import exchange

    for name in ("_run_id", "_node_id", "_task_id"):  # Flower builds a Message only inside a task: be the ServerApp's
        monkeypatch.setattr(TaskIdentity, name, 1)

    replies = [
        _RollCallReply(1, "north", json.dumps(GOOD)),
        _RollCallReply(2, "mallory", json.dumps({**GOOD, "mapped": 10**9})),
        _RollCallReply(3, "older", None),  # a site that sends no status
    ]
    monkeypatch.setattr(exchange, "exchange", lambda grid, messages, timeout: {"roll-call": replies})
    strategy = MetaStrategy(RunConfig(), ServerSGD(lr=1.0), random.Random(0))
    strategy.mapping_limit = 15
    told = []
    strategy.on_roll_call = told.append
    with caplog.at_level(logging.WARNING, logger="flwr.fedmeta"):
        strategy.roll_call(grid=None, nodes=[1, 2, 3])
    assert strategy.node_sites == {1: "north", 2: "mallory", 3: "older"}
    assert strategy.mapping_status == {"north": GOOD, "mallory": None, "older": None}
    [line] = [r.getMessage() for r in caplog.records]
    assert line == "roll call: site mallory sent a malformed mapping status, ignored: mapped = 1000000000 is not an integer from 0 to 15"
    assert told == [["north", "mallory", "older"]]


def test_the_table_shows_each_site_its_short_digest_and_counts_and_what_it_did_not_report():
    lines = table({"older": None, "plain": status(None), "st-marys": {**GOOD, "digest": "0123456789abcdef" * 4}})
    assert [line.split() for line in lines] == [
        ["site", "mapping", "mapped", "converted", "recoded", "under", "review"],
        ["older", "not", "reported"],
        ["plain", "none", "0", "0", "0", "0"],
        ["st-marys", "0123456789ab", "4", "1", "2", "1"],
    ]
    # Counts stand right-aligned under their headings, so a column of numbers reads down.
    header, *_, last = lines
    assert header.index("under review") + len("under review") == len(last)


def test_a_deployments_server_logs_the_table_a_line_a_row_and_the_roster_keeps_each_status(tmp_path, caplog):
    from fedmeta.fl.app import RoundObserver, _report_mappings
    from fedmeta.fl.roster import Roster

    roster = Roster(tmp_path)
    statuses = {"north": GOOD, "older": None}
    with caplog.at_level(logging.INFO, logger="flwr.fedmeta"):
        _report_mappings(statuses, roster, RoundObserver(roster))  # flwr run's observer: the run's log, which `flwr run --stream` shows
    logged = [r.getMessage() for r in caplog.records if r.name == "flwr.fedmeta"]
    assert logged[0].startswith("mapping status at the roll call") and "no column name or value leaves a site" in logged[0]
    assert logged[1:] == [f"  {line}" for line in table(statuses)]
    assert {name: site["mapping"] for name, site in roster.sites.items()} == statuses


def test_a_folder_sites_answer_is_its_mapping_json_status_and_a_site_without_one_answers_none(tmp_path):
    from fedmeta.fl.site_app import _mapping_path

    hospitals_in_folders(tmp_path)
    config = RunConfig.from_dict({"federation": {"kind": "csv", "data_dir": str(tmp_path)}})
    answers = [json.loads(site_status(_mapping_path(SimpleNamespace(node_config={"partition-id": i}), config))) for i in range(3)]
    mapping = Mapping.load(tmp_path / "hospital_001" / "mapping.json")
    assert answers == [status(None), status(mapping), status(None)]
    assert answers[1] == {"digest": mapping.digest(), "mapped": 3, "converted": 1, "recoded": 1, "review": 0}
    # A SuperNode's is the one its node config names.
    node = {"data-path": str(tmp_path / "hospital_001" / "train.csv"), "schema-path": str(tmp_path / "schema.json")}
    supernode = SimpleNamespace(node_config={**node, "mapping-path": str(tmp_path / "hospital_001" / "mapping.json")})
    assert json.loads(site_status(_mapping_path(supernode, config))) == status(mapping)
    assert json.loads(site_status(_mapping_path(SimpleNamespace(node_config=node), config))) == status(None)


@pytest.mark.slow
def test_fedmeta_train_prints_the_mapping_table_before_round_1_and_sites_json_keeps_it(tmp_path):
    from typer.testing import CliRunner

    from fedmeta.cli import app

    hospitals_in_folders(tmp_path / "fed")
    (tmp_path / "run.toml").write_text(
        f'name = "m"\nrounds = 1\n[federation]\nkind = "csv"\ndata_dir = "{tmp_path / "fed"}"\n'
        "[model]\nhidden = [8]\n[local]\nsteps = 1\n[server]\nmin_sites = 3\n"
    )
    done = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "run.toml"), "--run-dir", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    first = lines.index("mapping status at the roll call (counts and digests only; no column name or value leaves a site):")
    assert first < next(i for i, line in enumerate(lines) if line.startswith("round 1/1"))
    digest = Mapping.load(tmp_path / "fed" / "hospital_001" / "mapping.json").digest()
    rows = {line.split()[0]: line.split()[1:] for line in lines[first + 2 : first + 5]}
    assert rows == {"hospital_000": ["none", "0", "0", "0", "0"], "hospital_001": [digest[:12], "3", "1", "1", "0"], "hospital_002": ["none", "0", "0", "0", "0"]}
    for column in ("AGE_YRS", "creat_umol_l", "mrn"):
        assert column not in done.output
    sites = json.loads((tmp_path / "run" / "sites.json").read_text())["sites"]
    assert sites["hospital_001"]["mapping"] == {"digest": digest, "mapped": 3, "converted": 1, "recoded": 1, "review": 0}
    assert sites["hospital_000"]["mapping"] == status(None)
