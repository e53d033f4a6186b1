"""The default personalization: per site, the best candidate adaptation on validation rows of its training rows."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedmeta.data import hospital_federation
from fedmeta.personalize.candidates import fit_ditto, fit_few_shot, fit_head, fit_local, mixed_model
from fedmeta.personalize.choice import choose, choose_personalization, validation_split
from fedmeta.personalize.candidates import CANDIDATES, DEFAULT_CANDIDATES, fit_candidates
from fedmeta.registry import SiteHome
from fedmeta.trained import TrainedModel


@pytest.fixture(scope="module")
def site():
    return hospital_federation(n_sites=2, seed=0)[1]


@pytest.fixture(scope="module")
def base(site):
    return TrainedModel.initial(site.schema, hidden=(16, 16), seed=0)


def _validation_accuracy(model, rows, tasks):
    """Mean accuracy over the classification tasks on a fold's validation rows, counted here by argmax."""
    module, accs = model.module(), []
    for task in (t for t in tasks if rows.schema.task(t).is_classification):
        x, y = rows.split(task, train=False)
        with torch.no_grad():
            logits = torch.func.functional_call(module, model.params, (torch.from_numpy(x),), {"task": task})
        accs.append(float(np.mean(logits.argmax(1).numpy() == y)))
    return float(np.mean(accs))


def _validation_loss(model, rows, tasks):
    """Mean over tasks of the cross-entropy (MSE for regression) on a fold's validation rows, counted here with torch's own losses."""
    module, losses = model.module(), []
    for task in tasks:
        x, y = rows.split(task, train=False)
        with torch.no_grad():
            out = torch.func.functional_call(module, model.params, (torch.from_numpy(x),), {"task": task})
            if rows.schema.task(task).is_classification:
                losses.append(float(torch.nn.functional.cross_entropy(out, torch.from_numpy(y))))
            else:
                losses.append(float(torch.nn.functional.mse_loss(out.squeeze(-1), torch.from_numpy(y))))
    return float(np.mean(losses))


@pytest.mark.slow
def test_the_chosen_candidate_has_the_lowest_validation_loss_and_beats_the_untrained_base(site, base):
    folds = [(fit_candidates(base, rows, site.tasks, shots=3, lr=0.05, seed=0, names=CANDIDATES), rows) for rows in (validation_split(site, 0, f) for f in range(3))]
    chosen, scores = choose(folds, site.tasks)
    assert set(scores) >= {"base", "few_shot", "all_rows", "head", "ditto(λ=10)", "mix(α=0.5)", "mix(α=1)", "linear", "wide", "blend(α=0.5)"}
    # The control: every candidate counted again here, each fold's model on that fold's validation rows only. A
    # chooser that scored the fitting rows, one fold, or kept the base would pick a candidate that is not the best.
    loss, accuracy = {}, {}
    for candidates, rows in folds:
        for c in candidates:
            loss.setdefault(c.label, []).append(_validation_loss(c.model, rows, site.tasks))
            accuracy.setdefault(c.label, []).append(_validation_accuracy(c.model, rows, site.tasks))
    loss = {label: np.mean(values) for label, values in loss.items()}
    accuracy = {label: np.mean(values) for label, values in accuracy.items()}
    assert loss[chosen.label] == pytest.approx(min(loss.values()), rel=1e-5), (chosen.label, loss)
    assert accuracy[chosen.label] > accuracy["base"], accuracy  # the base is untrained: adapting it must pay


def test_validation_folds_cover_the_training_rows_once_and_never_the_held_out_ones(site):
    folds = [validation_split(site, seed=0, fold=f) for f in range(3)]
    assert all(rows.n_rows == int((~site.test_mask).sum()) for rows in folds)
    held_out = {r.tobytes() for r in site.x[site.test_mask]}
    assert not any(r.tobytes() in held_out for r in folds[0].x)
    assert np.array_equal(sum(rows.test_mask.astype(int) for rows in folds), np.ones(folds[0].n_rows, int))


def test_ditto_with_an_infinite_lambda_stays_at_the_base(site, base):
    pinned = fit_ditto(base, site, site.tasks, lam=1e9, seed=0, steps=30).model.params
    free = fit_ditto(base, site, site.tasks, lam=0.01, seed=0, steps=30).model.params
    assert all(torch.allclose(pinned[k], base.params[k], atol=1e-5) for k in base.params)
    assert any(not torch.allclose(free[k], base.params[k], atol=1e-3) for k in base.params)


