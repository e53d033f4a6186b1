"""Inputs outside the range a model was trained on are answered and flagged, per row and feature (issue 17, item 7).

The ranges are checked against min and max taken straight from the CSV rows
with pandas, not through the model's encoding; every flag is compared with
an unflagged control row in the same request.
"""

import json

import httpx
import numpy as np
import pandas as pd

import fedmeta.predict
from fedmeta.data import Schema, load_site
from fedmeta.personalize import head_task, load_trained, publish, train_head
from fedmeta.personalize.publishing import base_of
from fedmeta.registry import SiteHome

from site_server import ROW, SITE, auth, publish_version, running, settings, site_home  # noqa: F401

NUMERIC = ["age", "prior_admissions", "charlson_index", "heart_rate", "systolic_bp", "creatinine", "hemoglobin", "sodium", "wbc"]


def _train_rows(hospitals) -> pd.DataFrame:
    """The rows of SITE that personalization trains on: its CSV minus the held-out rows."""
    site = load_site(hospitals / f"{SITE}.csv", hospitals / "schema.json")
    return pd.read_csv(hospitals / f"{SITE}.csv")[~site.test_mask]


def test_the_manifest_records_the_training_rows_range_and_not_the_held_out_rows(hospitals, tmp_path):
    frame = pd.read_csv(hospitals / f"{SITE}.csv")
    train, test = frame.iloc[:600], frame.iloc[600:].copy()
    test.loc[test.index[0], "age"] = 150.0  # a held-out row beyond every training row
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    ranges = load_site(tmp_path / "train.csv", hospitals / "schema.json", test_path=tmp_path / "test.csv").feature_ranges()
    assert sorted(ranges) == sorted(NUMERIC)
    for name in NUMERIC:
        lo, hi = ranges[name]
        true_lo, true_hi = float(train[name].min()), float(train[name].max())
        scale = max(abs(true_lo), abs(true_hi), 1.0)
        assert lo <= true_lo and hi >= true_hi, name  # no training row is outside
        assert true_lo - lo < 1e-4 * scale and hi - true_hi < 1e-4 * scale, name  # and the slack is rounding-sized
    assert ranges["age"][1] < 150


def test_the_server_answers_and_flags_rows_outside_the_training_range_per_feature(site_home, hospitals):
    home, keys = site_home
    train = _train_rows(hospitals)
    inside = {**ROW, **{name: float(train[name].iloc[0]) for name in NUMERIC}}
    far = {**inside, "age": float(train["age"].max()) + 50, "sodium": float(train["sodium"].min()) - 30}
    with running(settings(home)) as (url, _):
        h = auth(keys["predict"])
        r = httpx.post(f"{url}/v1/predict", json={"rows": [inside, far, inside, {**inside, "wbc": float(train["wbc"].max()) * 3}]}, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["outside_training_range"] == [{"row": 1, "features": ["age", "sodium"]}, {"row": 3, "features": ["wbc"]}]
        assert all(len(p.get("values", p.get("labels", []))) == 4 for p in body["predictions"].values())  # answered, not refused
        every_training_row = [{**ROW, **{name: float(v) for name, v in row.items()}} for row in train[NUMERIC].to_dict("records")]
        r = httpx.post(f"{url}/v1/predict", json={"rows": every_training_row[:256]}, headers=h)
        assert r.status_code == 200 and r.json()["outside_training_range"] == [], r.json()["outside_training_range"][:3]

        v2 = [{"name": k, "shape": [2], "datatype": "BYTES" if isinstance(v, str) else "FP32", "data": [inside[k], far[k]]} for k, v in ROW.items()]
        r = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"inputs": v2}, headers=h)
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["parameters"]["outside_training_range"]) == [{"row": 1, "features": ["age", "sodium"]}]

        metrics = httpx.get(f"{url}/metrics", headers=h).text
        assert 'fedmeta_outside_training_range_total{feature="age"} 2.0' in metrics
        assert 'fedmeta_outside_training_range_total{feature="sodium"} 2.0' in metrics
        assert 'fedmeta_outside_training_range_total{feature="wbc"} 1.0' in metrics
        assert 'feature="heart_rate"' not in metrics


