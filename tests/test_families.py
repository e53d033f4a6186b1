"""The benchmark's generator families: seeded, loadable, shaped as their names say, with selection and fresh seeds apart."""

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from fedmeta.data.site import held_out_mask
from fedmeta.evaluate.families import FAMILIES, FRESH_SEEDS, SELECTION_SEEDS, TEST_FRACTION, _draw_classes, family_federation_on_disk


def _same(a, b) -> bool:
    schema_a, frames_a = a
    schema_b, frames_b = b
    if schema_a != schema_b or list(frames_a) != list(frames_b):
        return False
    return all(frames_a[name].equals(frames_b[name]) for name in frames_a)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_is_a_pure_function_of_its_seed(family):
    generate = FAMILIES[family]
    assert _same(generate(SELECTION_SEEDS[0]), generate(SELECTION_SEEDS[0]))
    assert not _same(generate(SELECTION_SEEDS[0]), generate(SELECTION_SEEDS[1]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_loads_back_with_16_seen_and_4_unseen_sites_each_able_to_fit_every_task(tmp_path, family):
    fed = family_federation_on_disk(tmp_path, family, SELECTION_SEEDS[0])
    assert (len(fed.seen), len(fed.unseen)) == (16, 4)
    assert sorted(p.stem for p in fed.unseen_dir.glob("*.csv")) == [s.name for s in fed.unseen]
    tasks = fed.seen[0].schema.tasks
    for site in fed.seen + fed.unseen:
        assert site.tasks == [t.name for t in tasks], site.name
        assert site.scored_tasks == site.tasks, site.name
        for task in tasks:
            if task.is_classification:
                _, y = site.split(task.name, train=True)
                # Under label shift a site's priors may all but exclude classes; everywhere else every class is there.
                need = 2 if family == "label_shift" else task.n_classes
                assert len(np.unique(y)) >= need, (site.name, task.name, np.bincount(y))


def test_a_site_s_labels_are_drawn_again_until_its_training_rows_hold_every_class():
    # At the families' seeds this rarely has to redraw, so a rare class at a 10-row site shows the rule at work.
    probabilities = np.tile([0.97, 0.03], (10, 1))
    y = _draw_classes(np.random.default_rng(0), probabilities, "site_007", seed=1)
    training = ~held_out_mask("site_007", 10, TEST_FRACTION, seed=1)
    assert set(y[training]) == {0, 1}


def test_quantity_skew_spans_ten_to_ten_thousand_rows():
    _, frames = FAMILIES["quantity_skew"](SELECTION_SEEDS[0])
    sizes = [len(frame) for frame in frames.values()]
    assert min(sizes) <= 20 and max(sizes) >= 5_000, sizes


def test_site_coefficients_keeps_about_30_percent_of_regression_labels_missing():
    _, frames = FAMILIES["site_coefficients"](SELECTION_SEEDS[0])
    missing = pd.concat(frames.values())["score"].isna().mean()
    assert 0.25 < missing < 0.35


def _per_site_and_pooled_accuracy(fed, task: str) -> tuple[float, float]:
    """Mean held-out accuracy over the seen sites of a logistic regression per site and of one pooled over them."""
    train = [site.split(task, train=True) for site in fed.seen]
    held_out = [site.split(task, train=False) for site in fed.seen]
    pooled = LogisticRegression(max_iter=1000).fit(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]))
    per_site = [LogisticRegression(max_iter=1000).fit(x, y) for x, y in train]
    local = np.mean([(model.predict(x) == y).mean() for model, (x, y) in zip(per_site, held_out)])
    shared = np.mean([(pooled.predict(x) == y).mean() for x, y in held_out])
    return float(local), float(shared)


def test_site_coefficients_rewards_a_model_per_site_over_one_pooled_model(tmp_path):
    local, pooled = _per_site_and_pooled_accuracy(family_federation_on_disk(tmp_path, "site_coefficients", SELECTION_SEEDS[0]), "outcome")
    assert local > pooled + 0.05, (local, pooled)


def test_linear_shared_rewards_pooling_at_least_as_much_as_a_model_per_site(tmp_path):
    local, pooled = _per_site_and_pooled_accuracy(family_federation_on_disk(tmp_path, "linear_shared", SELECTION_SEEDS[0]), "outcome")
    assert pooled >= local, (local, pooled)


def test_selection_and_fresh_seeds_are_disjoint():
    assert SELECTION_SEEDS and FRESH_SEEDS
    assert not set(SELECTION_SEEDS) & set(FRESH_SEEDS)


def test_an_unknown_family_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="'clinics'.*site_coefficients"):
        family_federation_on_disk(tmp_path, "clinics", SELECTION_SEEDS[0])
    assert not any(tmp_path.iterdir())
