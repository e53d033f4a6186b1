"""The default personalization: per site, the candidate adaptation with the best score on validation rows.

A site with 20 rows and a site with 20,000 deserve different adaptation, and
a site whose data the federation already serves well deserves the base as it
is. :func:`choose_personalization`:

1. **Splits** the site's *training* rows into :data:`FOLDS` disjoint parts
   (drawn from a hash of the site's name and the seed, like the held-out
   split of :func:`~fedmeta.data.site.held_out_mask`); each part in turn is the
   validation rows and the others the fitting rows. Every training row is
   thus scored once, which matters at small sites: one validation fifth of a
   90-row site is 18 rows, too few to tell candidates apart. The held-out (or
   test) rows are not even handed to the candidates: they work on a copy of
   the site that holds only training rows.
2. **Fits** each candidate of :mod:`fedmeta.personalize.candidates` on the
   fitting rows of each fold. By default two
   (:data:`~fedmeta.personalize.candidates.DEFAULT_CANDIDATES`): every layer
   fine-tuned on all rows with Ditto's proximal pull toward the base (Li et
   al. 2021), early-stopped (zero steps, the base as it is, included), and
   that model's outputs averaged with the site's own cross-validated
   logistic (ridge) regression, what it would build alone (blend).
   ``candidates`` adds the base itself, the plain fine-tune (FedBABU's, Oh
   et al. 2022; FedAvg + fine-tuning), the heads retrained on the frozen
   meta-learned body (FedRep, Collins et al. 2021; FedPer; ANIL), the
   regression alone (linear) or beside the base body's features (wide &
   deep), few-shot
   adaptation as the base was meta-trained (Per-FedAvg, Fallah et al.
   2020; Meta-SGD's rates, ANIL's heads) and APFL's mix of base and local
   predictions (Deng et al. 2020) for each α.
3. **Chooses** the one with the lowest validation loss averaged over the
   folds and the site's tasks (cross-entropy, MSE for regression), ties
   broken by mean accuracy, and remaining ties by the order above, base first.
4. **Refits** the chosen candidate on all the training rows with the knobs it
   was chosen with (λ, α) and 1.5 times the folds' median step count (the
   folds fit on two-thirds of the rows); the every-layer fine-tunes take
   more if a choice on a validation fifth of all the rows asks for more
   (:func:`~fedmeta.personalize.candidates.refit`). Base and chosen model
   are scored on the held-out rows, which nothing above looked at.

The result records every candidate's validation scores: why the site got
what it got.
"""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import torch

from fedmeta.data.site import MIN_TRAINING_ROWS, SiteData
from fedmeta.meta.inner import make_loss
from fedmeta.personalize.adaptation import Personalization, check_shots
from fedmeta.personalize.base import PersonalizationError, check_normalization
from fedmeta.personalize.candidates import DEFAULT_CANDIDATES, Candidate, check_candidates, fit_candidates, refit
from fedmeta.scoring import task_scores
from fedmeta.trained import TrainedModel

FOLDS = 3
MIN_VALIDATION_ROWS = 5
#: The label prefix of candidates fitted from a regional base (:mod:`fedmeta.fl.regional_rounds`).
REGIONAL = "regional:"


def validation_split(site: SiteData, seed: int, fold: int = 0, folds: int = FOLDS) -> SiteData:
    """The site's training rows only, with one of ``folds`` disjoint parts marked as validation rows (the copy's "held-out" side).

    ``split(task, train=True)`` of the copy gives the fitting rows and
    ``split(task, train=False)`` the validation rows; the original held-out
    rows are not in it at all. The parts are drawn by the one split rule's
    hash of the site's name and ``seed``, so every caller gets the same folds.
    """
    if not 0 <= fold < folds or folds < 2:
        raise ValueError(f"fold must be in [0, {folds}) with folds >= 2, got fold={fold}, folds={folds}")
    train = ~site.test_mask
    n = int(train.sum())
    digest = hashlib.sha256(f"fedmeta-validation/{seed}/{site.name}".encode()).digest()
    part = np.empty(n, int)
    part[np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(n)] = np.arange(n) % folds
    return SiteData(site.name, site.schema, site.x[train], {t: y[train] for t, y in site.labels.items()}, part == fold)


