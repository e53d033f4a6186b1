"""What a site builds alone with standard tools: the bar personalization must clear.

Each on all of the site's training rows, scored on its held-out rows:

- ``local_linear``: scikit-learn's logistic regression (ridge for regression
  tasks) on standardized features, the penalty chosen by cross-validation on
  the site's training rows;
- ``local_gbm``: scikit-learn's histogram gradient boosting, early-stopped
  on a tenth of the rows (at sites with at least :data:`GBM_EARLY_STOP_ROWS`
  rows; fewer trees otherwise);
- ``local_only``: fedmeta's MLP from scratch (:func:`~fedmeta.evaluate.baselines.local_only`);
- ``local_cv``: the one of those three the site's own cross-validation picks
  (the validation folds of the default personalization,
  :func:`~fedmeta.personalize.choice.validation_split`; mean accuracy over
  the classification tasks, or MSE at a regression-only site), refit on all rows;
- ``local_best``: the best of the three on the held-out rows, site by site:
  a reference no site can reach without seeing its test rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedmeta.data import SiteData
from fedmeta.evaluate.site_scores import site_summary
from fedmeta.scoring import output_scores

LOCAL_METHODS = ("local_linear", "local_gbm", "local_only")
GBM_EARLY_STOP_ROWS = 100
ABSENT_LOGIT = -30.0

Predict = Callable[[np.ndarray], np.ndarray]


def _classifier_outputs(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.full((len(x), n_classes), ABSENT_LOGIT, np.float32)
    out[:, model.classes_.astype(int)] = np.log(np.clip(model.predict_proba(x), 1e-12, 1.0))
    return out


def _sklearn_task(method: str, site: SiteData, task: str, seed: int) -> Predict:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fedmeta.personalize.linear import C_GRID, CV_FOLDS, RIDGE_ALPHAS

    x, y = site.split(task, train=True)
    spec = site.schema.task(task)
    classes, counts = np.unique(y, return_counts=True)
    if spec.is_classification and len(classes) == 1:
        constant = np.full(spec.n_classes, ABSENT_LOGIT, np.float32)
        constant[int(classes[0])] = 0.0
        return lambda rows: np.tile(constant, (len(rows), 1))
    if method == "local_gbm":
        # Early stopping holds out a stratified tenth: every class needs rows on both sides.
        stop = len(y) >= GBM_EARLY_STOP_ROWS and (not spec.is_classification or counts.min() >= 10)
        kind = HistGradientBoostingClassifier if spec.is_classification else HistGradientBoostingRegressor
        model = kind(max_iter=300 if stop else 50, early_stopping=stop, validation_fraction=0.1 if stop else None, random_state=seed).fit(x, y)
    elif not spec.is_classification:
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(x, y)
    else:
        folds = min(CV_FOLDS, int(counts.min()))
        linear = (
            LogisticRegressionCV(Cs=list(C_GRID), cv=StratifiedKFold(folds, shuffle=True, random_state=seed), scoring="neg_log_loss",
                                 max_iter=2000, l1_ratios=(0,), use_legacy_attributes=False)
            if folds >= 2 else LogisticRegression(max_iter=2000)
        )
        model = make_pipeline(StandardScaler(), linear).fit(x, y)
    if spec.is_classification:
        return lambda rows: _classifier_outputs(model, rows, spec.n_classes)
    return lambda rows: model.predict(rows).astype(np.float32)[:, None]


def _mlp_predictors(site: SiteData, hidden: tuple[int, ...], seed: int) -> dict[str, Predict]:
    import torch

    from fedmeta.personalize.candidates import fit_local
    from fedmeta.trained import TrainedModel

    trained = fit_local(TrainedModel.initial(site.schema, hidden, seed), site, site.tasks, seed)
    module = trained.module()

    def predict(task: str) -> Predict:
        def run(rows: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(np.asarray(rows, np.float32)), task).numpy()
        return run

    return {task: predict(task) for task in site.tasks}


def fit_local_method(method: str, site: SiteData, hidden: tuple[int, ...], seed: int) -> dict[str, Predict]:
    """One of :data:`LOCAL_METHODS` fitted on ``site``'s training rows: a prediction function (logits, or the standardized target) per task."""
    if method == "local_only":
        return _mlp_predictors(site, hidden, seed)
    if method not in LOCAL_METHODS:
        raise ValueError(f"unknown local method {method!r}; choose from {LOCAL_METHODS}")
    return {task: _sklearn_task(method, site, task, seed) for task in site.tasks}


def held_out_scores(predictors: dict[str, Predict], site: SiteData) -> dict[str, dict[str, float]]:
    """Each scored task's held-out scores (``site.split(task, train=False)``)."""
    out = {}
    for task in site.scored_tasks:
        if task in predictors:
            x, y = site.split(task, train=False)
            out[task] = output_scores(predictors[task](x), y, site.schema.task(task).is_classification)
    return out


def _better(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether site summary ``a`` beats ``b``: higher accuracy, or at a regression-only site lower MSE."""
    if "acc" in a and "acc" in b:
        return a["acc"] > b["acc"]
    return a.get("mse", np.inf) < b.get("mse", np.inf)


def alone(site: SiteData, hidden: tuple[int, ...], seed: int, folds: int = 3) -> tuple[dict[str, dict[str, dict[str, float]]], str]:
    """Each local method's held-out scores by task, and the one the site's own cross-validation picks (``local_cv``)."""
    from fedmeta.personalize.choice import validation_split

    scores = {m: held_out_scores(fit_local_method(m, site, hidden, seed), site) for m in LOCAL_METHODS}
    validation = {m: [] for m in LOCAL_METHODS}
    for fold in range(folds):
        rows = validation_split(site, seed, fold, folds)
        if rows.scored_tasks:
            for m in LOCAL_METHODS:
                validation[m].append(site_summary(held_out_scores(fit_local_method(m, rows, hidden, seed), rows)))
    mean = {m: {k: float(np.mean([v[k] for v in vs])) for k in set.intersection(*(set(v) for v in vs))} if vs else {} for m, vs in validation.items()}
    chosen = LOCAL_METHODS[0]
    for m in LOCAL_METHODS[1:]:
        if mean[m] and _better(mean[m], mean[chosen]):
            chosen = m
    return scores, chosen


def local_baselines(site: SiteData, hidden: tuple[int, ...], seed: int, folds: int = 3) -> dict[str, dict[str, float]]:
    """Site summaries (accuracy, AUC, MSE) of every local method, ``local_cv`` and ``local_best``; ``local_cv_choice`` names the method chosen."""
    by_task, chosen = alone(site, hidden, seed, folds)
    scores = {m: site_summary(s) for m, s in by_task.items()}
    best = LOCAL_METHODS[0]
    for m in LOCAL_METHODS[1:]:
        if _better(scores[m], scores[best]):
            best = m
    return {**scores, "local_cv": scores[chosen], "local_best": scores[best], "local_cv_choice": chosen}
