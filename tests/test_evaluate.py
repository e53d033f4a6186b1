"""The evaluation harness's building blocks: federations on disk, per-site K, aggregation, the gap."""

import numpy as np
import torch

from fedmeta.data.synthetic import fraud_federation_frames
from fedmeta.evaluate import (
    MethodResult,
    aggregate,
    digits_federation_on_disk,
    gap_closed,
    hospital_federation_on_disk,
    local_only_k,
    shots_for,
)
from fedmeta.fl.site_app import site_for
from fedmeta.fl.config import RunConfig


class _Context:
    def __init__(self, partition):
        self.node_config = {"partition-id": partition}


def test_training_sites_are_split_exactly_as_the_simulation_splits_them(tmp_path):
    fed = hospital_federation_on_disk(tmp_path, n_sites=10, seed=3)
    assert len(fed.seen) == 8 and len(fed.unseen) == 2
    config = RunConfig.from_dict({"federation": {"kind": "csv", "data_dir": str(fed.train_dir), "n_sites": 8, "seed": 3}})
    for i, site in enumerate(fed.seen):
        simulated = site_for(_Context(i), config)
        assert simulated.name == site.name
        assert np.array_equal(simulated.test_mask, site.test_mask)


def test_worst_tenth_and_gap_closed():
    per_site = {f"s{i}": {"acc": a} for i, a in enumerate([0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.85, 0.75, 0.65, 0.55, 0.4])}
    assert aggregate(per_site)["worst10_acc"] == np.mean([0.4, 0.5])
    results = {
        "local_only": MethodResult("local_only", seen={"a": {"acc": 0.70}}),
        "pooled": MethodResult("pooled", seen={"a": {"acc": 0.80}}),
        "fedmeta_fomaml": MethodResult("fedmeta_fomaml", seen={"a": {"acc": 0.82}}),
    }
    assert round(gap_closed(results, "fedmeta_fomaml"), 6) == 1.2
    results["pooled"] = MethodResult("pooled", seen={"a": {"acc": 0.65}})
    assert gap_closed(results, "fedmeta_fomaml") is None  # local-only beats pooling: no gap to close


def test_label_skewed_digits_lower_k_for_small_sites_and_still_score(tmp_path):
    fed = digits_federation_on_disk(tmp_path, alpha=0.1, n_sites=10)
    sizes = [s.n_rows for s in fed.seen + fed.unseen]
    assert min(sizes) >= 30 and len(set(sizes)) > 1
    small = min(fed.seen, key=lambda s: s.n_labelled("digit", train=True))
    k, rows = shots_for(small, 10), small.n_labelled("digit", train=True)
    assert k < 10 and k * 10 <= rows < (k + 1) * 10, (k, rows)  # lowered, to as many shots per class as its rows hold
    # The control: each site's majority training label, predicted for every held-out row. Under this skew it is
    # right on half the rows and more; K-shot regression that scores is right on far more than it.
    scored, majority = [], []
    for site in fed.seen:
        y_train, y_test = site.labels["digit"][~site.test_mask], site.split("digit", train=False)[1]
        majority.append(float(np.mean(y_test == np.bincount(y_train.astype(int)).argmax())))
        scored.append(local_only_k(site, shots_for(site, 10))["digit"]["acc"])
    assert scored[fed.seen.index(small)] > majority[fed.seen.index(small)], (scored, majority)
    assert np.mean(scored) > np.mean(majority) + 0.2, (scored, majority)


def test_fraud_banks_differ_in_base_rates_and_are_seeded():
    schema, frames = fraud_federation_frames(8, seed=1)
    rates = [f["is_fraud"].mean() for f in frames.values()]
    assert max(rates) > 3 * min(rates)
    again = fraud_federation_frames(8, seed=1)[1]
    assert all(frames[k].equals(again[k]) for k in frames)
    for name, frame in frames.items():
        schema.validate_frame(frame, name)


def _tiny_sites(tmp_path, n=4):
    return hospital_federation_on_disk(tmp_path, n_sites=n + 1, seed=0).seen


def test_fedrep_shares_the_body_and_keeps_each_sites_heads(tmp_path):
    from fedmeta.evaluate.peers import Budget, train_peer
    from fedmeta.trained import TrainedModel

    sites = _tiny_sites(tmp_path)
    template = TrainedModel.initial(sites[0].schema, (8, 8), 0)
    params = train_peer("fedrep", 3, sites, template, Budget(rounds=2, local_steps=2, hidden=(8, 8)))
    first, second = (params[s.name] for s in sites[:2])
    assert all(torch.equal(first[k], second[k]) for k in first if k.startswith("body."))
    assert any(not torch.equal(first[k], second[k]) for k in first if k.startswith("heads."))


def test_peer_knobs_are_tuned_without_the_held_out_rows(tmp_path):
    from fedmeta.data import SiteData
    from fedmeta.evaluate.peers import Budget, tune_and_train
    from fedmeta.trained import TrainedModel

    sites = _tiny_sites(tmp_path)
    poisoned = []
    for s in sites:
        x = s.x.copy()
        x[s.test_mask] = np.nan
        poisoned.append(SiteData(s.name, s.schema, x, s.labels, s.test_mask))
    template = TrainedModel.initial(sites[0].schema, (8, 8), 0)
    params, knob, scored = tune_and_train("ditto", poisoned, template, Budget(rounds=2, local_steps=2, hidden=(8, 8)))
    assert knob in (0.01, 0.1, 1.0) and all(np.isfinite(v) for v in scored.values())
    assert all(torch.isfinite(v).all() for p in params.values() for v in p.values())


