"""Contributions: what each site's updates give the federation, round by round, as Shapley values.

The game of a training round (GTG-Shapley, Liu et al., ACM TIST 2022: coalition
models rebuilt from the round's updates, no retraining): a coalition ``S`` of
the round's sites is worth the drop in validation loss when the server steps
with ``S``'s combined update (the run's own rule, :meth:`MetaStrategy.combine`)
instead of not stepping. The sites' validation rows never leave them: each site
sends, beside its update, the gradient ``g_j`` of its loss on its held-out rows
at the model it received (:func:`validation_gradient`), and the server scores a
coalition to first order: the server steps ``-lr * combine(S)``, so
``v_j(S) = lr * g_j . combine(S)``. That costs no
extra exchange and no retraining; what it does not see is the curvature of a
large step (``benchmarks/contributions.py`` measures how the ranking compares
with exact Shapley by retraining every coalition).

Influence is bounded twice. A site never scores itself: its round value is the
**median**, over the round's *other* sites, of its Shapley value under each
one's gradient, so one lying scorer moves nobody's value past the honest
scorers'. And updates are clipped to the round's median update norm before
they are combined for scoring, so a site cannot raise its value by scaling its
update up: a larger step in a useful direction earns no more than a typical one.

Up to :data:`EXACT_MAX` sites a round is computed exactly (all ``2^n``
coalitions); above, by ``samples`` random permutations with GTG's truncation
(a permutation stops once its prefix is worth the whole round within
``truncation``). A round's standard error combines the scorers' spread
(the median's, ``1.2533 s / sqrt(m)`` over its ``m`` other scorers) and the sampling's. A site's interval is
its summed value +- Student's t of the summed errors, at the degrees of freedom the rounds' spreads give
together (Welch-Satterthwaite: a few rounds of three sites give an interval several times wider than 1.96
errors would). A round with one other scorer, or a self-reported score, has no spread to estimate its error
from: the site's interval is then unknown (``None``), and it is never named a site to check.

Under SecAgg+ the server sees only the sum: each site scores its own update
against its own validation gradient (FedCE-style site-side
scoring, Jiang et al., CVPR 2023: ``lr * g_i . u_i`` with ``u_i`` its update, the
server's step being ``-lr`` times the mean) and reports the number; the report's
``method`` says so, and such scores are self-reported.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fedmeta.files import atomic_write_text
from fedmeta.fl.aggregation import group_updates, unflatten_state
from fedmeta.fl.contribution_report import REPORT, to_check  # noqa: F401 (where callers find them)
from fedmeta.fl.site_training import build_model
from fedmeta.meta.inner import make_loss

#: Rounds of at most this many sites are computed exactly (2^n coalitions).
EXACT_MAX = 10
GRADIENT = "contribution-gradient"  # the record of a training reply that carries the site's validation gradient
SELF_SCORE = "contribution-self"  # the metric of a SecAgg+ reply that carries the site's own score
log = logging.getLogger("flwr.fedmeta")
FIRST_ORDER = "gtg-shapley, first-order utility (validation gradients of the other sites), median over scorers"
SELF_SCORED = "site-side self-scored first-order gain (SecAgg+: the server sees only sums)"


def exact_shapley(players: Sequence[str], value: Callable[[frozenset[str]], np.ndarray | float]) -> dict[str, np.ndarray | float]:
    """Every player's Shapley value of the game ``value`` (vector-valued games give one value per component).

    >>> v = {frozenset(): 0, frozenset("a"): 1, frozenset("b"): 2, frozenset("ab"): 6}
    >>> {p: float(x) for p, x in exact_shapley("ab", v.__getitem__).items()}
    {'a': 2.5, 'b': 3.5}
    """
    players = list(players)
    n = len(players)
    cache = {}

    def v(s: frozenset[str]):
        if s not in cache:
            cache[s] = np.asarray(value(s), float)
        return cache[s]

    out = {}
    for p in players:
        others = [q for q in players if q != p]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, size):
                s = frozenset(coalition)
                total = total + weight * (v(s | {p}) - v(s))
        out[p] = total
    return out


def permutation_shapley(
    players: Sequence[str], value: Callable[[frozenset[str]], np.ndarray | float], samples: int, rng: random.Random, truncation: float = 0.01
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Monte-Carlo Shapley over ``samples`` random permutations, truncated as GTG-Shapley does: the mean and its standard error per player.

    Within a permutation, once the prefix is worth the whole coalition to
    within ``truncation`` of its size (the norm over components), the
    remaining players' marginals count as zero.
    """
    players = list(players)
    whole = np.asarray(value(frozenset(players)), float)
    empty = np.asarray(value(frozenset()), float)
    scale = float(np.linalg.norm(whole - empty))
    marginals: dict[str, list[np.ndarray]] = {p: [] for p in players}
    for _ in range(max(1, samples)):
        order = players[:]
        rng.shuffle(order)
        prefix, before = frozenset(), empty
        for p in order:
            if float(np.linalg.norm(whole - before)) <= truncation * scale:
                marginals[p].append(np.zeros_like(whole))
                continue
            prefix = prefix | {p}
            after = whole if len(prefix) == len(players) else np.asarray(value(prefix), float)
            marginals[p].append(after - before)
            before = after
    mean = {p: np.mean(m, axis=0) for p, m in marginals.items()}
    se = {p: (np.std(m, axis=0, ddof=1) / math.sqrt(len(m)) if len(m) > 1 else np.zeros_like(whole)) for p, m in marginals.items()}
    return mean, se


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clipped(update: Mapping[str, torch.Tensor], bound: float) -> dict[str, torch.Tensor]:
    norm = update_norm(update)
    return dict(update) if norm <= bound or norm == 0 else {k: t * (bound / norm) for k, t in update.items()}


