"""`fedmeta personalize` through the chain global → region → site → head, and the lineage `fedmeta models` shows.

The run folder is the global base of ``write_base`` plus what a run with
regions adds (:mod:`fedmeta.fl.regions`): ``regions.json`` and north's base,
which is the global base already fitted to hospital_002's rows, so the choice
has a regional candidate that wins there. East kept the global base.
"""

import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import hospital_statistics, write_base
from fedmeta.cli import app
from fedmeta.data import Schema, load_site
from fedmeta.fl.aggregation import flatten_state
from fedmeta.fl.regions import Region, region_dir, save_regions
from fedmeta.fl.run_dir import RunDir
from fedmeta.manifest import sha256_file
from fedmeta.personalize import choose_personalization, load_base
from fedmeta.registry import SiteHome

pytestmark = pytest.mark.slow  # every test here runs `fedmeta personalize` on a module-wide site home (~10 s to build)
runner = CliRunner()
NORTH = ["hospital_000", "hospital_002", "hospital_009"]
# Weighing the bases as they are keeps each run to a second; the choice between levels is the same with any candidates.
CHEAP = ("--candidates", "base")
EAST_NOTE = "kept the global base: 1 site(s), fewer than regions.min_sites = 3"


@pytest.fixture(scope="module")
def regional_run(tmp_path_factory, hospitals):
    run = write_base(tmp_path_factory.mktemp("runs") / "regional")
    global_base = load_base(run)
    site = load_site(hospitals / "hospital_002.csv", global_base.schema_for(Schema.load(hospitals / "schema.json")))
    fitted = choose_personalization(global_base.for_schema(site.schema), site, seed=0, candidates=["head"]).model  # same shapes as the base
    lineage = {"level": "region", "region": "north", "sites": NORTH, "global_round": 1, "global_sha256": sha256_file(run / "base_model.pt"), "regional_rounds": 2}
    RunDir(region_dir(run, "north")).save_base_model(flatten_state(fitted.state), global_base.config, 3, {"epsilon": 7.5, "delta": 1e-5},
                                                     hospital_statistics(), lineage)
    save_regions(run, 1, {"north": Region(NORTH, trained=True, rounds=2), "east": Region(["hospital_001"], note=EAST_NOTE)})
    return run


def personalize(home, hospitals, run, *extra, site_file="hospital_002.csv"):
    args = ["personalize", "--data", str(hospitals / site_file), "--schema", str(hospitals / "schema.json"), "--base", str(run),
            "--site-home", str(home), "--no-alone", *CHEAP, *extra]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def north_home(tmp_path_factory, hospitals, regional_run):
    """hospital_002 (a site of north) personalized with the default choice."""
    home = tmp_path_factory.mktemp("north-home")
    result = personalize(home, hospitals, regional_run)
    assert result.exit_code == 0, result.output
    return home


def test_the_regional_base_is_registered_under_the_global_one_with_its_lineage_and_account(north_home, regional_run):
    home = SiteHome(north_home)
    global_version, regional = home.registry.versions(kind="base")
    assert global_version.parent is None and regional.parent == global_version.version
    manifest, _ = home.load(regional)
    assert manifest.training["level"] == "region" and manifest.training["region"] == "north"
    assert manifest.training["sites"] == 3 and "hospital_000" not in json.dumps(manifest.training)  # a count, not the other sites' names
    assert manifest.training["global_sha256"] == global_version.sha256 and manifest.training["global_round"] == 1
    assert manifest.privacy == {"epsilon": 7.5, "delta": 1e-5}


def test_a_site_of_a_region_is_personalized_from_its_regional_base_when_the_choice_picks_it(north_home):
    home = SiteHome(north_home)
    mine = home.registry.current("hospital_002")
    manifest, _ = home.load(mine)
    assert manifest.training["steps_selection"]["chosen"].startswith("regional:")
    assert mine.parent == 2 and manifest.base_version == 2 and manifest.training["region"] == "north"
    assert mine.lineage["privacy"] == {"epsilon": 7.5, "delta": 1e-5}  # the regional account: the model descends from the region's rounds


def test_an_unseen_site_of_a_known_region_weighs_that_regions_base(tmp_path, hospitals, regional_run):
    result = personalize(tmp_path, hospitals, regional_run, "--site", "newcomer", "--region", "north", site_file="hospital_001.csv")
    assert result.exit_code == 0, result.output
    assert "regional:base" in result.output and "region north's base" in result.output
    home = SiteHome(tmp_path)
    regional = home.registry.get(2)
    assert (regional.kind, regional.lineage["region"], regional.parent) == ("base", "north", 1)
    mine = home.registry.current("newcomer")
    chosen = home.load(mine)[0].training["steps_selection"]["chosen"]
    assert mine.parent == (2 if chosen.startswith("regional:") else 1), chosen


