"""Regions as data: a federation folder laid out by region or with a regions.csv, and a hospital generator with regional structure."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.data.federation import discover_sites, site_regions
from fedmeta.data.hospitals import outcome_logits, regional_hospital_truth
from fedmeta.data.schema import SchemaError
from fedmeta.data.synthetic import hospital_federation_frames, regional_hospital_frames, write_hospital_federation
from fedmeta.evaluate.federations import folder_federation

ROWS = "x\n1\n"


def site_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ROWS)
    return path


def site_folder(path: Path, test: bool = False) -> Path:
    site_file(path / "train.csv")
    if test:
        site_file(path / "test.csv")
    return path


def test_a_region_folder_gives_its_sites_their_region_and_root_sites_have_none(tmp_path):
    site_file(tmp_path / "north" / "clinic_a.csv")
    site_folder(tmp_path / "north" / "clinic_b", test=True)
    site_file(tmp_path / "clinic_c.csv")
    sites = {s.name: s for s in discover_sites(tmp_path)}
    assert {name: s.region for name, s in sites.items()} == {"clinic_a": "north", "clinic_b": "north", "clinic_c": None}
    assert sites["clinic_b"].test == tmp_path / "north" / "clinic_b" / "test.csv"
    assert site_regions(sites.values()) == {"clinic_a": "north", "clinic_b": "north"}


def test_sites_are_sorted_by_name_across_regions(tmp_path):
    site_file(tmp_path / "region_a" / "zeta.csv")
    site_folder(tmp_path / "region_b" / "alpha")
    site_file(tmp_path / "mu.csv")
    assert [(s.name, s.region) for s in discover_sites(tmp_path)] == [("alpha", "region_b"), ("mu", None), ("zeta", "region_a")]


def test_regions_csv_assigns_regions_and_an_unlisted_site_keeps_its_folders_or_none(tmp_path):
    for name in ("a", "b", "c"):
        site_file(tmp_path / f"{name}.csv")
    site_file(tmp_path / "east" / "d.csv")
    (tmp_path / "regions.csv").write_text("site,region\na,west\nb,west\nd,east\n")
    assert {s.name: s.region for s in discover_sites(tmp_path)} == {"a": "west", "b": "west", "c": None, "d": "east"}


@pytest.mark.parametrize(
    "layout, regions_csv, expected",
    [
        (["a.csv"], "site,region\na,west\nghost,west\n", "regions.csv: line 3 lists site 'ghost', which"),
        (["a.csv", "b.csv"], "site,region\na,west\nb,east\na,east\n", "regions.csv: site 'a' is listed twice (lines 2 and 4)"),
        (["east/a.csv"], "site,region\na,west\n", "regions.csv: line 2 puts site 'a' in region 'west', but it sits in region folder 'east'"),
        (["a.csv"], "site,region\na,north east\n", "regions.csv: line 2: region name 'north east' is not"),
        (["a.csv"], "name,area\na,west\n", "regions.csv: the first line must be the header site,region"),
        (["north east/a.csv"], None, "north east: region name 'north east' is not"),
        (["north/.hidden", "north/inner/notes.txt"], None, "north/inner: a site folder needs a train.csv or train.parquet"),
        (["north/a.csv", "south/a/train.csv"], None, "two sites named 'a' (north/a.csv and south/a/train.csv)"),
        (["north/a.csv", "north.csv"], None, "'north' names both a region and a site"),
        (["clinic/test.csv"], None, "clinic: a site folder needs a train.csv or train.parquet"),
    ],
    ids=["unknown-site", "listed-twice", "contradicts-folder", "bad-listed-name", "bad-header", "bad-folder-name", "folder-in-region",
         "same-name-two-regions", "region-named-like-a-site", "test-file-without-train"],
)
def test_a_bad_region_layout_is_one_line_naming_the_file_and_the_site(tmp_path, layout, regions_csv, expected):
    for path in layout:
        site_file(tmp_path / path)
    if regions_csv is not None:
        (tmp_path / "regions.csv").write_text(regions_csv)
    with pytest.raises(SchemaError) as error:
        discover_sites(tmp_path)
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert str(tmp_path) in message


def test_schema_infer_reads_a_region_layout_as_its_sites(tmp_path):
    # Before regions, `schema infer` took a region folder for a site folder without a train.csv and refused it.
    write_hospital_federation(tmp_path / "fed", n_sites=4, seed=1, regions=2)
    result = CliRunner().invoke(app, ["schema", "infer", str(tmp_path / "fed"), "--task", "mortality:binary:died_in_hospital",
                                      "--ignore", "readmitted_30d", "--ignore", "length_of_stay_days", "--out", str(tmp_path / "schema.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "schema.json").is_file()


def test_an_evaluation_folder_links_each_site_into_its_region_so_regions_read_back(tmp_path):
    write_hospital_federation(tmp_path / "fed", n_sites=5, seed=2, regions=2)
    fed = folder_federation(tmp_path / "fed", tmp_path / "eval", unseen=["hospital_003"])
    regions = site_regions(discover_sites(tmp_path / "fed"))
    assert site_regions(discover_sites(fed.train_dir)) == {k: v for k, v in regions.items() if k != "hospital_003"}
    assert site_regions(discover_sites(fed.unseen_dir)) == {"hospital_003": regions["hospital_003"]}
    folder_federation(tmp_path / "fed", tmp_path / "eval", unseen=[])  # a second run clears the region folders of links it made
    assert site_regions(discover_sites(fed.train_dir)) == regions and (tmp_path / "fed" / "region_a" / "hospital_000.csv").is_file()


def _frames_hash(frames) -> str:
    digest = hashlib.sha256()
    for name, df in frames.items():
        digest.update(name.encode())
        digest.update(df.to_csv(index=False).encode())
    return digest.hexdigest()


def test_the_flat_hospital_network_is_bit_identical_to_before_regions():
    # Computed from hospital_federation_frames(5, 3) before regional_hospital_frames existed; other benchmarks depend on these bytes.
    assert _frames_hash(hospital_federation_frames(5, 3)[1]) == "9db8e573e8b93a79dd9df9c01de5ee7db8d61b7c3e64162889f4103a5db8a728"


def test_regions_explain_more_of_the_sites_mortality_rates_than_sites_within_a_region():
    _, frames, region_of = regional_hospital_frames(24, seed=0, regions=3)
    rates: dict[str, list[float]] = {}
    for site, df in frames.items():
        if df["died_in_hospital"].notna().any():
            rates.setdefault(region_of[site], []).append(df["died_in_hospital"].mean())
    between = np.var([np.mean(r) for r in rates.values()], ddof=1)
    within = np.mean([np.var(r, ddof=1) for r in rates.values()])
    assert between > within


def test_sites_are_dealt_round_robin_to_regions_named_in_order():
    _, frames, region_of = regional_hospital_frames(11, seed=4, regions=3)
    assert region_of == {name: ["region_a", "region_b", "region_c"][k % 3] for k, name in enumerate(frames)}
    assert list(frames) == [f"hospital_{k:03d}" for k in range(11)]


def test_synth_hospitals_with_regions_writes_the_layout_discovery_reads_back(tmp_path):
    result = CliRunner().invoke(app, ["synth", "hospitals", str(tmp_path), "--sites", "7", "--regions", "3", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "sites per region: region_a 3, region_b 2, region_c 2" in result.output
    assert (tmp_path / "schema.json").is_file() and (tmp_path / "region_b" / "hospital_001.csv").is_file()
    assert site_regions(discover_sites(tmp_path)) == regional_hospital_frames(7, 5, 3)[2]


@pytest.mark.parametrize("regions", ["1", "8"])
def test_synth_hospitals_refuses_regions_outside_two_to_sites_in_one_line(tmp_path, regions):
    result = CliRunner().invoke(app, ["synth", "hospitals", str(tmp_path / "out"), "--sites", "7", "--regions", regions])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: --regions {regions}: a regional federation needs between 2 and --sites (7) regions"]
    assert not (tmp_path / "out").exists()


def test_a_generated_sites_truth_is_what_drew_its_labels():
    # Summed over every site and task: the labels are likelier under the site's own risk model than under its region's or a constant rate,
    # and their count is what the true probabilities predict. A truth drawn from another site or row order fails both.
    _, frames, _ = regional_hospital_frames(12, seed=1, regions=3)
    truths = regional_hospital_truth(12, seed=1, regions=3)
    log_likelihood = {"site": 0.0, "region": 0.0, "rate": 0.0}
    expected = observed = variance = 0.0
    for site, df in frames.items():
        truth = truths[site]
        by_level = {"site": outcome_logits(df, truth.severity, truth.risk), "region": outcome_logits(df, truth.severity, truth.region_risk)}
        for column in ("readmitted_30d", "died_in_hospital"):
            recorded = df[column].notna().to_numpy()
            if not recorded.any():
                continue
            y = df[column].to_numpy()[recorded]
            rate = np.full(len(y), np.clip(y.mean(), 1e-3, 1 - 1e-3))
            for level, p in (("site", 1 / (1 + np.exp(-by_level["site"][column][recorded]))),
                             ("region", 1 / (1 + np.exp(-by_level["region"][column][recorded]))), ("rate", rate)):
                log_likelihood[level] += float(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)))
                if level == "site":
                    expected, observed, variance = expected + p.sum(), observed + y.sum(), variance + (p * (1 - p)).sum()
    assert log_likelihood["site"] > log_likelihood["region"] > log_likelihood["rate"]
    assert abs(observed - expected) < 3 * np.sqrt(variance)
