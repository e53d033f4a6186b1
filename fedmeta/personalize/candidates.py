"""The ways a site can adapt the global base: each candidate fits on a site's rows and returns a model to score.

Every candidate is a :class:`~fedmeta.trained.TrainedModel` built from the
base with the engine's own pieces (:func:`fedmeta.meta.inner.sgd_update` for
few shots, the all-rows trainer of :mod:`fedmeta.personalize.all_rows`
otherwise), so any of them can be exported and served like the base:

- ``base``: the base as it is (the candidate that guarantees no site is worse
  off than the federation's model, up to validation noise).
- ``few_shot``: K shots per class, adapted as the base was meta-trained to
  adapt: Meta-SGD's learned rates when the base has them, the heads only for
  an ANIL base, every layer otherwise (Per-FedAvg, Fallah et al. 2020, adapts
  the same way from a meta-learned start).
- ``all_rows``: every labelled training row, early-stopped (FedAvg + fine-tuning,
  and FedBABU's fine-tuning stage, Oh et al. 2022).
- ``ditto``: the same fine-tune with a proximal pull toward the base,
  λ from :data:`DITTO_LAMBDAS` (Ditto, Li et al. 2021). The pull is a
  proximal step after each Adam step of rate 1e-3, so λ = 1 moves a weight
  0.1% of the way back per step: λ = 1 measured the same as no pull, and
  λ = 100 was rarely better than the base; only λ = 10 is kept.
- ``head``: the heads retrained on the frozen body (FedRep, Collins et al.
  2021; FedPer, Arivazhagan et al. 2019; ANIL).
- ``linear``: the site's own logistic (ridge) regression, its penalty chosen
  by cross-validation; ``wide``: the same regression on the base body's
  features and the encoded features together (:mod:`~fedmeta.personalize.linear`).
  Both are the base's MLP with an identity path beside the body.
- ``blend``: Ditto's fine-tune and the linear model, their outputs averaged
  in one MLP (an ensemble of the federation's view and the site's own).
- ``mix``: base and a local model's predictions mixed,
  ``(1 - α)·base + α·local`` with α from :data:`MIX_ALPHAS` (APFL, Deng et al.
  2020). The local model is trained from scratch on the site's rows; the mix
  is exactly a block-diagonal MLP twice as wide, so it exports as one network.
  α = 1 is the site's own model: a site is never offered less than it could
  train alone.

Each ``fit_*`` function takes ``steps=None`` to choose its step count on its
own validation part of the rows it is given, or a step count to refit with.

:data:`DEFAULT_CANDIDATES` is what the default choice weighs: the
federation's model pulled toward the site (Ditto, whose early stopping keeps
the base where no step helps) and that model averaged with the site's own
linear model (blend: the federation's view and what the site would build
alone, hedged). They were chosen on the selection seeds
(:mod:`fedmeta.evaluate.families`' six families at seed 1, hospitals at
seed 0; ``benchmarks/choice_diagnostic.py --dump`` replayed): among the
subsets of Ditto, heads, linear and blend under three ranking rules, these
two by validation loss scored best, mean 0.818 (worst tenth 0.722) against
0.817 (0.713) for the previous pair, Ditto and linear. The linear model
alone lost at the small sites, where its log-loss on a few validation rows
is noisy; averaged with Ditto it is never as far off.
``docs/benchmarks.md`` ("The personalization study") reports the result on
fresh seeds. The others stay available:
``choose_personalization(candidates=CANDIDATES)``, ``fedmeta personalize --candidates``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedmeta.data.site import SiteData
from fedmeta.models import head_prefix, is_body_param
from fedmeta.personalize.adaptation import AUTO_STEPS, _choose_steps, _fine_tune, _support_and_rest
from fedmeta.personalize.all_rows import ALL_ROWS_LR, Run, fit_all_rows_batch
from fedmeta.trained import TrainedModel

#: Every kind of candidate, in the order ties are broken (base first).
CANDIDATES = ("base", "few_shot", "all_rows", "ditto", "head", "mix", "linear", "wide", "blend")
#: The kinds the default choice weighs.
DEFAULT_CANDIDATES = ("ditto", "blend")
DITTO_LAMBDAS = (10.0,)
MIX_ALPHAS = (0.25, 0.5, 0.75, 1.0)
#: The linear model's weight in each blend.
BLEND_ALPHAS = (0.5,)
LOCAL_LR = 3e-3
MAX_STEPS = 600


@dataclass
class Candidate:
    """One adapted model: its name, its knobs (what a refit on more rows needs) and the model."""

    name: str
    model: TrainedModel
    knobs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``ditto(λ=0.1)``, ``mix(α=0.5)``, ``few_shot``: the name with the knob the grid varied."""
        shown = {k: v for k, v in self.knobs.items() if k in ("lambda", "alpha")}
        return self.name + ("(" + ", ".join(f"{'λ' if k == 'lambda' else 'α'}={v:g}" for k, v in shown.items()) + ")" if shown else "")