def test_region_none_personalizes_from_the_global_base_only(tmp_path, hospitals, regional_run):
    result = personalize(tmp_path, hospitals, regional_run, "--region", "none")
    assert result.exit_code == 0, result.output
    assert "regional:" not in result.output
    home = SiteHome(tmp_path)
    assert len(home.registry.versions(kind="base")) == 1 and home.registry.current("hospital_002").parent == 1


def test_an_unknown_region_is_refused_in_one_line_naming_the_known_ones(tmp_path, hospitals, regional_run):
    result = personalize(tmp_path, hospitals, regional_run, "--region", "west")
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if "west" in line]
    assert len(lines) == 1 and "its regions: east, north" in lines[0]
    assert not (tmp_path / "models").exists()


def test_a_region_that_kept_the_global_base_is_noted_and_the_global_base_used(tmp_path, hospitals, regional_run):
    result = personalize(tmp_path, hospitals, regional_run, site_file="hospital_001.csv")
    assert result.exit_code == 0, result.output
    assert f"note: region east {EAST_NOTE}: personalizing from the global base" in " ".join(result.output.split())
    home = SiteHome(tmp_path)
    assert len(home.registry.versions(kind="base")) == 1 and home.registry.current("hospital_001").parent == 1


def test_a_single_adaptation_starts_from_the_regional_base_and_says_so(tmp_path, hospitals, regional_run):
    result = personalize(tmp_path / "regional", hospitals, regional_run, "--mode", "head", "--shots", "5")
    assert result.exit_code == 0, result.output
    assert "from region north's base" in " ".join(result.output.split())
    home = SiteHome(tmp_path / "regional")
    mine = home.registry.current("hospital_002")
    assert mine.parent == 2
    assert personalize(tmp_path / "global", hospitals, regional_run, "--mode", "head", "--shots", "5", "--region", "none").exit_code == 0
    flat = SiteHome(tmp_path / "global").registry.current("hospital_002")
    # The starting point's own held-out score: north's base already fits this site, the untrained global base does not.
    assert mine.metrics["readmission_30d.base.acc"] > flat.metrics["readmission_30d.base.acc"] + 0.1


def test_a_regional_base_given_as_the_base_is_refused_in_one_line(tmp_path, hospitals, regional_run):
    result = personalize(tmp_path, hospitals, regional_run / "regions" / "north" / "base_model.pt")
    assert result.exit_code != 0
    assert "is region north's base, not the global one" in " ".join(result.output.split())


def test_models_list_shows_the_chain_global_region_site_head(tmp_path, hospitals, north_home):
    home = tmp_path / "home"
    shutil.copytree(north_home, home)
    head = runner.invoke(app, ["heads", "add", "--task", "mortality", "--data", str(hospitals / "hospital_002.csv"), "--steps", "5", "--site-home", str(home)])
    assert head.exit_code == 0, head.output
    listing = json.loads(runner.invoke(app, ["models", "list", "--json", "--site-home", str(home)]).output)
    versions = {v["version"]: v for v in listing["versions"]}
    assert versions["v4"]["lineage"] == ["v1", "v2", "v3", "v4"]
    assert [versions[v]["level"] for v in versions["v4"]["lineage"]] == ["global", "region", "site", "head"]
    table = runner.invoke(app, ["models", "list", "--site-home", str(home)], terminal_width=80).output
    assert "v2  base  (region north)" in table and "v1  base  (global)" in table
    shown = json.loads(runner.invoke(app, ["models", "show", "v4", "--site-home", str(home)]).output)
    assert shown["lineage"] == ["v1", "v2", "v3", "v4"]


def test_a_registered_global_version_with_region_starts_from_that_regions_registered_base(tmp_path, hospitals, north_home):
    home = tmp_path / "home"
    shutil.copytree(north_home, home)
    result = personalize(home, hospitals, "v1", "--region", "north", "--mode", "head", "--shots", "5", site_file="hospital_000.csv")
    assert result.exit_code == 0, result.output
    assert "from region north's base" in " ".join(result.output.split())
    registry = SiteHome(home).registry
    assert len(registry.versions(kind="base")) == 2 and registry.current("hospital_000").parent == 2


def test_a_seen_site_validates_the_regional_level_with_the_base_trained_without_it_when_the_run_has_one(tmp_path, hospitals, regional_run, north_home):
    run = tmp_path / "run"
    shutil.copytree(regional_run, run)
    without = region_dir(run, "north") / "without" / "hospital_002"
    without.mkdir(parents=True)
    shutil.copy(region_dir(run, "north") / "base_model.pt", without / "base_model.pt")
    result = personalize(tmp_path / "home", hospitals, run)
    assert result.exit_code == 0, result.output
    home = SiteHome(tmp_path / "home")
    chosen = home.load(home.registry.current("hospital_002"))[0].training["steps_selection"]
    assert chosen["regional_validation"] == "a base of the region trained without this site"
    control = SiteHome(north_home)
    assert control.load(control.registry.current("hospital_002"))[0].training["steps_selection"]["regional_validation"] == "the regional base"
