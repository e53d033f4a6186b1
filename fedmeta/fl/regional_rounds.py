"""The regional stage of a run: each region's base, the global base meta-trained further on that region's sites only.

After the global rounds (HierFAVG's cloud level, Liu et al. 2020, run
first), every region of :func:`~fedmeta.fl.regions.plan_regions` with enough
connected sites runs ``regions.rounds`` synchronous rounds of its own: the
same meta-learner, local training, robust rule and privacy mechanism as the
global rounds, sampling only the region's sites, with a server optimizer of
its own started afresh from the global base. A region's updates never meet
another region's: each region is a separate sequence of aggregations.

Privacy: a regional base is the global base (already released) plus the
region's rounds. Its (epsilon, delta) composes the global account with the
region's releases, each a sample of the region's sites only, so it is larger
than the global base's for the same noise: fewer sites, less amplification.
That figure is also what a site of the region has spent over every model the
run releases (other regions' bases use its rows only through the global base).

Validation bases (``[regions] validation_bases = true``, off by default; refused
with DP, whose account would not charge them): a site's choice (:func:`fedmeta.personalize.choose_personalization`)
scores the regional candidates on validation folds cut from the site's own
training rows, which the regional base was meta-trained on, with the site
weighing a quarter or a sixth of it rather than a twenty-fourth of the global
base: regional candidates look better there than on held-out rows. So each
region of at most :data:`LEAVE_ONE_OUT_UP_TO` sites also trains, for each of
its sites, the same rounds without that site
(``regions/<region>/without/<site>/base_model.pt``, :func:`~fedmeta.fl.regions.validation_base_path`):
the base the site's choice scores the regional level with, as if the site were
new to its region. On ``benchmarks/hierarchy.py``'s selection seed 0 this took
the seen sites' cost with regions dealt at random from -1.27 points to a gain
of 0.06 (``docs/benchmarks.md``, "Regions"). Such a base goes to that one site
only, is not registered, and costs the region's rounds once more per site; its
privacy account is the region's without the site.

Resuming: a region whose base is on disk for the same global round is kept;
a region cut short starts again from the global base (its rounds are not
checkpointed).
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid

from fedmeta.fl import exchange as wire
from fedmeta.fl.aggregation import make_server_optimizer
from fedmeta.fl.config import RunConfig
from fedmeta.fl.exchange import TooFewSitesError
from fedmeta.fl.privacy import PrivacyAccount
from fedmeta.fl.regions import WITHOUT, Region, load_regions, plan_regions, region_dir, save_regions
from fedmeta.fl.roster import Roster
from fedmeta.fl.rounds import evaluation_rows, sync_rounds
from fedmeta.fl.run_dir import RunDir
from fedmeta.fl.strategy import MetaStrategy, mean_site_metrics
from fedmeta.manifest import sha256_file

log = logging.getLogger("flwr.fedmeta")

#: Regions with more sites train no validation bases: there a site weighs little in its region's base, and the cost grows with the sites.
LEAVE_ONE_OUT_UP_TO = 12
#: The fewest sites a validation base is trained on (a region of three trains its sites' on two each).
LEAVE_ONE_OUT_MIN_SITES = 2


def regional_strategy(strategy: MetaStrategy, sites: list[str], last_round: int) -> MetaStrategy:
    """A copy of the run's strategy that samples ``sites`` only, with a fresh server optimizer and its own privacy account.

    Its rounds are numbered after the global ones (``last_round + 1`` on), so
    a site's episodes differ from its global rounds'. It shares the roll call
    (names, tasks, normalization) and the secret sampler with the run.
    """
    config = strategy.config
    s, p = config.server, config.privacy
    min_sites = min(s.min_sites, len(sites))
    regional = copy.copy(strategy)
    regional.config = config.model_copy(update={"rounds": last_round + config.regions.rounds, "server": s.model_copy(update={"min_sites": min_sites})})
    regional.optimizer = make_server_optimizer(s.optimizer, s.lr, s.momentum, s.betas)
    regional.only_sites = frozenset(sites)
    regional.site_rows, regional.evaluation_rows, regional.failures = [], [], []
    if strategy.account is not None:
        n = len(sites)
        account = PrivacyAccount(p.noise_multiplier, p.delta, min(n, max(min_sites, math.ceil(s.fraction_train * n))), n, p.max_epsilon)
        account.load_state_dict(strategy.account.state_dict())  # the global rounds' releases: the regional base builds on them
        regional.account = account
    return regional


def train_regional_bases(
    grid: Grid, strategy: MetaStrategy, state: dict[str, torch.Tensor], last_round: int, run_dir: RunDir, roster: Roster, observer, context: Context | None,
    global_evaluation: list[dict],
) -> dict[str, Region]:
    """Train every region's base (see the module docstring); writes ``regions/<region>/`` and ``regions.json``, returns the plan.

    ``global_evaluation`` is the final evaluation's per-site rows of the global
    base: each region's line compares its base with the global one on the same sites.
    """
    config = strategy.config
    if not config.regions.rounds:
        declared: dict[str, list[str]] = {}
        for site, name in sorted(strategy.site_regions.items()):
            declared.setdefault(name, []).append(site)
        for name, sites in sorted(declared.items()):
            # Told like a region that kept the global base, so the run's output shows it, not only its log.
            off = Region(sites, note=f"declared by {len(sites)} site(s); no regional base: [regions] rounds = 0 (off by default; docs/training.md#regions)")
            log.info("region %s: %s", name, off.note)
            if hasattr(observer, "region_done"):
                observer.region_done(name, off)
        return {}
    try:
        connected = set(strategy.population(grid)) if strategy.site_regions else set()
    except TooFewSitesError as e:
        log.warning("regions: %s; every region keeps the global base", e)
        connected = set()
    plan = plan_regions(strategy.site_regions, connected, config.regions.min_sites)
    before = load_regions(run_dir.path) or {}
    global_sha = sha256_file(run_dir.base_model_path)
    for name, region in plan.items():
        if region.note:
            log.info("region %s: %s", name, region.note)
            if hasattr(observer, "region_done"):
                observer.region_done(name, region)
            continue
        folder = RunDir(region_dir(run_dir.path, name))
        kept = before.get("regions", {}).get(name, {})
        if before.get("global_round") == last_round and kept.get("trained") and kept.get("sites") == region.sites and folder.base_model_path.exists():
            region.trained, region.rounds, region.privacy = True, kept.get("rounds", 0), kept.get("privacy")
            log.info("region %s: its base from before the resume is kept", name)
            continue
        _train_region(grid, strategy, state, last_round, name, region, folder, roster, observer, context, global_sha, global_evaluation)
        save_regions(run_dir.path, last_round, {n: r for n, r in plan.items() if r.trained or n == name}, complete=False)
    save_regions(run_dir.path, last_round, plan)
    return plan


def _train_region(grid, strategy, state, last_round, name, region, folder: RunDir, roster, observer, context, global_sha: str, global_evaluation: list[dict]) -> None:
    config = strategy.config
    regional = regional_strategy(strategy, region.sites, last_round)
    log.info("region %s: %d round(s) on its %d site(s): %s", name, config.regions.rounds, len(region.sites), ", ".join(region.sites))
    if folder.metrics_path.exists():
        folder.metrics_path.unlink()  # a region cut short starts again
    folder.path.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    aggregated = []

    def save_step(round_: int, step_state, rows: list[dict], summary: dict) -> None:
        if not summary["skipped"]:
            aggregated.append(round_)
        summary.update({"region": name, "elapsed": time.perf_counter() - clock})
        if regional.account is not None:
            summary.update({"epsilon": regional.account.epsilon, "delta": regional.account.delta})
        folder.append_metrics(rows + [summary])

    due = lambda _config, model_round: model_round == last_round  # noqa: E731 (the global base, scored by the region's first round)
    progress = _RegionObserver(observer, name, last_round, config.regions.rounds)
    regional_state, done = sync_rounds(grid, regional, state, last_round + 1, save_step, progress, roster, context, due=due)
    region.rounds = len(aggregated)
    if not aggregated:
        region.note = "kept the global base: no regional round was aggregated"
        log.warning("region %s: %s", name, region.note)
    else:
        _finish(grid, regional, regional_state, done, name, region, folder, config, global_sha, global_evaluation)
        _train_without_each_site(grid, strategy, state, last_round, name, region, folder, roster, context)
    if hasattr(observer, "region_done"):
        observer.region_done(name, region)


def _finish(
    grid, regional: MetaStrategy, regional_state, done: int, name: str, region: Region, folder: RunDir, config: RunConfig, global_sha: str, global_evaluation: list[dict]
) -> None:
    """The region's base scored by its sites and written with its lineage, privacy account and the run's configuration."""
    last_round = regional.config.rounds - config.regions.rounds
    after = _evaluate(grid, regional, regional_state, done)
    folder.append_metrics(after)
    privacy = regional.account.summary() if regional.account is not None else None
    region.trained, region.privacy = True, privacy
    lineage = {"level": "region", "region": name, "sites": region.sites, "global_round": last_round, "global_sha256": global_sha, "regional_rounds": region.rounds}
    folder.save_base_model(regional_state, config, done, privacy, regional.statistics, lineage)
    region.extra = _comparison(region.sites, global_evaluation, [r for r in after if r.get("site") != "*"])
    if region.extra:
        log.info("region %s: on its sites, the global base scores %s; the regional base %s", name, region.extra["global_base"], region.extra["regional_base"])


def _train_without_each_site(grid, strategy, state, last_round, name, region, folder: RunDir, roster, context) -> None:
    """Each site's validation base: the region's rounds again on its other sites (module docstring)."""
    config = strategy.config
    if not config.regions.validation_bases or not LEAVE_ONE_OUT_MIN_SITES < len(region.sites) <= LEAVE_ONE_OUT_UP_TO:
        return
    for site in region.sites:
        others = [s for s in region.sites if s != site]
        without = regional_strategy(strategy, others, last_round)
        log.info("region %s without %s: %d round(s) on %d site(s), to validate %s's regional candidates", name, site, config.regions.rounds, len(others), site)
        never = lambda _config, _model_round: False  # noqa: E731 (scored by nobody: only the left-out site's choice uses it)
        state_without, done = sync_rounds(grid, without, state, last_round + 1, lambda *_: None, _Unobserved(), roster, context, due=never)
        out = RunDir(folder.path / WITHOUT / site)
        out.path.mkdir(parents=True, exist_ok=True)
        lineage = {"level": "region", "region": name, "sites": others, "without": site, "global_round": last_round, "regional_rounds": config.regions.rounds}
        privacy = without.account.summary() if without.account is not None else None
        out.save_base_model(state_without, config, done, privacy, without.statistics, lineage)


class _Unobserved:
    """The run's observer while validation bases train: their rounds are not the run's progress."""

    def sites_failed(self, round_: int, failures: list[tuple[str, str]]) -> None:
        log.warning("round %d (a validation base): %s", round_, "; ".join(f"{s}: {why}" for s, why in failures))

    def evaluated(self, model_round: int, evaluation: dict) -> None:
        pass

    def round_done(self, round_: int, train: dict | None) -> None:
        pass


class _RegionObserver:
    """The run's observer during a region's rounds: failed sites as in any round, and each round as the region's (``region_round``)."""

    def __init__(self, observer, region: str, last_round: int, rounds: int):
        self.observer, self.region, self.last_round, self.rounds = observer, region, last_round, rounds

    def sites_failed(self, round_: int, failures: list[tuple[str, str]]) -> None:
        self.observer.sites_failed(round_, failures)

    def evaluated(self, model_round: int, evaluation: dict) -> None:
        """The global base on the region's sites: reported beside the regional base's score at the region's end."""

    def round_done(self, round_: int, train: dict | None) -> None:
        if hasattr(self.observer, "region_round"):
            self.observer.region_round(self.region, round_ - self.last_round, self.rounds, train)