def trained_mode(base: TrainedModel) -> str:
    """How the base was meta-trained to adapt: ``metasgd`` (learned rates), ``head`` (ANIL) or ``all``."""
    if "inner_lrs" in base.state:
        return "metasgd"
    return "head" if base.info.get("algorithm") == "anil" else "all"


def _with_params(base: TrainedModel, params: dict[str, torch.Tensor], how: str) -> TrainedModel:
    return TrainedModel(base.schema, base.hidden, {**base.state, "params": params}, {**base.info, "adaptation": how})


def _head_names(base: TrainedModel, tasks: list[str]) -> list[str]:
    return [k for k in base.params if any(k.startswith(head_prefix(t)) for t in tasks)]


def fit_base(base: TrainedModel) -> Candidate:
    return Candidate("base", base)


def fit_few_shot(base: TrainedModel, site: SiteData, tasks: list[str], shots: int, lr: float, seed: int, steps: int | None = None) -> Candidate:
    """K shots per class of ``site``'s training rows, ``steps`` (or 5-40, chosen on the other training rows) of the engine's SGD step."""
    mode = trained_mode(base)
    rate = base.state["inner_lrs"] if mode == "metasgd" else lr
    names = _head_names(base, tasks) if mode == "head" else [k for k in base.params if is_body_param(k)] + _head_names(base, tasks)
    drawn = _support_and_rest(site, tasks, shots, seed)
    supports = {t: pair[0] for t, pair in drawn.items()}
    rest = {t: pair[1] for t, pair in drawn.items()}
    if steps is None and any(len(rows[1]) for rows in rest.values()):
        checkpoints = _fine_tune(base, supports, names, max(AUTO_STEPS), rate, checkpoints=AUTO_STEPS)
        steps, _ = _choose_steps(base, checkpoints, rest)
        params = checkpoints[steps]
    else:
        steps = AUTO_STEPS[0] if steps is None else steps
        params = _fine_tune(base, supports, names, steps, rate)
    return Candidate("few_shot", _with_params(base, _finite_or_base(params, base), "few_shot"), {"shots": shots, "steps": steps, "mode": mode, "lr": lr if mode != "metasgd" else "learned"})


def _finite_or_base(params: dict[str, torch.Tensor], base: TrainedModel) -> dict[str, torch.Tensor]:
    """A diverged fine-tune falls back to the base; its validation score will say so."""
    if all(torch.isfinite(v).all() for v in params.values()):
        return params
    return {k: v.clone() for k, v in base.params.items()}


def _body_and_heads(model: TrainedModel, tasks: list[str]) -> tuple[str, ...]:
    return tuple(k for k in model.params if is_body_param(k)) + tuple(_head_names(model, tasks))