def _feasible_shots(site: SiteData, tasks: list[str], shots: int) -> int:
    """K lowered to what every task's training rows can supply per class."""
    fits = [site.n_labelled(t, train=True) // (site.schema.task(t).n_classes or 1) for t in tasks]
    return max(1, min([shots, *fits]))


def validation_scores(model: TrainedModel, rows: SiteData, tasks: list[str]) -> dict[str, float]:
    """Mean accuracy over classification tasks (``acc``, absent without one) and mean loss over all tasks (``loss``) on the validation rows."""
    module = model.module()
    accs, losses = [], []
    for task in tasks:
        x, y = rows.split(task, train=False)
        if not len(y):
            continue
        scores = task_scores(module, model.params, task, x, y)
        if "acc" in scores:
            accs.append(scores["acc"])
        with torch.no_grad():
            loss = float(make_loss(module, task)(model.params, torch.from_numpy(x), torch.from_numpy(y), torch.ones(len(y))))
        losses.append(loss if math.isfinite(loss) else math.inf)
    out = {"loss": float(np.mean(losses)) if losses else math.inf}
    if accs:
        out["acc"] = float(np.mean(accs))
    return out


def loss_first(scores: dict[str, float]) -> tuple[float, float]:
    """The default rule: validation loss first (cross-entropy, MSE for regression), then accuracy.

    The loss scores every row's probability, not only which side of 0.5 it
    falls: a steadier estimate than accuracy on a site's few validation rows.
    On the generator families' selection seeds it chose better than accuracy
    first (README, "Personalization against the personalized-FL peers").
    """
    return (scores["loss"], -scores.get("acc", 0.0))


def accuracy_first(scores: dict[str, float]) -> tuple[float, float]:
    """The previous default's rule: validation accuracy first, then loss."""
    return (-scores.get("acc", 0.0), scores["loss"])


def pick(means: dict[str, dict[str, float]], rank=loss_first) -> str:
    """The label ``rank`` puts first by its mean validation scores (the first of equals).

    >>> pick({"ditto(λ=10)": {"loss": 0.40}, "regional:ditto(λ=10)": {"loss": 0.42}})
    'ditto(λ=10)'
    """
    labels = list(means)
    return labels[min(range(len(labels)), key=lambda i: (rank(means[labels[i]]), i))]


def choose(
    folds: list[tuple[list[Candidate], SiteData]], tasks: list[str], rank=loss_first
) -> tuple[Candidate, dict[str, dict[str, float]]]:
    """The candidate :func:`pick` puts first by its validation scores averaged over folds, and every candidate's mean scores by label.

    ``folds`` pairs each fold's candidates (the same labels, in the same
    order) with that fold's rows. The chosen candidate's step counts are the
    medians over folds.
    """
    by_label: dict[str, list[tuple[Candidate, dict[str, float]]]] = {}
    for candidates, rows in folds:
        for c in candidates:
            by_label.setdefault(c.label, []).append((c, validation_scores(c.model, rows, tasks)))
    means = {}
    for label, scored in by_label.items():
        keys = set.intersection(*(set(s) for _, s in scored))
        means[label] = {k: float(np.mean([s[k] for _, s in scored])) for k in keys}
    best = pick(means, rank)
    first = by_label[best][0][0]
    knobs = dict(first.knobs)
    for k in ("steps", "local_steps"):
        if k in knobs:
            knobs[k] = int(np.median([c.knobs[k] for c, _ in by_label[best]]))
    chosen = Candidate(first.name, first.model, knobs)
    return chosen, {label: {k: round(v, 5) for k, v in m.items()} for label, m in means.items()}


def _from_bases(
    bases: dict[str, TrainedModel], rows: SiteData, tasks: list[str], shots: int, lr: float, seed: int, candidates
) -> list[Candidate]:
    """Every base's candidates on one fold, each labelled (and its knobs marked) with the level it starts from."""
    out = []
    for level, model in bases.items():
        for c in fit_candidates(model, rows, tasks, shots, lr, seed, candidates):
            if level != "global":
                c = Candidate(f"{REGIONAL}{c.name}", c.model, {**c.knobs, "from": level})
            out.append(c)
    return out


def _refit_from(chosen: Candidate, bases: dict[str, TrainedModel], site: SiteData, tasks: list[str], seed: int) -> Candidate:
    """The chosen candidate refit on all the training rows from the base it was chosen from."""
    level = chosen.knobs.get("from", "global")
    kind = chosen.name.removeprefix(REGIONAL)
    refitted = refit(Candidate(kind, chosen.model, {k: v for k, v in chosen.knobs.items() if k != "from"}), bases[level], site, tasks, seed)
    return refitted if level == "global" else Candidate(chosen.name, refitted.model, {**refitted.knobs, "from": level})


def choose_personalization(
    base: TrainedModel, site: SiteData, shots: int = 5, lr: float = 0.05, seed: int = 0, candidates=DEFAULT_CANDIDATES, rank=loss_first,
    regional: TrainedModel | None = None, regional_validation: TrainedModel | None = None,
) -> Personalization:
    """Fit each candidate on part of the site's training rows, keep the best on the rest, refit it on all of them.

    ``candidates`` are the kinds weighed (:data:`~fedmeta.personalize.candidates.CANDIDATES`;
    default :data:`~fedmeta.personalize.candidates.DEFAULT_CANDIDATES`), ``rank`` orders their mean validation
    scores (:func:`loss_first`; :func:`accuracy_first`). ``shots`` is K for the few-shot adaptation
    (refused if the training rows cannot supply it, lowered to what the
    fitting rows can) and ``lr`` its rate. Base and chosen model are scored on
    the site's held-out (or test) rows, as :func:`~fedmeta.personalize.personalize` does.

    ``regional``: the site's regional base (:mod:`fedmeta.fl.regional_rounds`),
    when its region has one. Every candidate is then also fitted from it
    (labelled ``regional:<kind>``) on the same folds and weighed beside the
    global ones: Ditto's zero steps make the regional base as it is one of
    them. A site whose region teaches nothing keeps a global candidate.

    ``regional_validation``: for a site that trained in its region, the
    region's base trained without it (:func:`~fedmeta.fl.regions.validation_base_path`).
    The regional candidates are then fitted from it on the folds, so that the
    folds (the site's own training rows) score the level as rows the regional
    base never saw; the one chosen is refit from ``regional``. Without it the
    folds flatter the regional base, which has learned those very rows: on
    ``benchmarks/hierarchy.py``'s selection seed 0 the regional level cost
    the seen sites 1.27 points with regions dealt at random, and 20 of 24
    sites chose it on fresh seed 3. The choice between the levels is the
    plain lowest loss: an allowance for the regional candidates (0.03 in
    mean validation loss, as a base trained without the site has one site
    fewer), chosen on seed 0, cost the seen sites 0.6 to 1.4 points on fresh
    seeds 4 to 6 and was dropped; so was extending it to new sites of a
    known region (docs/benchmarks.md, "Regions").

    >>> from fedmeta.data import hospital_federation
    >>> site = hospital_federation(n_sites=1)[0]
    >>> result = choose_personalization(TrainedModel.initial(site.schema, hidden=(8,)), site)
    >>> result.mode.startswith("chosen:"), sorted(result.steps_selection["validation"])
    (True, ['blend(α=0.5)', 'ditto(λ=10)'])
    """
    start = time.perf_counter()
    try:
        candidates = check_candidates(candidates)
    except ValueError as e:
        raise PersonalizationError(str(e)) from None
    check_normalization(base, site)
    bases = {"global": base}
    if regional is not None:
        check_normalization(regional, site)
        if regional.tasks != base.tasks:
            raise PersonalizationError(f"the regional base's tasks ({', '.join(regional.tasks)}) are not the global base's ({', '.join(base.tasks)})")
        bases["regional"] = regional
    validation_bases = dict(bases)
    if regional_validation is not None:
        if regional is None:
            raise PersonalizationError("a regional validation base was given without the regional base it stands in for")
        check_normalization(regional_validation, site)
        if regional_validation.tasks != base.tasks:
            raise PersonalizationError(
                f"the regional validation base's tasks ({', '.join(regional_validation.tasks)}) are not the global base's ({', '.join(base.tasks)})"
            )
        validation_bases["regional"] = regional_validation
    tasks = [t for t in site.tasks if t in base.tasks]
    if not tasks:
        raise PersonalizationError(
            f"site {site.name!r} has no task with enough labelled rows to personalize "
            f"(each needs >= {MIN_TRAINING_ROWS} labelled training rows; model tasks: {base.tasks})"
        )
    for t in tasks:
        check_shots(site, t, shots)
    rows = validation_split(site, seed)
    n_validation = sum(validation_split(site, seed, f).n_labelled(t, train=False) for f in range(FOLDS) for t in tasks)
    fit_tasks = [t for t in tasks if rows.n_labelled(t, train=True) >= 2]
    if n_validation < MIN_VALIDATION_ROWS or not fit_tasks:
        # Too few rows to tell candidates apart: the few-shot adaptation the base was meta-trained for.
        candidate = refit(Candidate("few_shot", base, {"shots": _feasible_shots(site, tasks, shots), "steps": 5, "lr": lr}), base, site, tasks, seed)
        why = {"chosen": candidate.label, "note": f"{n_validation} validation rows (< {MIN_VALIDATION_ROWS}): few-shot adaptation, 5 steps", "validation": {}}
    else:
        folds = []
        for fold in range(FOLDS):
            rows = validation_split(site, seed, fold)
            folds.append((_from_bases(validation_bases, rows, fit_tasks, _feasible_shots(rows, fit_tasks, shots), lr, seed, candidates), rows))
        chosen, scores = choose(folds, fit_tasks, rank)
        candidate = _refit_from(chosen, bases, site, tasks, seed)
        why = {"chosen": chosen.label, "knobs": chosen.knobs, "validation": scores, "validation_rows": n_validation,
               "folds": FOLDS, "candidates": list(candidates), "levels": list(bases)}
        if regional is not None:
            why["regional_validation"] = "a base of the region trained without this site" if regional_validation is not None else "the regional base"
    metrics = held_out_metrics(base, candidate.model, site, tasks)
    steps = candidate.knobs.get("steps", 0)
    return Personalization(candidate.model, metrics, tasks, candidate.knobs.get("shots", "all"), int(steps), float(lr),
                           f"chosen:{candidate.name}", seed, time.perf_counter() - start, why)


def held_out_metrics(base: TrainedModel, personalized: TrainedModel, site: SiteData, tasks: list[str]) -> dict[str, float]:
    """``<task>.base.<metric>`` and ``<task>.personalized.<metric>`` on the site's held-out (or test) rows."""
    metrics = {}
    for label, model in (("base", base), ("personalized", personalized)):
        module = model.module()
        for t in (t for t in tasks if t in site.scored_tasks):
            for name, value in task_scores(module, model.params, t, *site.split(t, train=False)).items():
                metrics[f"{t}.{label}.{name}"] = value
    return metrics
