"""Synchronous rounds: sample sites, wait for their updates, aggregate, and record the round.

:func:`sync_rounds` is the loop of a run's global rounds (and of each
region's rounds, :mod:`fedmeta.fl.regions`); the asynchronous loop is
:mod:`fedmeta.fl.asynchronous`. Both report failed sites by name
(:func:`site_failures`) and evaluate the model as the next round's sites
receive it (:func:`evaluation_due`).
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid

from fedmeta.fl import exchange as wire
from fedmeta.fl.config import RunConfig
from fedmeta.fl.privacy import PrivacyBudgetExceeded
from fedmeta.fl.roster import Roster
from fedmeta.fl.strategy import MetaStrategy, describe, mean_site_metrics

log = logging.getLogger("flwr.fedmeta")


def site_failures(strategy: MetaStrategy) -> list[tuple[str, str]]:
    """The last exchange's failed sites as ``(site, reason)``: the site's name when the roll call gave it, and the reason's last line.

    Flower wraps a ClientApp's exception in pages of Ray traceback; the site's
    own message is what follows the last ``Message:``.
    """
    failures = []
    for failure in strategy.failures:
        who, found, reason = failure.partition(": ")
        if not found:  # not about one site (e.g. SecAgg+ dropouts)
            failures.append(("(several)", failure))
            continue
        site = who.removeprefix("site ")
        if who.startswith("node ") and who[5:].isdigit():
            site = strategy.node_sites.get(int(who[5:]), who)
        failures.append((site, wire.short_reason(reason)))
    return failures


def round_line(round_: int, rounds: int, summary: dict, asked: int, roster: Roster) -> str:
    """The coordinator's line for a round: loss, sites replied of sampled, seconds, and failed sites by name."""
    done = f"loss {summary['loss']:.4f}" if "loss" in summary else "skipped (too few sites replied)"
    missed = [f"{name} ({site['missed'][str(round_)]})" for name, site in sorted(roster.sites.items()) if str(round_) in site["missed"]]
    return f"round {round_}/{rounds}: {done}, {int(summary.get('sites', 0))}/{asked} site(s) replied, {summary['seconds']:.1f} s" + (
        f"; without {', '.join(missed)}" if missed else ""
    )


def evaluation_due(config: RunConfig, model_round: int) -> bool:
    return model_round >= 1 and (model_round % config.evaluation.every == 0 or model_round == config.rounds)


def evaluation_rows(site_rows: list[dict], model_round: int, logged_in: int, seconds: float) -> tuple[list[dict], dict | None]:
    """Per-site evaluation rows plus their example-weighted mean, tagged with the round that logged them."""
    rows = [{**row, "logged_in_round": logged_in} for row in site_rows]
    if not site_rows:
        log.warning("round %d: no site returned evaluation metrics", model_round)
        return rows, None
    evaluation = mean_site_metrics(site_rows)
    rows.append({"round": model_round, "phase": "evaluate", "site": "*", "seconds": seconds, "logged_in_round": logged_in, **evaluation})
    log.info("round %d evaluation: %s", model_round, describe(evaluation))
    return rows, evaluation


def sync_rounds(
    grid: Grid, strategy: MetaStrategy, state: dict[str, torch.Tensor], first: int, save_step, observer, roster: Roster, context: Context | None, due=evaluation_due
):
    """Synchronous rounds ``first``..``config.rounds``: each samples sites, waits for them, and aggregates; returns the state and the last round.

    ``due(config, model_round)`` says whether a round's sites also score the model they receive (the one after ``model_round``).
    """
    config, account, s = strategy.config, strategy.account, strategy.config.server
    last_round = first - 1
    for round_ in range(first, config.rounds + 1):
        if wire.STOP.is_set():
            raise wire.StopRequested(f"stop requested before round {round_}")
        started = time.perf_counter()
        rows: list[dict] = []
        prior = round_ - 1
        strategy.evaluate_received = due(config, prior)
        train_metrics = None
        budget_reached = None
        for attempt in range(s.retries + 1):
            try:
                new_arrays, train_metrics = train_round(strategy, round_, state, grid, context)
            except PrivacyBudgetExceeded as e:
                budget_reached = e  # checked on the round's real sample, before anything is sent
                break
            failures = site_failures(strategy)
            roster.record(round_, strategy.node_sites, strategy.connected, strategy.asked, [r["site"] for r in strategy.site_rows], failures)
            if failures:
                observer.sites_failed(round_, failures)
            rows += strategy.site_rows
            for row in strategy.site_rows:
                if row.get("restarts"):
                    log.warning("round %d: site %s restarted its local training %d time(s) with a smaller step (non-finite loss or update)", round_, row["site"], int(row["restarts"]))
            if strategy.evaluate_received:
                eval_rows, evaluation = evaluation_rows(strategy.evaluation_rows, prior, round_, time.perf_counter() - started)
                rows += eval_rows
                if evaluation is not None:
                    observer.evaluated(prior, evaluation)
                strategy.evaluate_received = False  # a retry trains again but need not re-evaluate
            if new_arrays is not None:
                state = new_arrays.to_torch_state_dict()
                break
            if attempt < s.retries:
                log.warning("round %d: retrying (%d of %d)", round_, attempt + 1, s.retries)
        else:
            log.warning("round %d skipped: fewer than %d sites replied after %d attempt(s); the model is unchanged", round_, s.min_sites, s.retries + 1)
        if budget_reached is not None:
            log.warning("training stops before round %d: %s", round_, budget_reached)
            break
        summary = {"round": round_, "phase": "train", "site": "*", "seconds": time.perf_counter() - started, "skipped": train_metrics is None}
        if train_metrics is not None:
            summary.update(dict(train_metrics))
            if account is not None:
                account.spend(*strategy.last_sample, sites=strategy.last_sampled_sites)
        save_step(round_, state, rows, summary)
        last_round = round_
        log.info("%s", round_line(round_, config.rounds, summary, len(strategy.asked), roster))
        observer.round_done(round_, dict(train_metrics) if train_metrics is not None else None)
        if hasattr(observer, "model_after"):
            observer.model_after(round_, state)
    return state, last_round


def train_round(strategy: MetaStrategy, round_: int, state: dict[str, torch.Tensor], grid: Grid, context: Context | None):
    """One attempt at a training round: the new global arrays (None if nothing was aggregated) and its metrics."""
    if strategy.config.secure.secagg:
        return strategy.train_secure(round_, state, grid, context)
    train = list(strategy.configure_train(round_, ArrayRecord(state), ConfigRecord(), grid))
    replies = wire.exchange(grid, {"train": train}, strategy.config.server.round_timeout)
    return strategy.aggregate_train(round_, replies["train"])