def test_head_retraining_leaves_the_body_bit_identical(site, base):
    params = fit_head(base, site, site.tasks, seed=0, steps=30).model.params
    body = [k for k in base.params if k.startswith("body.")]
    assert all(torch.equal(params[k], base.params[k]) for k in body)
    assert any(not torch.equal(params[k], base.params[k]) for k in base.params if k.startswith("heads."))


def _one_by_one_with_torch_adam(base, run, rows, steps, seed, batch_rows=128):
    """The reference: one run alone, torch.optim.Adam, each task's minibatch drawn as the batch draws it, λ's proximal step after Adam's."""
    model = base.module()
    params = {k: v.detach().clone() for k, v in run.start.items()}
    leaves = [params[n].requires_grad_(True) for n in run.names]
    optimizer = torch.optim.Adam(leaves, lr=run.lr)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        total = 0.0
        for task, (x, y) in rows.items():
            pick = torch.from_numpy(rng.choice(len(y), min(batch_rows, len(y)), replace=False))
            out = torch.func.functional_call(model, params, (x[pick],), {"task": task})
            total = total + torch.nn.functional.cross_entropy(out, y[pick].long())
        (total / len(rows)).backward()
        optimizer.step()
        with torch.no_grad():
            for n in run.names:
                params[n].add_(run.start[n], alpha=run.lr * run.prox).div_(1 + run.lr * run.prox)
    return {k: v.detach() for k, v in params.items()}


def test_fine_tunes_trained_as_one_batch_equal_each_trained_alone_with_torch_adam(site, base):
    from fedmeta.personalize.all_rows import Run, train_runs

    tasks = [t for t in site.tasks if site.schema.task(t).kind != "regression"]
    rows = {t: tuple(map(torch.from_numpy, site.split(t, train=True))) for t in tasks}
    every = tuple(base.params)
    heads = tuple(k for k in base.params if k.startswith("heads."))
    other = TrainedModel.initial(site.schema, hidden=(16, 16), seed=7)
    runs = [Run(base.params, every, 1e-3), Run(base.params, every, 1e-3, prox=10.0), Run(base.params, heads, 1e-2),
            Run(other.params, every, 3e-3)]
    steps = [25, 40, 40, 10]
    batched = train_runs(base.module(), runs, rows, steps, seed=3)
    for run, n, got in zip(runs, steps, batched):
        expected = _one_by_one_with_torch_adam(base, run, rows, n, seed=3)
        assert all(torch.allclose(got[k], expected[k], atol=2e-5) for k in expected), run.lr
        moved = [k for k in expected if not torch.equal(expected[k], run.start[k])]
        assert moved and set(moved) <= set(run.names), "the reference trained what the run names, and only that"


def test_the_mix_predicts_the_weighted_mean_of_base_and_local_predictions(site, base):
    local = fit_local(base, site, site.tasks, seed=0, steps=20)
    mixed = mixed_model(base, local, alpha=0.3)
    x = torch.from_numpy(site.x[:7])
    for task in site.tasks:
        expected = 0.7 * base.module()(x, task) + 0.3 * local.module()(x, task)
        assert torch.allclose(mixed.module()(x, task), expected, atol=1e-5)
        assert not torch.allclose(base.module()(x, task), expected, atol=1e-3)


def test_few_shot_uses_meta_sgd_rates_as_trained(site, base):
    frozen = TrainedModel(base.schema, base.hidden, {"params": base.params, "inner_lrs": {k: torch.zeros_like(v) for k, v in base.params.items()}})
    unchanged = fit_few_shot(frozen, site, site.tasks, shots=3, lr=0.05, seed=0, steps=5)
    moved = fit_few_shot(base, site, site.tasks, shots=3, lr=0.05, seed=0, steps=5)
    assert unchanged.knobs["mode"] == "metasgd" and moved.knobs["mode"] == "all"
    assert all(torch.equal(unchanged.model.params[k], base.params[k]) for k in base.params)  # learned rates of zero: nothing moves
    assert any(not torch.equal(moved.model.params[k], base.params[k]) for k in base.params)


def test_few_shot_adapts_only_the_heads_of_an_anil_base(site, base):
    anil = TrainedModel(base.schema, base.hidden, base.state, {"algorithm": "anil"})
    params = fit_few_shot(anil, site, site.tasks, shots=3, lr=0.05, seed=0, steps=5).model.params
    assert all(torch.equal(params[k], base.params[k]) for k in base.params if k.startswith("body."))
    assert any(not torch.equal(params[k], base.params[k]) for k in base.params if k.startswith("heads."))


