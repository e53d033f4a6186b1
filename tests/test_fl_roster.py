"""The run's roster: sites by name, what each round missed, and the summary a coordinator reads."""

import json

from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.fl.roster import Roster, rounds_text, without_text

NODES = {11: "clinic_a", 12: "clinic_b", 13: "clinic_c"}


def three_rounds(tmp_path):
    roster = Roster(tmp_path)
    everyone = ["clinic_a", "clinic_b", "clinic_c"]
    roster.record(1, NODES, [11, 12, 13], everyone, everyone, [])
    roster.record(2, NODES, [11, 12, 13], everyone, ["clinic_a", "clinic_b"], [("clinic_c", "Node Unavailable")])
    roster.record(3, NODES, [11, 12], ["clinic_a", "clinic_b"], ["clinic_a", "clinic_b"], [])
    return roster


def test_a_site_that_fails_then_disconnects_is_missed_in_both_rounds_by_name(tmp_path):
    roster = three_rounds(tmp_path)
    assert roster.trained_without() == {"clinic_c": {"2": "Node Unavailable", "3": "not connected"}}
    assert roster.sites["clinic_c"]["status"] == "disconnected"
    assert (roster.sites["clinic_c"]["node"], roster.sites["clinic_c"]["last_round"]) == (13, 1)


def test_a_site_left_out_by_sampling_has_missed_nothing_but_a_silent_sampled_site_has(tmp_path):
    roster = Roster(tmp_path)
    roster.record(1, NODES, [11, 12, 13], ["clinic_a", "clinic_b"], ["clinic_a"], [])
    assert roster.sites["clinic_c"]["status"] == "not sampled"
    assert roster.trained_without() == {"clinic_b": {"1": "no reply within server.round_timeout"}}


def test_a_retry_that_reaches_the_site_clears_the_round(tmp_path):
    roster = Roster(tmp_path)
    roster.record(1, NODES, [11, 12, 13], list(NODES.values()), ["clinic_a"], [("clinic_b", "boom"), ("clinic_c", "boom")])
    roster.record(1, NODES, [11, 12, 13], list(NODES.values()), list(NODES.values()), [])
    assert roster.trained_without() == {}


def test_the_saved_roster_resumes_without_the_rounds_after_the_checkpoint(tmp_path):
    three_rounds(tmp_path).save()
    resumed = Roster.load(tmp_path, after_round=2)
    assert resumed.round == 2
    assert resumed.trained_without() == {"clinic_c": {"2": "Node Unavailable"}}
    assert json.loads((tmp_path / "sites.json").read_text())["round"] == 3


def test_a_site_restarted_under_a_new_node_id_is_shown_with_the_connected_one(tmp_path):
    roster = Roster(tmp_path)
    roster.record(1, {**NODES, 99: "clinic_a"}, [99, 12, 13], list(NODES.values()), list(NODES.values()), [])
    assert roster.sites["clinic_a"]["node"] == 99


def test_the_summary_line_names_each_site_its_node_rounds_and_last_reason():
    line = without_text({"clinic_c": {"2": "Node Unavailable", "3": "not connected", "5": "not connected"}}, {"clinic_c": 13})
    assert line == "the base model was trained without 1 site(s) in some rounds: clinic_c (node 13): rounds 2-3, 5, not connected"
    assert rounds_text([4]) == "round 4"


def test_fedmeta_sites_shows_each_sites_rounds_missed_and_mapping_status(tmp_path):
    roster = three_rounds(tmp_path)
    roster.record_mappings({"clinic_a": {"digest": "ab" * 32, "mapped": 6, "converted": 1, "recoded": 2, "review": 1},
                            "clinic_b": {"digest": None, "mapped": 0, "converted": 0, "recoded": 0, "review": 0}, "clinic_c": None})
    roster.save()
    result = CliRunner().invoke(app, ["sites", str(tmp_path)])
    assert result.exit_code == 0, result.output
    # At 80 columns each site is a block: its name, then one "column: value" line per cell.
    blocks = {block.split("\n")[0]: block for block in result.output.split("\nclinic_")[1:]}
    assert "mapping: abababababab: 6 mapped, 1 under review" in blocks["a"]
    assert "mapping: none" in blocks["b"] and "mapping: not reported" in blocks["c"]
    assert "missed: rounds 2-3: not connected" in blocks["c"]
