"""The regional base reaches its region's sites with the global one: checked, registered under it, weighed when personalizing."""

import json

import pandas as pd
import pytest
from flwr.app import Context, RecordDict

from fedmeta.data import load_site
from fedmeta.data.schema import Schema
from fedmeta.fl.aggregation import flatten_state
from fedmeta.fl.delivery import DeliveryRefused, _delivery_message, handle, receive, regional_bases, reply_fields
from fedmeta.fl.regions import Region, region_dir, save_regions
from fedmeta.fl.run_dir import RunDir
from fedmeta.manifest import sha256_bytes
from fedmeta.personalize import load_base
from fedmeta.personalize.candidates import fit_ditto
from fedmeta.registry import SiteHome
from tests.test_fl_delivery import LINEAGE, ROWS, federation, in_a_flower_task, node  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def regional(federation, tmp_path_factory):
    """A run folder whose region "north" (sites st-marys and a) has a base fitted to st-marys's rows, and region "east" kept the global base."""
    config, base_model, schema, data_path = federation
    root = tmp_path_factory.mktemp("regional")
    site_file = root / "site.csv"
    pd.read_csv(data_path).head(ROWS).to_csv(site_file, index=False)
    base = load_base(base_model)
    site = load_site(site_file, base.schema_for(Schema.load(schema)), name="st-marys", test_fraction=0.25, seed=config.federation.seed)
    fitted = fit_ditto(base.for_schema(site.schema), site, site.tasks, 10.0, seed=0).model
    run_dir = RunDir(root / "run")
    run_dir.path.mkdir()
    (run_dir.base_model_path).write_bytes(base_model.read_bytes())
    lineage = {"level": "region", "region": "north", "sites": ["a", "st-marys"], "global_round": 1, "global_sha256": sha256_bytes(base_model.read_bytes()), "regional_rounds": 2}
    RunDir(region_dir(run_dir.path, "north")).save_base_model(flatten_state(fitted.state), config, 3, statistics=base.statistics, lineage=lineage)
    save_regions(run_dir.path, 1, {"north": Region(["a", "st-marys"], trained=True, rounds=2), "east": Region(["b"], note="kept the global base")})
    return run_dir, site_file


def test_the_sites_of_a_region_with_a_base_get_it_and_no_other_site_does(regional):
    run_dir, _ = regional
    bases = regional_bases(run_dir)
    assert sorted(bases) == ["a", "st-marys"]
    assert bases["a"] == (region_dir(run_dir.path, "north") / "base_model.pt").read_bytes()


def test_the_regional_base_is_registered_under_the_global_one(federation, regional, tmp_path, in_a_flower_task):  # noqa: F811
    config, base_model, _, _ = federation
    run_dir, _ = regional
    data = base_model.read_bytes()
    message = _delivery_message(5, config, data, sha256_bytes(data), LINEAGE, regional_bases(run_dir)["st-marys"])
    message.metadata.__dict__["_message_id"] = message.object_id
    context = Context(run_id=1, node_id=5, node_config=node(tmp_path / "home", **{"site-name": "st-marys"}), state=RecordDict(), run_config={})
    assert reply_fields(handle(message, context)) == {"site": "st-marys", "stored": True, "version": "v1", "regional_version": "v2"}
    home = SiteHome.existing(tmp_path / "home")
    regional_version = home.registry.get(2)
    manifest, _ = home.load(regional_version)
    assert regional_version.parent == 1 and manifest.training["region"] == "north" and manifest.training["sites"] == 2


def test_a_tampered_regional_base_is_refused_and_nothing_is_stored(federation, regional, tmp_path):
    config, base_model, _, _ = federation
    run_dir, _ = regional
    data, region = base_model.read_bytes(), regional_bases(run_dir)["st-marys"]
    with pytest.raises(DeliveryRefused, match="the regional base model received hashes"):
        receive(data, sha256_bytes(data), node(tmp_path / "home", **{"site-name": "st-marys"}), config, LINEAGE, (region[:-1] + bytes([region[-1] ^ 1]), sha256_bytes(region)))
    assert not (tmp_path / "home").exists()


@pytest.mark.slow
def test_personalizing_weighs_the_regional_base_and_records_the_base_it_chose_from(federation, regional, tmp_path):
    config, base_model, schema, _ = federation
    run_dir, site_file = regional
    personalizing = config.model_copy(update={"deployment": config.deployment.model_copy(update={"personalize": True})})
    data, region = base_model.read_bytes(), regional_bases(run_dir)["st-marys"]
    fields, _ = receive(data, sha256_bytes(data), node(tmp_path / "home", site_file, schema, **{"site-name": "st-marys"}), personalizing, LINEAGE, (region, sha256_bytes(region)))
    home = SiteHome.existing(tmp_path / "home")
    promoted = home.current("st-marys")
    choice = json.loads(json.dumps(home.load(promoted)[0].training["steps_selection"]))
    assert fields["candidate"].startswith("regional:") and any(label.startswith("regional:") for label in choice["validation"])
    assert promoted.parent == 2 and promoted.lineage["base_sha256"] == sha256_bytes(region)
