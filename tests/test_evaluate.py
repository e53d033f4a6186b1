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
from fedmeta.fl.app import site_for
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
    small = min(fed.seen, key=lambda s: s.n_labelled("digit"))
    k = shots_for(small, 10)
    assert 1 <= k <= 10 and k * 10 <= small.n_labelled("digit")
    assert 0 <= local_only_k(small, k)["digit"]["acc"] <= 1


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

    sites = _tiny_sites(tmp_path)
    scores = pooled_oracle(sites, (8,), steps=20)
    assert set(scores) == {s.name for s in sites}
    assert all(0 <= t["acc"] <= 1 for s in scores.values() for t in s.values() if "acc" in t)