def test_a_model_that_records_no_range_says_so_with_null(site_home, hospitals, base_run):
    home, keys = site_home
    from fedmeta.personalize import load_base, personalize, register_base

    base = load_base(base_run)
    site = load_site(hospitals / f"{SITE}.csv", base.schema_for(Schema.load(hospitals / "schema.json")))
    result = personalize(base.for_schema(site.schema), site, shots=5, steps=3, lr=0.05, seed=3)
    base_version = register_base(home, base)
    publish(home, result.model, "personalized", SITE, base_version, base_version, result.metrics, {}, {}, promote=True)  # no feature_ranges
    with running(settings(home)) as (url, _):
        r = httpx.post(f"{url}/v1/predict", json={"row": {**ROW, "age": 500}}, headers=auth(keys["predict"]))
        assert r.status_code == 200 and r.json()["outside_training_range"] is None


def test_a_head_covers_its_parents_range_and_its_own_rows(site_home, hospitals):
    home, _ = site_home
    parent = home.current(SITE)
    parent_ranges = home.load(parent)[0].feature_ranges
    start = load_trained(home, parent)
    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{**ROW, "age": float(a), "wbc": float(w), "sepsis": "yes" if w > 8.5 else "no"}
                         for a, w in zip(rng.uniform(110, 120, 40), rng.lognormal(2.1, 0.35, 40))])
    column = head_task(start.schema, "sepsis", "binary", None, None, rows, "rows")
    result = train_head(start, column, rows, "rows", steps=5, site=SITE)
    published = publish(home, result.model, "head", SITE, parent=parent, base=base_of(home, parent), metrics={}, data={}, training={},
                        personalized_tasks=["sepsis"], feature_ranges=result.feature_ranges)
    ranges = published.manifest.feature_ranges
    assert ranges["age"][0] == parent_ranges["age"][0] and 110 < ranges["age"][1] and parent_ranges["age"][1] < 110
    assert ranges["sodium"] == parent_ranges["sodium"]  # the head's rows all have sodium 136, inside the parent's range


def test_offline_scoring_flags_the_same_rows_and_says_so_on_stderr(site_home, hospitals, tmp_path):
    home, _ = site_home
    train = _train_rows(hospitals).iloc[:5].copy()
    train.loc[train.index[2], "age"] = 400.0
    scored = fedmeta.predict.predict(train, site_home=home.path, site=SITE)
    assert list(scored["outside_training_range"]) == ["", "", "age", "", ""]

    from typer.testing import CliRunner

    from fedmeta.cli import app

    train.to_csv(tmp_path / "rows.csv", index=False)
    done = CliRunner().invoke(app, ["predict", "--data", str(tmp_path / "rows.csv"), "--site-home", str(home.path), "--site", SITE])
    assert done.exit_code == 0, done.output
    assert "1 of 5 rows have values outside the model's training range, scored all the same: age (1)" in done.stderr
    assert "outside the model's training range" not in done.stdout  # the CSV on standard output stays clean
    assert pd.read_csv(pd.io.common.StringIO(done.stdout))["outside_training_range"].fillna("").tolist() == ["", "", "age", "", ""]


def test_all_inside_is_true_exactly_when_flagged_finds_nothing_at_the_bounds_in_float32_and_float64():
    from fedmeta.training_range import RangeCheck

    check = RangeCheck.from_manifest({"age": [18.0, 97.1], "sodium": [120.3, 150.0]}, ["age", "sodium", "wbc"])
    ages = [17.999999, 18.0, 40.0, 97.1, 97.100001, 97.10001, np.nan]
    sodium = [120.29999, 120.3, 140.0, 150.0, 150.00001]
    verdicts = set()
    for dtype in (np.float32, np.float64):
        for n in (1, 3):
            for age in ages:
                for na in sodium:
                    columns = {"age": np.array([40.0] * (n - 1) + [age], dtype), "sodium": np.array([na] + [140.0] * (n - 1), dtype),
                               "wbc": np.full(n, 1e9, dtype)}
                    verdict = check.all_inside(columns, n)
                    nothing = check.flagged(columns, n) == []
                    assert nothing if verdict else (not nothing or np.isnan(age)), (dtype, n, age, na)  # a NaN is never flagged: False sends it to flagged()
                    verdicts.add(verdict)
    assert verdicts == {True, False}  # control: both answers occur