def _all_rows_runs(base: TrainedModel, tasks: list[str], lambdas=DITTO_LAMBDAS) -> list[tuple[str, dict, Run]]:
    """The fine-tunes of the base on all rows, as (name, knobs, run): plain, Ditto's for each λ, heads only."""
    every = _body_and_heads(base, tasks)
    return [
        ("all_rows", {"lr": ALL_ROWS_LR}, Run(base.params, every, ALL_ROWS_LR)),
        *(("ditto", {"lr": ALL_ROWS_LR, "lambda": lam}, Run(base.params, every, ALL_ROWS_LR, lam)) for lam in lambdas),
        ("head", {"lr": 10 * ALL_ROWS_LR}, Run(base.params, tuple(_head_names(base, tasks)), 10 * ALL_ROWS_LR)),
    ]


def _local_run(base: TrainedModel, tasks: list[str], seed: int) -> Run:
    """The site's own model: the same network from a fresh initialization (seeded), every layer trained at :data:`LOCAL_LR`."""
    start = TrainedModel.initial(base.schema, base.hidden, seed)
    return Run(start.params, _body_and_heads(start, tasks), LOCAL_LR)


def _fit(
    base: TrainedModel, runs: list[Run], site: SiteData, tasks: list[str], seed: int, steps: list[int | None], at_least: int = 0
) -> list[tuple[dict, int]]:
    """Each run's (parameters, steps): runs with the same parameter names train as one batch, sharing every minibatch."""
    out: list[tuple[dict, int] | None] = [None] * len(runs)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(tuple(run.start), []).append(i)
    for members in groups.values():
        fitted = fit_all_rows_batch(base.module(), [runs[i] for i in members], site, tasks, seed, max_steps=MAX_STEPS,
                                    steps=[steps[i] for i in members], at_least=at_least)
        for i, (params, n_steps, _) in zip(members, fitted):
            out[i] = (params, n_steps)
    return out


def _candidate(name: str, knobs: dict, base: TrainedModel, params: dict, steps: int) -> Candidate:
    return Candidate(name, _with_params(base, _finite_or_base(params, base), name), {**knobs, "steps": steps})


def _one(
    base: TrainedModel, spec: tuple[str, dict, Run], site: SiteData, tasks: list[str], seed: int, steps: int | None, at_least: int = 0
) -> Candidate:
    name, knobs, run = spec
    [(params, steps)] = _fit(base, [run], site, tasks, seed, [steps], at_least)
    return _candidate(name, knobs, base, params, steps)


def fit_all_rows_candidate(base: TrainedModel, site: SiteData, tasks: list[str], seed: int, steps: int | None = None) -> Candidate:
    """Every layer fine-tuned on every labelled training row (Adam), early-stopped."""
    return _one(base, _all_rows_runs(base, tasks)[0], site, tasks, seed, steps)


def fit_ditto(base: TrainedModel, site: SiteData, tasks: list[str], lam: float, seed: int, steps: int | None = None) -> Candidate:
    """Ditto's personal model (Li et al. 2021): the all-rows fine-tune with a proximal pull ``λ/2 ||θ - θ_base||²`` toward the base."""
    return _one(base, _all_rows_runs(base, tasks, (lam,))[1], site, tasks, seed, steps)


def fit_head(base: TrainedModel, site: SiteData, tasks: list[str], seed: int, steps: int | None = None) -> Candidate:
    """The heads retrained on every labelled training row, the body frozen bit for bit (FedRep, Collins et al. 2021; ANIL)."""
    return _one(base, _all_rows_runs(base, tasks)[-1], site, tasks, seed, steps)


def fit_local(base: TrainedModel, site: SiteData, tasks: list[str], seed: int, steps: int | None = None) -> TrainedModel:
    """The site's own model: the same network from a fresh initialization, trained on its rows alone (Adam, early-stopped)."""
    [(params, steps)] = _fit(base, [_local_run(base, tasks, seed)], site, tasks, seed, [steps])
    return _local_model(base, params, steps)


def _local_model(base: TrainedModel, params: dict, steps: int) -> TrainedModel:
    return TrainedModel(base.schema, base.hidden, {"params": params}, {"adaptation": "local", "steps": steps})


