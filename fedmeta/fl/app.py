"""The Flower app: a ClientApp for sites and a ServerApp that runs resumable rounds.

Sites get the run configuration inside every message (``context.run_config``
is empty in simulation), and find their own data:

- in deployment, from the SuperNode's ``--node-config``:
  ``data-path="site.csv" schema-path="schema.json"`` (optional ``site-name``,
  ``test-path`` for a test file scored instead of held-out rows, and
  ``mapping-path`` for the site's ``mapping.json``, with ``accept-review=true``
  to train on one whose columns are still flagged for review);
- in simulation, from ``partition-id``: site i regenerates partition i of the
  seeded synthetic federation, or reads the i-th site (sorted by name) that
  :func:`fedmeta.data.federation.discover_sites` finds in a CSV federation.

Numeric features the schema leaves without ``mean``/``std`` are normalized
with the statistics each message carries, which the server combined from
the sites' roll-call sums (:mod:`fedmeta.fl.normalization`). The roll call
also carries each site's mapping status, which the server checks and shows
as one table before the site's first round (:mod:`fedmeta.fl.mapping_status`).

The server loop is ours rather than ``Strategy.start`` because Flower has no
checkpoint/resume and keeps optimizer state on the strategy object: each
round here ends with an atomic checkpoint of everything needed to continue.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmeta.data import SiteData, hospital_federation, hospital_schema, load_site
from fedmeta.data.mapping import Mapping, require_reviewed
from fedmeta.data.synthetic import FedProxSites, fedprox_schema
from fedmeta.data.federation import federation_schema
from fedmeta.data.schema import Schema
from fedmeta.fl import contributions, delivery
from fedmeta.fl import exchange as wire
from fedmeta.fl import normalization
from fedmeta.fl.aggregation import flatten_state, make_server_optimizer
from fedmeta.fl.asynchronous import AsyncRounds
from fedmeta.fl.compression import BROADCAST_LAYOUT, decode_broadcast, keys_digest, make_codec
from fedmeta.fl.config import SYNTHETIC_SITES, FederationConfig, RunConfig
from fedmeta.fl.mapping_status import STATUS as MAPPING_STATUS
from fedmeta.fl.mapping_status import column_limit, site_status
from fedmeta.fl.mapping_status import table as mapping_table
from fedmeta.fl.privacy import PrivacyAccount
from fedmeta.fl.regional_rounds import train_regional_bases
from fedmeta.fl.regions import REGION
from fedmeta.fl.secagg import PARAMETERS as SECURE_PARAMETERS
from fedmeta.fl.secagg import received_state, secure_aggregation_mod, secure_reply, secure_vector
from fedmeta.fl.roster import Roster, without_text
from fedmeta.fl.rounds import evaluation_rows, site_failures, sync_rounds
from fedmeta.fl.run_dir import Checkpoint, RunDir
from fedmeta.fl.sampling import restore_sampler, site_sampler
from fedmeta.fl.sites import csv_site, csv_site_files
from fedmeta.fl.site_training import build_algorithm, build_model, evaluate_site, local_update, outgoing_update
from fedmeta.fl.stragglers import wait_as_configured
from fedmeta.fl.strategy import EVALUATION_PREFIX, MetaStrategy, site_examples
from fedmeta.threads import limit_threads, site_threads

log = logging.getLogger("flwr.fedmeta")  # a child of Flower's logger: shown in `flwr run --stream`

# --------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _synthetic_federation(federation_json: str) -> Sequence[SiteData]:
    """The seeded federation's sites by partition. FedProx sites are drawn one at a time (a worker holds the sites it
    serves, not 10,000); hospital sites all at once, since their normalization is computed over all of them."""
    fed = FederationConfig.model_validate_json(federation_json)
    if fed.kind == "hospitals":
        return tuple(hospital_federation(fed.n_sites, fed.seed, fed.test_fraction))
    return FedProxSites(fed.alpha, fed.beta, fed.n_sites, fed.seed, fed.test_fraction)


def _synthetic_schema(kind: str) -> Schema:
    """The generator's own schema: which statistics it states and which it leaves to the federation."""
    return hospital_schema() if kind == "hospitals" else fedprox_schema()


