"""On the Deployment Engine (127.0.0.1): at the end of a run every site's home holds the base model and its personalized model."""

import json

import pytest

from fedmeta.data import write_hospital_federation
from fedmeta.fl.delivery import base_model_at_sites, personalized_at_sites
from fedmeta.fl.loopback import LoopbackDeployment
from fedmeta.manifest import sha256_file
from fedmeta.registry import SiteHome

pytestmark = pytest.mark.slow  # a SuperLink, two SuperNodes and flwr run

CONFIG = """
name = "delivered"
rounds = 1
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
sampling_timeout = 60
[deployment]
personalize = true
timeout = 300
"""


def test_at_the_end_of_a_run_each_site_home_holds_the_base_model_and_a_promoted_personalized_model(tmp_path):
    schema, paths = write_hospital_federation(tmp_path / "data", n_sites=2, seed=3)
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(data=tmp_path / "data"))
    with LoopbackDeployment([(p, schema) for p in paths], log_dir=tmp_path) as dep:
        result = dep.run(config, tmp_path / "run")
        assert result.returncode == 0, result.stdout + result.stderr
        base_model, homes = tmp_path / "run" / "base_model.pt", list(dep.site_homes.values())
        assert base_model_at_sites(base_model, homes) == 2, "each home holds the coordinator's base_model.pt, hash for hash"
        assert personalized_at_sites(base_model, homes) == 2
        promoted = {SiteHome(home).only_site() for home in homes}
    assert promoted == {"hospital_000", "hospital_001"}, "each site registered under its node config's site-name"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    delivered = [r for r in rows if r["phase"] == "deliver"]
    assert sorted(r["site"] for r in delivered) == ["hospital_000", "hospital_001"]
    for row in delivered:
        assert row["stored"] and row["personalized"] and row["sha256"] == sha256_file(base_model), row
        assert any(".personalized." in key for key in row), "the coordinator records the site's held-out score"
        assert not any(key in row for key in ("rows", "data")), "scores only, never rows"
    log = result.stdout + result.stderr
    assert log.count("stored in its site home") == 2, log
