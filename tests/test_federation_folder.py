"""A federation folder: sites discovered and named by file or folder, test files, and one-line errors before any round."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmeta.data import discover_sites, load_site
from fedmeta.data.schema import SchemaError
from fedmeta.data.site import held_out_mask
from fedmeta.data.synthetic import write_clinic_federation
from fedmeta.fl.site_app import site_for
from fedmeta.fl.config import ConfigError, RunConfig
from fedmeta.fl.sites import prepare_federation


class _Context:
    def __init__(self, node_config):
        self.node_config = node_config


def fedmeta(*args):
    return subprocess.run([sys.executable, "-m", "fedmeta.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def clinics(tmp_path_factory) -> Path:
    """Clinic folders (train.csv + test.csv) plus one flat site file, and a schema inferred through the CLI."""
    root = tmp_path_factory.mktemp("clinics")
    write_clinic_federation(root, n_sites=4, seed=3)
    flat = pd.read_csv(root / "clinic_000" / "train.csv")
    flat.to_csv(root / "annex.csv", index=False)
    result = fedmeta("schema", "infer", root, "--task", "readmission:binary:readmitted_30d", "--task", "mortality:binary:died_in_hospital",
                     "--out", root / "schema.json")
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def csv_config(folder: Path, **federation) -> RunConfig:
    return RunConfig.from_dict({"federation": {"kind": "csv", "data_dir": str(folder), "seed": 5, **federation}})


def test_sites_are_named_by_file_or_folder_and_sorted(clinics):
    sites = discover_sites(clinics)
    assert [s.name for s in sites] == sorted(["annex"] + [p.name for p in clinics.iterdir() if p.is_dir()])
    assert {s.name: (s.train.name, s.test.name if s.test else None) for s in sites}["annex"] == ("annex.csv", None)
    assert all(s.train.name == "train.csv" and s.test.name == "test.csv" for s in sites if s.name != "annex")


def test_partition_i_is_the_ith_site_by_name_and_n_sites_defaults_to_the_sites_found(clinics):
    config, loaded = prepare_federation(csv_config(clinics))
    names = [s.name for s in discover_sites(clinics)]
    assert config.federation.n_sites == len(names)
    assert [s.name for s in loaded] == names
    assert [site_for(_Context({"partition-id": i}), config).name for i in range(len(names))] == names


def test_a_site_with_a_test_file_is_scored_on_it_and_never_trained_on_it(clinics):
    config, _ = prepare_federation(csv_config(clinics))
    names = [s.name for s in discover_sites(clinics)]
    i = names.index("clinic_001")
    site = site_for(_Context({"partition-id": i}), config)
    train, test = pd.read_csv(clinics / "clinic_001" / "train.csv"), pd.read_csv(clinics / "clinic_001" / "test.csv")
    assert site.n_rows == len(train) + len(test)
    assert site.test_mask.tolist() == [False] * len(train) + [True] * len(test)
    x_test, y_test = site.split("mortality", train=False)
    assert len(y_test) == test["died_in_hospital"].notna().sum()


def test_a_site_without_a_test_file_holds_out_rows_by_the_one_split_rule(clinics):
    config, _ = prepare_federation(csv_config(clinics, test_fraction=0.3))
    site = site_for(_Context({"partition-id": 0}), config)  # "annex", a flat file
    assert site.name == "annex"
    assert np.array_equal(site.test_mask, held_out_mask("annex", site.n_rows, 0.3, seed=5))


def test_personalization_names_a_site_by_its_folder_and_loads_the_same_rows(clinics):
    config, loaded = prepare_federation(csv_config(clinics))
    direct = load_site(clinics / "clinic_002" / "train.csv", clinics / "schema.json", test_path=clinics / "clinic_002" / "test.csv")
    trained = next(s for s in loaded if s.name == "clinic_002")
    assert direct.name == "clinic_002"
    assert np.array_equal(direct.x, trained.x) and np.array_equal(direct.test_mask, trained.test_mask)


def test_a_mismatched_n_sites_is_one_line_naming_both_numbers_and_the_folder(clinics, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'name = "x"\nrounds = 1\n[federation]\nkind = "csv"\ndata_dir = "{clinics}"\nn_sites = 16\n')
    result = fedmeta("train", "--config", config, "--run-dir", tmp_path / "run")
    found = len(discover_sites(clinics))
    assert result.returncode != 0
    error = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert error == [f"error: federation.n_sites = 16 but {clinics} holds {found} site(s); remove n_sites to train every site found, or fix the folder"]
    assert "Traceback" not in result.stdout + result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("garbage", "the file has no rows"),
        ("no_ward", "clinic_001/train.csv: missing feature column(s) ['ward']"),
        ("bad_number", "clinic_001/test.csv: column 'age' row 3: expected a number, got (value not shown)"),
        ("no_train", "clinic_001: a site folder needs a train.csv or train.parquet"),
        ("no_schema", "no schema.json; write one with: fedmeta schema infer"),
        ("no_labels", "site 'clinic_001'"),
    ],
)
def test_a_bad_site_is_one_line_before_any_round(clinics, tmp_path, breakage, expected):
    folder = tmp_path / "fed"
    for site in ("clinic_000", "clinic_001"):
        (folder / site).mkdir(parents=True)
        for part in ("train.csv", "test.csv"):
            (folder / site / part).write_bytes((clinics / site / part).read_bytes())
    (folder / "schema.json").write_bytes((clinics / "schema.json").read_bytes())
    site = folder / "clinic_001"
    if breakage == "garbage":
        (site / "train.csv").write_bytes(b"\x00\x01\x02")
    elif breakage == "no_ward":
        pd.read_csv(site / "train.csv").drop(columns=["ward"]).to_csv(site / "train.csv", index=False)
    elif breakage == "bad_number":
        rows = pd.read_csv(site / "test.csv").astype({"age": object})
        rows.loc[1, "age"] = "Jane Doe"
        rows.to_csv(site / "test.csv", index=False)
    elif breakage == "no_train":
        (site / "train.csv").unlink()
    elif breakage == "no_schema":
        (folder / "schema.json").unlink()
    elif breakage == "no_labels":
        for part in ("train.csv", "test.csv"):
            pd.read_csv(site / part).assign(readmitted_30d=np.nan, died_in_hospital=np.nan).to_csv(site / part, index=False)
    config = tmp_path / "run.toml"
    config.write_text(f'name = "x"\nrounds = 1\n[federation]\nkind = "csv"\ndata_dir = "{folder}"\n')
    result = fedmeta("train", "--config", config, "--run-dir", tmp_path / "run")
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, output
    assert len(errors) == 1 and expected in errors[0], output
    assert "Traceback" not in output and "Jane" not in output
    assert not (tmp_path / "run").exists()


def test_discovery_refuses_two_sites_of_one_name_and_an_empty_folder(tmp_path):
    with pytest.raises(SchemaError, match="no sites found"):
        discover_sites(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.csv").write_text("x\n1\n")
    (tmp_path / "a.csv").write_text("x\n1\n")
    with pytest.raises(SchemaError, match="two sites named 'a'"):
        discover_sites(tmp_path)


def test_a_synthetic_federation_keeps_its_default_of_ten_sites():
    assert RunConfig.from_dict({}).federation.n_sites == 10
    with pytest.raises(ConfigError, match="n_sites"):
        RunConfig.from_dict({"federation": {"n_sites": 0}})