@lru_cache(maxsize=8)
def _site_from_files(
    data_path: str, schema_path: str, name: str | None, test_fraction: float, seed: int, test_path: str | None = None, statistics: str | None = None,
    mapping: tuple[str, bool] | None = None,
) -> SiteData:
    """``mapping``: the node config's ``mapping-path`` and ``accept-review`` (a mapping with columns under review is refused without it)."""
    site_mapping = None
    if mapping is not None:
        site_mapping = Mapping.load(mapping[0])
        require_reviewed(site_mapping, mapping[0], accept_review=mapping[1])
    schema = normalization.applied(Schema.load(schema_path), statistics)
    return load_site(data_path, schema, name=name, test_fraction=test_fraction, seed=seed, test_path=test_path, mapping=site_mapping)


def site_for(context: Context, config: RunConfig, statistics: str | None = None) -> SiteData:
    """The site's own data, found from its node config, normalized with the federation's ``statistics`` (JSON) if given.

    Also sets the threads this worker may use.
    """
    node = context.node_config
    limit_threads(site_threads(config.simulation.cpus_per_site if "partition-id" in node else None))
    fed = config.federation
    if "data-path" in node:
        if "schema-path" not in node:
            raise ValueError("node config has data-path but no schema-path; pass both with --node-config")
        test_path = str(node["test-path"]) if "test-path" in node else None
        mapping = (str(node["mapping-path"]), bool(node.get("accept-review", False))) if node.get("mapping-path") else None
        return _site_from_files(str(node["data-path"]), str(node["schema-path"]), node.get("site-name"), fed.test_fraction, fed.seed, test_path, statistics or None, mapping)
    partition = int(node["partition-id"])
    if fed.kind == "csv":
        return csv_site(config, partition, statistics or None)
    return _synthetic_federation(fed.model_dump_json())[partition]


def normalized_site(context: Context, config: RunConfig, statistics: str | None) -> SiteData:
    """:func:`site_for` for a message that carries a model: every numeric feature must then be normalized."""
    site = site_for(context, config, statistics)
    if site.schema.unnormalized:
        names = site.schema.unnormalized
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise RuntimeError(
            f"site {site.name}: the schema leaves the mean and std of {shown} to the federation, "
            "but the message carries no statistics for them; refusing to train or score on raw values"
        )
    return site


client_app = ClientApp(mods=[secure_aggregation_mod])


def _reply(message: Message, site: SiteData, arrays: dict | None, metrics: dict) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=message)


def _site_round(
    config: RunConfig, round_: int, received: dict[str, torch.Tensor], evaluate_received: bool, context: Context, statistics: str | None
) -> tuple[SiteData, dict, dict]:
    """A site's work in a training round: score the model it received (if asked), train, release the update."""
    partition = int(context.node_config.get("partition-id", -1))
    if partition in config.simulation.failing_sites:
        raise RuntimeError(f"simulated failure of partition {partition} (simulation.failing_sites)")
    site = normalized_site(context, config, statistics)
    metrics = {}
    if evaluate_received:
        # The previous round's model, scored in this same process: one exchange per evaluated round.
        evaluation = evaluate_site(config, site, received, seed=config.seed + round_ - 1)
        metrics.update({EVALUATION_PREFIX + k: v for k, v in evaluation.items()})
    update, train_metrics = local_update(config, site, received, round_seed=config.seed * 1_000_003 + round_ * 1009 + max(partition, 0))
    wait_as_configured(config, site.name)  # a rehearsed slow site ([stragglers]); nothing by default
    return site, outgoing_update(config, update, partition), {**train_metrics, **metrics}


def received_model(message: Message) -> dict[str, torch.Tensor]:
    """The global model a message carries, unpacked when the broadcast was int8-compressed."""
    arrays = message.content["arrays"].to_torch_state_dict()
    layout = message.content["config"].get(BROADCAST_LAYOUT)
    return decode_broadcast(arrays, str(layout)) if layout else arrays


@client_app.train()
def train(message: Message, context: Context) -> Message:
    if SECURE_PARAMETERS in message.content.array_records:
        return _secure_train(message, context)
    config = RunConfig.model_validate_json(message.content["config"]["run-config"])
    round_ = int(message.content["config"]["round"])
    received = received_model(message)
    settings = message.content["config"]
    site, update, metrics = _site_round(config, round_, received, bool(settings.get("evaluate-received", False)), context, settings.get(normalization.STATISTICS))
    reply = _reply(message, site, compress(config, update, context), metrics)
    if config.contributions.enabled:
        # Scores the other sites' updates at the server (fedmeta.fl.contributions); the rows stay here.
        reply.content[contributions.GRADIENT] = ArrayRecord(contributions.validation_gradient(config, site, received))
    if config.compression.upload != "none":
        # Packed arrays name no keys; the server knows which it sent, and checks this fingerprint of their order.
        reply.content["site"]["keys-digest"] = keys_digest(sorted(update))
    return reply