def _mean_game(updates: Sequence, gradients: Mapping[str, Mapping[str, torch.Tensor]], scorers: list[str], lr: float):
    """The coalition game of the example-weighted mean, from dot products computed once.

    Per group (body, each head), ``g_j . mean(S) = sum_i w_i (g_j . u_i) / sum_i w_i``
    over S's holders of the group: each ``g_j . u_i`` is computed once, and a
    coalition costs a few sums instead of combining its updates.
    """
    groups = []
    for group in group_updates(updates):
        holders = []
        for u in group.holders:
            dots = np.array([sum(float((gradients[j][k].double() * u.update[k].double()).sum()) for k in group.keys if k in gradients[j]) for j in scorers])
            holders.append((u.site, u.weight(group.keys[0]), dots))
        groups.append(holders)

    def value(coalition: frozenset[str]) -> np.ndarray:
        total = np.zeros(len(scorers))
        for holders in groups:
            inside = [(w, dots) for site, w, dots in holders if site in coalition]
            weight = sum(w for w, _ in inside)
            if weight > 0:
                total += sum(w * dots for w, dots in inside) / weight
        return lr * total

    return value


def round_values(
    updates: Sequence, gradients: Mapping[str, Mapping[str, torch.Tensor]], combine: Callable[[list], Mapping[str, torch.Tensor] | None] | None,
    lr: float, samples: int, rng: random.Random, truncation: float = 0.01,
) -> dict[str, tuple[float, float, int]]:
    """Each site's ``(value, standard error, scorers)`` in one round, from its update and the other sites' validation gradients.

    ``updates`` are the round's :class:`~fedmeta.fl.aggregation.SiteUpdate`
    (clipped here to their median norm), ``gradients`` each scoring site's
    validation gradient by parameter key, ``combine`` the run's rule (returning
    None when a coalition cannot be combined: it is worth nothing), or None
    for the example-weighted mean, computed from dot products (:func:`_mean_game`).
    A site with no other scorer is valued 0; ``scorers`` counts the others (its error's degrees of freedom are one fewer).
    """
    bound = float(np.median([update_norm(u.update) for u in updates])) if updates else 0.0
    bounded = [type(u)(u.site, clipped(u.update, bound), u.examples) for u in updates]
    scorers = sorted(gradients)
    players = [u.site for u in bounded]
    by_site = {u.site: u for u in bounded}

    def combined_value(coalition: frozenset[str]) -> np.ndarray:
        if not coalition or not scorers:
            return np.zeros(len(scorers))
        step = combine([by_site[p] for p in players if p in coalition])
        if not step:
            return np.zeros(len(scorers))
        return np.array([lr * sum(float((gradients[j][k].double() * t.double()).sum()) for k, t in step.items() if k in gradients[j]) for j in scorers])

    value = combined_value if combine is not None else _mean_game(bounded, gradients, scorers, lr)
    if len(players) <= EXACT_MAX:
        per_scorer, sampling = exact_shapley(players, value), {p: np.zeros(len(scorers)) for p in players}
    else:
        per_scorer, sampling = permutation_shapley(players, value, samples, rng, truncation)
    out = {}
    for p in players:
        others = [i for i, j in enumerate(scorers) if j != p]
        if not others:
            out[p] = (0.0, 0.0, 0)
            continue
        values = np.asarray(per_scorer[p], float)[others]
        spread = 1.2533 * float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        out[p] = (float(np.median(values)), math.hypot(spread, float(np.median(np.asarray(sampling[p], float)[others]))), len(others))
    return out