def _evaluate(grid: Grid, regional: MetaStrategy, state: dict[str, torch.Tensor], model_round: int) -> list[dict]:
    """The regional base scored by the region's sites as the run scores the global one (personalized from a few shots)."""
    started = time.perf_counter()
    messages = list(regional.configure_evaluate(model_round, ArrayRecord(state), ConfigRecord(), grid))
    replies = wire.exchange(grid, {"evaluate": messages}, regional.config.server.round_timeout)
    rows, _ = evaluation_rows(regional.evaluate_replies(model_round, replies["evaluate"]), model_round, model_round, time.perf_counter() - started)
    return rows


def _comparison(sites: list[str], global_rows: list[dict], regional_rows: list[dict]) -> dict:
    """Both bases' example-weighted scores on the region's sites that scored both (empty when none did)."""
    scored = {r["site"] for r in global_rows} & {r["site"] for r in regional_rows} & set(sites)
    if not scored:
        return {}
    pick = lambda rows: mean_site_metrics([r for r in rows if r["site"] in scored])  # noqa: E731
    keep = lambda m: {k: round(v, 4) for k, v in m.items() if ".personalized." in k}  # noqa: E731 (as a site would use either)
    return {"evaluated_sites": sorted(scored), "global_base": keep(pick(global_rows)), "regional_base": keep(pick(regional_rows))}