def _secure_train(message: Message, context: Context) -> Message:
    """A SecAgg+ training round: the update leaves the site masked, inside one fixed-layout vector."""
    config, round_, evaluate_received, received, keys = received_state(message)
    statistics = message.content["fitins.config"].get(normalization.STATISTICS)
    site, update, metrics = _site_round(config, round_, received, evaluate_received, context, statistics)
    if config.contributions.enabled:
        # The server sees only the sum: the site scores its own update (fedmeta.fl.contributions, SecAgg+ fallback).
        metrics[contributions.SELF_SCORE] = contributions.self_score(contributions.validation_gradient(config, site, received), update, config.server.lr)
    return secure_reply(message, secure_vector(config, keys, update, site_examples(metrics)), {**metrics, "site-name": site.name})


#: Where a site keeps what top-k compression has not sent yet (its error-feedback residual).
RESIDUAL_KEY = "compression-residual"


def compress(config: RunConfig, update: dict[str, torch.Tensor], context: Context) -> dict[str, torch.Tensor]:
    """The arrays that carry ``update``; the residual stays in the node's state for the next round."""
    c = config.compression
    codec = make_codec(c.upload, c.topk_ratio, c.error_feedback)
    if codec is None:
        return update
    residual = context.state[RESIDUAL_KEY].to_torch_state_dict() if RESIDUAL_KEY in context.state else {}
    arrays, residual = codec.encode(update, residual)
    if residual:
        context.state[RESIDUAL_KEY] = ArrayRecord(residual)
    return arrays


@client_app.query()
def roll_call(message: Message, context: Context) -> Message:
    """The server asks who this site is: its name, labelled training rows per task, its sums for the
    federation's normalization (:mod:`fedmeta.fl.normalization`) and its mapping's status
    (:mod:`fedmeta.fl.mapping_status`); no rows, no model, no column name."""
    config = RunConfig.model_validate_json(message.content["config"]["run-config"])
    site = site_for(context, config)
    reply = _reply(message, site, None, {f"examples.{t}": site.n_labelled(t, train=True) for t in site.tasks})
    # A synthetic federation's sites are encoded in memory with the statistics the same rule computes from the
    # same rows (:func:`hospital_federation`); they still report the sums, so the base model records them.
    synthetic = config.federation.kind != "csv" and "data-path" not in context.node_config
    features = _synthetic_schema(config.federation.kind).unnormalized if synthetic else None
    reply.content["site"][normalization.SUMS] = normalization.site_sums(site, features)
    reply.content["site"][MAPPING_STATUS] = site_status(_mapping_path(context, config))
    region = _site_region(context, config)
    if region:
        reply.content["site"][REGION] = region
    return reply


def _site_region(context: Context, config: RunConfig) -> str | None:
    """The region this site declares (:mod:`fedmeta.fl.regions`): its node config's ``region``, or its folder's or ``regions.csv``'s in simulation."""
    node = context.node_config
    if "data-path" in node:
        return str(node["region"]) if node.get("region") else None
    if config.federation.kind == "csv":
        return csv_site_files(config, int(node["partition-id"])).region
    return None


def _mapping_path(context: Context, config: RunConfig) -> Path | str | None:
    """The mapping this site's rows were read through (:func:`site_for`): its node config's, its folder's, or none."""
    node = context.node_config
    if "data-path" in node:
        return str(node["mapping-path"]) if node.get("mapping-path") else None
    if config.federation.kind == "csv":
        return csv_site_files(config, int(node["partition-id"])).mapping
    return None


@client_app.query(delivery.ACTION)
def deliver_model(message: Message, context: Context) -> Message:
    """The run's last exchange: store the base model in the site home, and personalize it if asked (:mod:`fedmeta.fl.delivery`)."""
    return delivery.handle(message, context)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    config = RunConfig.model_validate_json(message.content["config"]["run-config"])
    round_ = int(message.content["config"]["round"])
    site = normalized_site(context, config, message.content["config"].get(normalization.STATISTICS))
    received = received_model(message)
    metrics = evaluate_site(config, site, received, seed=config.seed + round_)
    return _reply(message, site, None, metrics)


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


def run_schema(config: RunConfig) -> Schema:
    """The schema the run trains on, as the server knows it: the federation folder's, or the generator's."""
    if config.federation.kind == "csv":
        return federation_schema(config.federation.data_dir)
    return _synthetic_schema(config.federation.kind)


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
        nonlocal config, run_dir
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