def attribute(strategy, server_round: int, accepted: Sequence) -> dict[str, tuple[float, float, int]]:
    """Each site's Shapley value in a round the strategy (:class:`~fedmeta.fl.strategy.MetaStrategy`) aggregated, scored by the other sites' validation gradients.

    ``accepted`` pairs each good reply with its update. A gradient with keys or
    shapes the model does not have, or non-finite entries, is not used (its
    site scores nobody) and the site is named.
    """
    shapes = {k: tuple(v.shape) for k, v in strategy.current.items()}
    gradients = {}
    for reply, update in accepted:
        if GRADIENT not in reply.content.array_records:
            continue
        gradient = reply.content[GRADIENT].to_torch_state_dict()
        if not gradient or any(shapes.get(k) != tuple(g.shape) or not torch.isfinite(g).all() for k, g in gradient.items()):
            log.warning("round %d: site %s sent a misshapen or non-finite validation gradient; it scores no site this round", server_round, update.site)
            continue
        gradients[update.site] = gradient
    config = strategy.config
    c = config.contributions
    rng = random.Random(f"fedmeta-contributions/{config.seed}/{server_round}")
    # The plain mean has a closed form over coalitions; a robust rule is run on each coalition.
    combine = None if config.aggregation.rule == "mean" else (lambda us: strategy.combined(us)[0])
    return round_values([u for _, u in accepted], gradients, combine, config.server.lr, c.samples, rng, c.truncation)


def interval_half_width(variance: float, spread: float) -> float:
    """Half the 95% interval of a sum of rounds' values: Student's t at the Welch-Satterthwaite degrees of freedom
    ``variance^2 / spread`` (``spread``: the sum of ``se^4 / df`` over the rounds), times the summed error.

    >>> round(interval_half_width(1.0, 1.0), 3)  # one round whose error has 1 degree of freedom (two other scorers)
    12.706
    >>> round(interval_half_width(1.0, 0.0), 3)  # errors taken as normal
    1.96
    """
    if variance <= 0:
        return 0.0
    if spread <= 0:
        return 1.959964 * math.sqrt(variance)
    from scipy.stats import t  # the server's only: a site's app process stays light

    return float(t.ppf(0.975, variance * variance / spread)) * math.sqrt(variance)