def test_the_pooled_oracle_scores_every_training_site_with_its_indicator(tmp_path):
    from fedmeta.evaluate import pooled_oracle

    from fedmeta.data import SiteData
    from fedmeta.evaluate.baselines import pooled
    from fedmeta.evaluate.site_scores import model_scores

    # A site and its mirror: the same rows, held out alike, with every binary label flipped. A network not told
    # which site a row is from gives both the same answer, so it is right at one exactly where it is wrong at the
    # other: 0.5 mean accuracy per task. Told, it can be right at both.
    site = _tiny_sites(tmp_path, n=1)[0]
    binary = [t.name for t in site.schema.tasks if t.kind == "binary"]
    flipped = {t: 1 - y if t in binary else y for t, y in site.labels.items()}
    sites = [site, SiteData("mirror", site.schema, site.x, flipped, site.test_mask)]
    scores = pooled_oracle(sites, (8,), steps=100)
    control = pooled(sites, (8,), steps=100)
    blind = {s.name: model_scores(control, control.params, s) for s in sites}
    assert set(scores) == {s.name for s in sites} and binary
    for task in binary:
        assert np.mean([blind[s.name][task]["acc"] for s in sites]) == 0.5, task
        assert np.mean([scores[s.name][task]["acc"] for s in sites]) > 0.75, (task, scores)


def _clinics_with_a_flat_site(root):
    """Clinic folders (train.csv + test.csv) plus one site as a single file, and the schema, as a user lays them out."""
    import subprocess
    import sys

    from fedmeta.data.synthetic import write_clinic_federation

    folders = write_clinic_federation(root, n_sites=5, seed=1)
    flat = folders[-1]
    (root / f"{flat.name}.csv").write_bytes((flat / "train.csv").read_bytes())
    for f in flat.iterdir():
        f.unlink()
    flat.rmdir()
    tasks = ["--task", "readmission:binary:readmitted_30d", "--task", "mortality:binary:died_in_hospital"]
    done = subprocess.run([sys.executable, "-m", "fedmeta.cli", "schema", "infer", str(root), *tasks, "--out", str(root / "schema.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted([f.name for f in folders[:-1]] + [flat.name])


def test_a_hand_made_folder_splits_by_name_and_keeps_each_sites_test_file(tmp_path):
    import pandas as pd
    import pytest

    from fedmeta.data import SchemaError, load_federation
    from fedmeta.evaluate import folder_federation

    names = _clinics_with_a_flat_site(tmp_path / "clinics")
    fed = folder_federation(tmp_path / "clinics", tmp_path / "eval", unseen=[names[1]], test_fraction=0.25, seed=7)
    assert [s.name for s in fed.seen] == [n for n in names if n != names[1]] and [s.name for s in fed.unseen] == [names[1]]
    # The same sites, rows and held-out rows as training reads from the user's folder itself, normalized by the
    # training sites only (the unseen site's rows take no part in the federation's statistics).
    statistics = fed.seen[0].schema.statistics()
    assert statistics != load_federation(tmp_path / "clinics", 0.25, 7)[0].schema.statistics()
    direct = {s.name: s for s in load_federation(tmp_path / "clinics", 0.25, 7, statistics)}
    for site in fed.seen + fed.unseen:
        assert np.array_equal(site.x, direct[site.name].x) and np.array_equal(site.test_mask, direct[site.name].test_mask)
    with_test = names[0]
    test_rows = len(pd.read_csv(tmp_path / "clinics" / with_test / "test.csv"))
    site = next(s for s in fed.seen + fed.unseen if s.name == with_test)
    assert site.test_mask.sum() == test_rows and site.test_mask[-test_rows:].all()  # scored on its test file, nothing carved
    flat = next(s for s in fed.seen + fed.unseen if s.name == names[-1])
    assert 0 < flat.test_mask.sum() < flat.n_rows  # no test file: the seed and the name hold rows out
    # Again with another split: the links are remade, nothing is left from the first.
    fed = folder_federation(tmp_path / "clinics", tmp_path / "eval", unseen=[], test_fraction=0.25, seed=7)
    assert [s.name for s in fed.seen] == names and fed.unseen == []
    with pytest.raises(SchemaError, match=r"--unseen: .* has no site\(s\) \['clinic_999'\]"):
        folder_federation(tmp_path / "clinics", tmp_path / "eval2", unseen=["clinic_999"])
    with pytest.raises(SchemaError, match=f"leaves 1 of {len(names)} sites to train"):
        folder_federation(tmp_path / "clinics", tmp_path / "eval2", unseen=names[1:])


def test_evaluate_config_refuses_what_it_cannot_use_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from fedmeta.cli import app

    synthetic = tmp_path / "hospitals.toml"
    synthetic.write_text('name = "h"\n[federation]\nkind = "hospitals"\n')
    runner = CliRunner()
    cases = [
        (["evaluate", "--unseen", "a"], "--unseen names sites of your own federation: give --config too"),
        (["evaluate", "--config", str(synthetic), "--sites", "5"], "--sites sizes the synthetic hospitals"),
        (["evaluate", "--config", str(synthetic)], "needs a federation folder"),
        (["evaluate", "--config", str(tmp_path / "missing.toml")], "missing.toml"),
    ]
    for args, expected in cases:
        done = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
        assert done.exit_code == 2 and expected in done.output, (args, done.output)
        assert "Traceback" not in done.output
    assert not (tmp_path / "out").exists()  # nothing written for a refused command