def mixed_model(base: TrainedModel, local: TrainedModel, alpha: float) -> TrainedModel:
    """One MLP whose outputs are ``(1 - α)·base(x) + α·local(x)``: both bodies side by side, block-diagonal, heads weighted.

    >>> from fedmeta.data import hospital_schema
    >>> a, b = TrainedModel.initial(hospital_schema(), (4, 4), 0), TrainedModel.initial(hospital_schema(), (4, 4), 1)
    >>> mixed_model(a, b, 0.5).hidden
    (8, 8)
    """
    if len(base.hidden) != len(local.hidden):
        raise ValueError(f"the mix needs bodies of equal depth, got hidden {base.hidden} and {local.hidden}")
    a, b = base.params, local.params
    params = {}
    for name in a:
        if name.startswith("body.") and name.endswith(".weight"):
            first = name == "body.net.0.weight"
            params[name] = torch.cat([a[name], b[name]], 0) if first else torch.block_diag(a[name], b[name])
        elif name.startswith("body."):
            params[name] = torch.cat([a[name], b[name]])
        elif name.endswith(".weight"):
            params[name] = torch.cat([(1 - alpha) * a[name], alpha * b[name]], 1)
        else:
            params[name] = (1 - alpha) * a[name] + alpha * b[name]
    hidden = tuple(h + g for h, g in zip(base.hidden, local.hidden))
    return TrainedModel(base.schema, hidden, {"params": params}, {**base.info, "adaptation": "mix", "alpha": alpha})


def _mixes(base: TrainedModel, local: TrainedModel, alphas) -> list[Candidate]:
    return [Candidate("mix", mixed_model(base, local, alpha), {"alpha": alpha, "local_steps": local.info["steps"]}) for alpha in alphas]


def fit_mixes(base: TrainedModel, site: SiteData, tasks: list[str], seed: int, alphas=MIX_ALPHAS, local_steps: int | None = None) -> list[Candidate]:
    """APFL's mixture (Deng et al. 2020) for each α: one local model, several mixes of its predictions with the base's."""
    return _mixes(base, fit_local(base, site, tasks, seed, local_steps), alphas)


def fit_linear(base: TrainedModel, site: SiteData, tasks: list[str], seed: int, deep: bool = False) -> Candidate:
    """The site's own cross-validated logistic (ridge) regression, or with ``deep`` the same beside the base body's features (:mod:`~fedmeta.personalize.linear`)."""
    from fedmeta.personalize.linear import fit_linear_heads, widened

    name = "wide" if deep else "linear"
    return Candidate(name, widened(base, fit_linear_heads(base, site, tasks, seed, deep), name))


def _blend(tuned: Candidate, own: Candidate, alpha: float) -> Candidate:
    """Ditto's fine-tune and the site's own linear model, ``(1 - α)·ditto + α·linear``: one MLP (:func:`mixed_model`)."""
    return Candidate("blend", mixed_model(tuned.model, own.model, alpha), {"steps": tuned.knobs["steps"], "ditto": tuned.knobs["lambda"], "alpha": alpha})


def check_candidates(names) -> tuple[str, ...]:
    """``names`` as a tuple in :data:`CANDIDATES` order; refuses an unknown or empty list, naming it."""
    names = tuple(dict.fromkeys(names))
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise ValueError(f"candidates must be some of {', '.join(CANDIDATES)}; got {', '.join(names) or 'none'}")
    return tuple(n for n in CANDIDATES if n in names)