class Ledger:
    """Each site's contributions summed over the rounds, kept per round so a resumed run drops what its checkpoint did not keep.

    ``rounds`` holds ``{"round": r, "values": {site: [value, se, scorers]}, "seconds": {site: s}, "rows": {site: {task: n}}}``
    (a report written before ``scorers`` was recorded has ``[value, se]``: its errors are taken as normal).
    """

    def __init__(self, method: str = FIRST_ORDER, rounds: list[dict] | None = None):
        self.method = method
        self.rounds = rounds or []

    @classmethod
    def load(cls, run_dir: str | Path, after_round: int, method: str = FIRST_ORDER) -> "Ledger":
        """The ledger of ``run_dir``'s report up to ``after_round`` (a fresh one if there is none)."""
        path = Path(run_dir) / REPORT
        if not path.exists():
            return cls(method)
        try:
            data = json.loads(path.read_text())
            kept = [r for r in data["by_round"] if int(r["round"]) <= after_round]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a contributions report this run can continue ({e})") from None
        return cls(method, kept)

    def add(self, round_: int, values: Mapping[str, tuple], seconds: Mapping[str, float], rows: Mapping[str, Mapping[str, int]]) -> None:
        """``values``: each site's ``(value, se, scorers)`` (:func:`round_values`); ``(value, se)`` when its error is taken as normal."""
        self.rounds.append({
            "round": round_, "values": {s: [round(v[0], 8), round(v[1], 8), *v[2:3]] for s, v in sorted(values.items())},
            "seconds": {s: round(float(t), 3) for s, t in sorted(seconds.items())}, "rows": {s: dict(r) for s, r in sorted(rows.items())},
        })

    def report(self, failures: Mapping[str, int] | None = None) -> dict:
        """``{"method", "unit", "sites": {site: {contribution, ci, rounds, rows, seconds, failures}}, "by_round"}``."""
        totals: dict[str, dict] = {}
        for record in self.rounds:
            for site, (value, se, *scorers) in record["values"].items():
                t = totals.setdefault(site, {"contribution": 0.0, "variance": 0.0, "spread": 0.0, "unknown": False, "rounds": 0, "seconds": 0.0, "rows": {}})
                t["contribution"] += value
                t["variance"] += se * se
                df = scorers[0] - 1 if scorers else math.inf
                if scorers and scorers[0] == 1:
                    t["unknown"] = True  # one scorer, or a self-report: no spread to estimate the error from
                elif se > 0:
                    t["spread"] += se**4 / df  # Welch-Satterthwaite's denominator
                t["rounds"] += 1
                t["seconds"] += record.get("seconds", {}).get(site, 0.0)
                t["rows"] = record.get("rows", {}).get(site, t["rows"])
        sites = {}
        for site, t in sorted(totals.items()):
            c = t["contribution"]
            ci = None if t["unknown"] else [round(c - (half := interval_half_width(t["variance"], t["spread"])), 6), round(c + half, 6)]
            sites[site] = {"contribution": round(c, 6), "ci": ci, "rounds": t["rounds"],
                           "rows": t["rows"], "seconds": round(t["seconds"], 3), "failures": int((failures or {}).get(site, 0))}
        return {"method": self.method, "unit": "validation loss decrease, summed over rounds", "sites": sites, "by_round": self.rounds}

    def save(self, run_dir: str | Path, failures: Mapping[str, int] | None = None) -> dict:
        report = self.report(failures)
        atomic_write_text(Path(run_dir) / REPORT, json.dumps(report, indent=1) + "\n")
        return report


def record_round(ledger: Ledger, run_dir: str | Path, round_: int, values: Mapping[str, tuple[float, float]], rows: Sequence[Mapping], failures: Mapping[str, int]) -> dict:
    """Add a round's values to the ledger, with each site's rows per task and seconds from its training row, and write the report."""
    seconds, examples = {}, {}
    for row in rows:
        if row.get("phase") == "train" and row.get("round") == round_ and row.get("site") in values:
            seconds[row["site"]] = float(row.get("seconds", 0.0))
            examples[row["site"]] = {k.removeprefix("examples."): int(v) for k, v in row.items() if k.startswith("examples.")}
    ledger.add(round_, values, seconds, examples)
    return ledger.save(run_dir, failures)


def validation_gradient(config, site, received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of the site's loss on its held-out rows at the model it received (tasks weighted by their rows).

    Keys are ``params.<name>``, as in the flat state the site received; empty
    when the site has no held-out labelled rows (it then scores nobody).
    """
    model = build_model(config, site)
    params = unflatten_state(dict(received))["params"]
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    parts, total = [], 0
    for task in site.scored_tasks:
        x, y = site.split(task, train=False)
        if not len(y):
            continue
        loss = make_loss(model, task)(leaves, torch.from_numpy(x), torch.from_numpy(y), torch.ones(len(y)))
        parts.append((loss, len(y)))
        total += len(y)
    if not parts:
        return {}
    loss = sum(part * (n / total) for part, n in parts)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {f"params.{k}": g.detach() for k, g in zip(leaves, grads) if g is not None}


def self_score(gradient: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], lr: float) -> float:
    """A site's first-order gain from its own update on its own held-out rows (the SecAgg+ fallback): ``lr * g . u``."""
    return lr * sum(float((g.double() * update[k].double()).sum()) for k, g in gradient.items() if k in update)
