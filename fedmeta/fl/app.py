"""The server's side of the Flower app: a ServerApp that runs resumable rounds (the sites' side: :mod:`fedmeta.fl.site_app`).

The roll call's mapping statuses are checked and shown as one table before
the sites' first round (:mod:`fedmeta.fl.mapping_status`).

The server loop is ours rather than ``Strategy.start`` because Flower has no
checkpoint/resume and keeps optimizer state on the strategy object: each
round here ends with an atomic checkpoint of everything needed to continue.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.data import SiteData
from fedmeta.data.federation import federation_schema
from fedmeta.data.schema import Schema
from fedmeta.fl import contributions, delivery
from fedmeta.fl import exchange as wire
from fedmeta.fl.aggregation import flatten_state, make_server_optimizer
from fedmeta.fl.asynchronous import AsyncRounds
from fedmeta.fl.config import SYNTHETIC_SITES, RunConfig
from fedmeta.fl.mapping_status import column_limit
from fedmeta.fl.mapping_status import table as mapping_table
from fedmeta.fl.privacy import PrivacyAccount
from fedmeta.fl.regional_rounds import train_regional_bases
from fedmeta.fl.roster import Roster, without_text
from fedmeta.fl.rounds import evaluation_rows, site_failures, sync_rounds
from fedmeta.fl.run_dir import Checkpoint, RunDir
from fedmeta.fl.sampling import restore_sampler, site_sampler
from fedmeta.fl.site_app import synthetic_schema
from fedmeta.fl.site_training import build_algorithm, build_model
from fedmeta.fl.strategy import MetaStrategy

log = logging.getLogger("flwr.fedmeta")  # a child of Flower's logger: shown in `flwr run --stream`


def run_schema(config: RunConfig) -> Schema:
    """The schema the run trains on, as the server knows it: the federation folder's, or the generator's."""
    if config.federation.kind == "csv":
        return federation_schema(config.federation.data_dir)
    return synthetic_schema(config.federation.kind)


def initial_state(config: RunConfig) -> dict[str, torch.Tensor]:
    """The round-0 global state, from the run seed (the server never sees site rows)."""
    schema = run_schema(config)
    torch.manual_seed(config.seed)
    dummy = SiteData.from_arrays("init", schema, torch.zeros(4, schema.encoded_dim).numpy(), {})
    return flatten_state(build_algorithm(config).init_state(build_model(config, dummy)))


class RoundObserver:
    """Hooks for progress display; the default logs each failed site once, by name and node (the roster's)."""

    def __init__(self, roster: Roster | None = None):
        self.roster = roster

    def start(self, first_round: int, rounds: int) -> None: ...

    def round_done(self, round_: int, train: dict | None) -> None: ...

    def site_mappings(self, lines: list[str]) -> None:
        """The roll call's mapping table (:func:`fedmeta.fl.mapping_status.table`), a log line per row."""
        log.info("mapping status at the roll call (counts and digests only; no column name or value leaves a site):")
        for line in lines:
            log.info("  %s", line)

    def sites_failed(self, round_: int, failures: list[tuple[str, str]]) -> None:
        for site, reason in failures:
            node = self.roster.sites.get(site, {}).get("node") if self.roster else None
            log.warning("round %d: site %s%s failed: %s", round_, site, f" (node {node})" if node is not None else "", reason)

    def evaluated(self, model_round: int, evaluation: dict) -> None: ...

    def stop(self) -> None: ...

    def finished(self, roster: Roster) -> None:
        """The run's summary for the coordinator: where the base model is, and the sites it lacks."""
        summary = roster.summary
        log.info("fedmeta: base model after round %d written to %s on the coordinator", summary["round"], summary["base_model"])
        without = roster.trained_without()
        if without:
            log.warning("fedmeta: %s", without_text(without, {name: site["node"] for name, site in roster.sites.items()}))
        if summary["not_evaluated"]:
            log.warning(
                "fedmeta: the final evaluation covers %d of %d site(s); not evaluated: %s",
                len(summary["evaluated"]), len(roster.sites), ", ".join(summary["not_evaluated"]),
            )


def run_rounds(grid: Grid, config: RunConfig, run_dir: RunDir, observer: RoundObserver | None = None, context: Context | None = None) -> dict[str, torch.Tensor]:
    """Run (or resume) the rounds of ``config`` in ``run_dir``; returns the final global state.

    The model after round r is evaluated by the sites of round r+1, in the
    same message and process as their training (both start from that model),
    so an evaluated round costs one exchange, not two; the last model is
    evaluated on its own. Rows record the model's round and, as
    ``logged_in_round``, the round that wrote them.
    """
    if config.secure.secagg and context is None:
        raise ValueError("secure.secagg needs the ServerApp's context")
    optimizer = make_server_optimizer(config.server.optimizer, config.server.lr, config.server.momentum, config.server.betas)
    account = privacy_account(config)
    strategy = MetaStrategy(config, optimizer, site_sampler(config), account)
    ckpt = run_dir.load_checkpoint()
    roster = Roster.load(run_dir.path, after_round=ckpt.round if ckpt else 0)
    observer = observer or RoundObserver(roster)
    strategy.mapping_limit = column_limit(run_schema(config))
    # The run's clock starts when the first sites have answered the roll call: a simulation's start-up is not training.
    clock = {"roll_call": time.perf_counter()}

    def on_roll_call(answered: list[str]) -> None:
        if "answered" not in clock:
            clock.update(answered=True, roll_call=time.perf_counter())
        _report_mappings({site: strategy.mapping_status[site] for site in answered}, roster, observer)

    strategy.on_roll_call = on_roll_call
    if ckpt is None:
        state, first = initial_state(config), 1
        torch.manual_seed(config.seed)
    else:
        if ckpt.config_digest != config.digest():
            raise RuntimeError(f"{run_dir.path}: the configuration changed since the checkpoint (hash mismatch); refusing to resume")
        state, first = ckpt.state, ckpt.round + 1
        optimizer.load_state_dict(ckpt.optimizer)
        strategy.rng = restore_sampler(config, ckpt.rng_state)
        strategy.node_tasks = dict(ckpt.node_tasks)
        strategy.statistics = ckpt.statistics
        torch.set_rng_state(ckpt.torch_rng)
        if account is not None and ckpt.privacy:
            account.load_state_dict(ckpt.privacy)
        run_dir.truncate_metrics(ckpt.round)
        log.info("resuming %s after round %d", run_dir.path, ckpt.round)
    strategy.summary()
    observer.start(first, config.rounds)

    def save_step(round_: int, state: dict[str, torch.Tensor], rows: list[dict], summary: dict) -> None:
        """The end of a round (or server step): the privacy figures, metrics, checkpoint and roster on disk."""
        if account is not None:
            summary.update({"epsilon": account.epsilon, "epsilon_known_sample": account.epsilon_known_sample, "delta": account.delta})
            log.info(
                "round %d: privacy spent epsilon = %.3f against the released models, %.3f against a site that knows the sample, at delta = %g",
                round_, account.epsilon, account.epsilon_known_sample, account.delta,
            )
        summary["elapsed"] = time.perf_counter() - clock["roll_call"]
        run_dir.append_metrics(rows + [summary])
        if config.server.keep_every and round_ % config.server.keep_every == 0:
            run_dir.save_round_model(round_, state, summary["elapsed"])
        if ledger is not None and strategy.round_contributions is not None:
            # Before the checkpoint: a run stopped between the two resumes from the checkpoint and drops the extra round.
            contributions.record_round(ledger, run_dir.path, round_, strategy.round_contributions, rows, roster.failure_counts())
        run_dir.save_checkpoint(
            Checkpoint(
                round_, state, optimizer.state_dict(), strategy.rng.getstate(), torch.get_rng_state(), config.digest(), strategy.node_tasks,
                account.state_dict() if account is not None else None, strategy.statistics,
            )
        )
        roster.save()

    method = contributions.SELF_SCORED if config.secure.secagg else contributions.FIRST_ORDER
    ledger = contributions.Ledger.load(run_dir.path, ckpt.round if ckpt else 0, method) if config.contributions.enabled else None
    if config.asynchronous.enabled:
        state, last_round = AsyncRounds(grid, strategy, state, first - 1, save_step, observer, roster).run()
    else:
        state, last_round = sync_rounds(grid, strategy, state, first, save_step, observer, roster, context)
    # The last model is evaluated on its own; its rows count as written after the last round.
    started = time.perf_counter()
    evaluate = list(strategy.configure_evaluate(last_round, ArrayRecord(state), ConfigRecord(), grid))
    replies = wire.exchange(grid, {"evaluate": evaluate}, config.server.round_timeout)
    site_rows = strategy.evaluate_replies(last_round, replies["evaluate"])
    rows, evaluation = evaluation_rows(site_rows, last_round, last_round + 1, time.perf_counter() - started)
    failures = site_failures(strategy)
    if failures:
        observer.sites_failed(last_round, failures)
    run_dir.append_metrics(rows)
    if evaluation is not None:
        observer.evaluated(last_round, evaluation)
    observer.stop()
    if ledger is not None:
        check = contributions.to_check(ledger.report())
        if check:
            log.warning("contributions: sites to check (their whole interval is below zero: their updates raised the others' validation loss): %s", ", ".join(check))
    privacy = account.summary() if account is not None else privacy_note(config)
    run_dir.save_base_model(state, config, last_round, privacy, strategy.statistics)
    regions = train_regional_bases(grid, strategy, state, last_round, run_dir, roster, observer, context, site_rows)
    delivered = delivery.after_run(grid, config, run_dir, strategy.node_sites, last_round, context)  # flwr run only: the sites receive the base model
    evaluated = sorted(r["site"] for r in site_rows)
    without = roster.trained_without()
    roster.save({
        "run_id": context.run_id if context is not None else None, "base_model": str(run_dir.base_model_path.resolve()), "round": last_round, "trained_without": sorted(without),
        "evaluated": evaluated, "not_evaluated": sorted(set(roster.sites) - set(evaluated)),
        "delivered": sorted(r["site"] for r in delivered if r["stored"]), "personalized": sorted(r["site"] for r in delivered if r["personalized"]),
        **({"regions": {name: region.trained for name, region in regions.items()}} if regions else {}),
    })
    if hasattr(observer, "finished"):
        observer.finished(roster)
    return state


def _report_mappings(statuses: dict[str, dict | None], roster: Roster, observer) -> None:
    """Before a site's first round: its mapping status into the roster (``sites.json``) and the table to the coordinator."""
    roster.record_mappings(statuses)
    if hasattr(observer, "site_mappings"):
        observer.site_mappings(mapping_table(statuses))


def privacy_account(config: RunConfig) -> PrivacyAccount | None:
    """The run's (epsilon, delta) account when DP noise is on.

    Each round spends with the sample it really drew from the sites really
    connected (:meth:`MetaStrategy._sample`); ``federation.n_sites`` is only
    the default for projections.
    """
    p = config.privacy
    if not p.accounted:
        return None
    s = config.server
    n = config.federation.n_sites or SYNTHETIC_SITES  # unset only on a deployment's csv federation: the former default
    m = min(n, max(s.min_sites, math.ceil(s.fraction_train * n)))
    return PrivacyAccount(p.noise_multiplier, p.delta, m, n, p.max_epsilon)


def privacy_note(config: RunConfig) -> dict | None:
    """What the base model's manifest says about privacy when no epsilon was accounted."""
    p = config.privacy
    return {"clip_norm": p.clip_norm, "noise_multiplier": 0.0, "epsilon": None, "note": "clipping only: no DP guarantee"} if p.enabled else None


def make_server_app(config: RunConfig | None = None, run_dir: str | Path | None = None, observer: RoundObserver | None = None) -> ServerApp:
    """A ServerApp for ``config``; without arguments it reads ``config-path``/``run-dir`` from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            _main(grid, context)
        except wire.StopRequested as e:
            log.info("fedmeta: %s; the last completed round is checkpointed", e)
            raise
        except Exception as e:
            log.error("fedmeta: %s", e)  # the operator sees this in `flwr run --stream`
            raise

    def _main(grid: Grid, context: Context) -> None:
        if config is None:
            rc = context.run_config
            if "run-dir" not in rc:
                raise ValueError("flwr run needs --run-config 'run-dir=\"...\"' (and config-path for a new run)")
            rd = RunDir(str(rc["run-dir"]))
            with rd.hold(run_id=context.run_id, engine="deployment"):  # one server per run folder
                if rd.config_path.exists():
                    cfg = rd.load_config()
                else:
                    cfg = RunConfig.load(str(rc["config-path"]))
                    rd.create(cfg)
                run_rounds(grid, cfg, rd, observer, context)
        else:
            run_rounds(grid, config, RunDir(run_dir), observer, context)

    return app


server_app = make_server_app()