@pytest.mark.slow
def test_the_choice_never_looks_at_held_out_rows(site, base):
    clean = choose_personalization(base, site, shots=3, seed=0)
    poisoned_site = type(site)(site.name, site.schema, site.x.copy(), site.labels, site.test_mask)
    poisoned_site.x[site.test_mask] = np.nan
    poisoned = choose_personalization(base, poisoned_site, shots=3, seed=0)
    assert all(torch.isfinite(v).all() for v in poisoned.model.params.values())
    assert poisoned.steps_selection["validation"] == clean.steps_selection["validation"]
    assert poisoned.steps_selection["chosen"] == clean.steps_selection["chosen"]


@pytest.mark.slow
def test_personalize_without_a_mode_reports_every_candidate_the_choice_and_the_sites_own_model(tmp_path, hospitals, base_run):
    args = ["personalize", "--data", hospitals / "hospital_001.csv", "--schema", hospitals / "schema.json", "--base", base_run, "--site-home", tmp_path]
    done = subprocess.run([sys.executable, "-m", "fedmeta.cli", *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "folds (each row validates once)" in done.stdout and "chosen" in done.stdout
    assert "alone: the site's own model" in " ".join(done.stdout.split())
    version = SiteHome(tmp_path).registry.current("hospital_001")
    manifest, _ = SiteHome(tmp_path).load(version)
    why = manifest.training["steps_selection"]
    assert why["chosen"] in why["validation"] and manifest.training["mode"].startswith("chosen:")
    assert sorted(why["validation"]) == ["blend(α=0.5)", "ditto(λ=10)"]
    assert sorted(why["candidates"]) == sorted(DEFAULT_CANDIDATES) == ["blend", "ditto"]
    scored = {k.replace(".personalized.", ".alone.") for k in manifest.metrics if ".personalized." in k}
    assert scored and scored <= set(manifest.metrics), "every personalized score has the site's own model's beside it"
    json.dumps(why)
    refused = subprocess.run([sys.executable, "-m", "fedmeta.cli", *map(str, args), "--candidates", "head,mix,guess"], capture_output=True, text=True)
    assert refused.returncode == 2 and "error: candidates must be some of base, few_shot, all_rows, ditto, head, mix, linear, wide, blend; got head, mix, guess" in refused.stdout


@pytest.mark.slow
def test_shots_with_the_default_choice_is_refused_in_one_line_unless_few_shot_is_weighed(tmp_path, hospitals, base_run):
    args = ["personalize", "--data", hospitals / "hospital_001.csv", "--schema", hospitals / "schema.json", "--base", base_run, "--site-home", tmp_path]
    refused = subprocess.run([sys.executable, "-m", "fedmeta.cli", *map(str, args), "--shots", "10"], capture_output=True, text=True)
    out = " ".join(refused.stdout.split())
    assert refused.returncode == 2 and "error: --shots 10 has no effect on the default choice" in out, refused.stdout + refused.stderr
    assert len([line for line in refused.stdout.splitlines() if line.startswith("error:")]) == 1
    assert SiteHome(tmp_path).registry.current("hospital_001") is None
    weighed = subprocess.run([sys.executable, "-m", "fedmeta.cli", *map(str, args), "--shots", "3", "--candidates", "base,few_shot", "--no-alone"],
                             capture_output=True, text=True)
    assert weighed.returncode == 0, weighed.stdout + weighed.stderr
    manifest, _ = SiteHome(tmp_path).load(SiteHome(tmp_path).registry.current("hospital_001"))
    assert manifest.training["steps_selection"]["candidates"] == ["base", "few_shot"]
    assert not any(".alone." in k for k in manifest.metrics)


def test_the_refit_takes_the_folds_steps_scaled_to_all_rows_or_more_where_all_rows_ask_for_more(site, base):
    from fedmeta.personalize.candidates import Candidate, fit_all_rows_candidate, refit

    tasks = site.tasks
    head = refit(Candidate("head", base, {"lr": 0.01, "steps": 20}), base, site, tasks, seed=0)
    assert head.knobs["steps"] == 30  # 1.5 x the folds' median: the folds fit on two-thirds of the rows
    rechosen = fit_all_rows_candidate(base, site, tasks, seed=0).knobs["steps"]  # a validation fifth of all rows
    for folds_median in (4, rechosen + 20):
        fine_tune = refit(Candidate("all_rows", base, {"lr": 1e-3, "steps": folds_median}), base, site, tasks, seed=0)
        assert fine_tune.knobs["steps"] == max(rechosen, round(1.5 * folds_median))