def fit_candidates(
    base: TrainedModel, site: SiteData, tasks: list[str], shots: int, lr: float, seed: int, names=CANDIDATES
) -> list[Candidate]:
    """The candidates of the kinds ``names``, each choosing its own steps on ``site``'s training rows: base first (it wins ties).

    The all-rows fine-tunes and the local model train as one batch (:func:`~fedmeta.personalize.all_rows.fit_all_rows_batch`).
    """
    names = check_candidates(names)
    specs = [spec for spec in _all_rows_runs(base, tasks) if spec[0] in names]
    runs = [run for _, _, run in specs] + ([_local_run(base, tasks, seed)] if "mix" in names else [])
    fitted = _fit(base, runs, site, tasks, seed, [None] * len(runs)) if runs else []
    by_kind: dict[str, list[Candidate]] = {name: [] for name in names}
    for (name, knobs, _), (params, steps) in zip(specs, fitted):
        by_kind[name].append(_candidate(name, knobs, base, params, steps))
    if "mix" in names:
        local_params, local_steps = fitted[-1]
        by_kind["mix"] = _mixes(base, _local_model(base, local_params, local_steps), MIX_ALPHAS)
    if "base" in names:
        by_kind["base"] = [fit_base(base)]
    if "few_shot" in names:
        by_kind["few_shot"] = [fit_few_shot(base, site, tasks, shots, lr, seed)]
    for name in ("linear", "wide"):
        if name in names:
            by_kind[name] = [fit_linear(base, site, tasks, seed, deep=name == "wide")]
    if "blend" in names:
        tuned = (by_kind.get("ditto") or [fit_ditto(base, site, tasks, DITTO_LAMBDAS[0], seed)])[0]
        own = (by_kind.get("linear") or [fit_linear(base, site, tasks, seed)])[0]
        by_kind["blend"] = [_blend(tuned, own, alpha) for alpha in BLEND_ALPHAS]
    return [c for name in names for c in by_kind[name]]


#: The folds fit on two-thirds of a site's training rows: as many passes over all of them take 1.5 times the steps.
REFIT_SCALE = 1.5


def refit(candidate: Candidate, base: TrainedModel, site: SiteData, tasks: list[str], seed: int) -> Candidate:
    """The chosen candidate again, on all of ``site``'s training rows, with the knobs (λ, α) it was chosen with.

    Steps: the folds chose theirs for fits on two-thirds of the rows, so the
    heads refit with :data:`REFIT_SCALE` times the folds' median. The
    every-layer fine-tunes (all rows, Ditto) also choose their steps again on
    a validation fifth of all the rows, as ``--shots all`` does, and take the
    larger of the two counts: at a site of 100 rows that fifth is 20 rows and
    often stops too early, while a site with many rows may want more than the
    folds saw. Replayed on the benchmarks' held-out scores
    (``benchmarks/choice_diagnostic.py``), FedProx(1,1)'s all-rows fine-tunes
    score 0.881 with the folds' median and 0.896 chosen again.
    """
    k = candidate.knobs
    if candidate.name == "base":
        return candidate
    if candidate.name == "few_shot":
        return fit_few_shot(base, site, tasks, k["shots"], k["lr"] if k["lr"] != "learned" else 0.0, seed, k["steps"])
    if candidate.name in ("linear", "wide"):
        return fit_linear(base, site, tasks, seed, deep=candidate.name == "wide")
    if candidate.name == "blend":
        spec = _all_rows_runs(base, tasks, (k["ditto"],))[1]
        return _blend(_one(base, spec, site, tasks, seed, None, at_least=round(REFIT_SCALE * k["steps"])), fit_linear(base, site, tasks, seed), k["alpha"])
    if candidate.name == "mix":
        return fit_mixes(base, site, tasks, seed, (k["alpha"],), k["local_steps"])[0]
    scaled = round(REFIT_SCALE * k["steps"])
    if candidate.name == "head":
        return fit_head(base, site, tasks, seed, scaled)
    if candidate.name not in ("all_rows", "ditto"):
        raise ValueError(f"unknown candidate {candidate.name!r}")
    spec = next(sp for sp in _all_rows_runs(base, tasks, (k.get("lambda", DITTO_LAMBDAS[0]),)) if sp[0] == candidate.name)
    return _one(base, spec, site, tasks, seed, None, at_least=scaled)
