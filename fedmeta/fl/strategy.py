"""The server strategy: per-site messages, per-head averaging, a server optimizer.

:class:`MetaStrategy` is a Flower ``Strategy``. Each round it waits (bounded)
for enough sites, samples them, and sends each the body plus the heads of
the tasks it has (all heads until the site's first reply tells its tasks).
Replies carry an update the server treats as a gradient; the strategy
averages it with :func:`~fedmeta.fl.aggregation.weighted_mean` and applies
the server optimizer. Failed replies are dropped; a round with fewer than
``min_sites`` good replies aggregates nothing.

Between decoding and the optimizer step sit the protections, each a small
piece of its own module: compressed uploads are decoded
(:mod:`~fedmeta.fl.compression`), updates of the wrong keys or shapes are
refused, and the combination is the weighted mean, a robust rule
(:mod:`~fedmeta.fl.robust`) or, under differential privacy, the clipped
equal-weight mean with Gaussian noise (:mod:`~fedmeta.fl.privacy`). With
SecAgg+ (:meth:`MetaStrategy.train_secure`) the strategy only ever holds the
sums of the updates and of their weights (:mod:`~fedmeta.fl.secagg`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmeta.fl.aggregation import FlatState, SiteUpdate, group_updates, head_task, select_for_tasks, weighted_mean
from fedmeta.fl.compression import BROADCAST_LAYOUT, dense_bytes, encode_broadcast, keys_digest, make_codec
from fedmeta.fl import contributions
from fedmeta.fl import exchange as wire
from fedmeta.fl.config import RunConfig
from fedmeta.fl.exchange import TooFewSitesError, short_reason, wait_for_nodes
from fedmeta.fl.mapping_status import MAX_COLUMNS, STATUS as MAPPING_STATUS, StatusError, validated as validated_mapping_status
from fedmeta.fl.normalization import STATISTICS, SUMS, combine_site_sums, to_text
from fedmeta.fl.privacy import PrivacyAccount, clip_update, noisy_mean, secure_normal
from fedmeta.fl.regions import REGION, declared_region
from fedmeta.fl.robust import robust_mean
from fedmeta.fl.secagg import SecureRound, run_secure_round, weighted_sums

log = logging.getLogger("flwr.fedmeta")  # a child of Flower's logger: shown in `flwr run --stream`


#: Metrics a training reply carries about the model it received (evaluated before training).
EVALUATION_PREFIX = "evaluation."


def site_examples(metrics: Mapping) -> dict[str, int]:
    """``{task: examples}`` from a reply's ``examples.<task>`` metrics."""
    return {k.split(".", 1)[1]: int(v) for k, v in metrics.items() if k.startswith("examples.")}


def round_loss(site_metrics: Sequence[Mapping]) -> float:
    """The round's loss: the sites' losses weighted by their labelled examples over all tasks."""
    examples = [sum(site_examples(m).values()) for m in site_metrics]
    return sum(float(m["loss"]) * n for m, n in zip(site_metrics, examples)) / max(sum(examples), 1)


class MetaStrategy(Strategy):
    """Federated meta-learning: FedAvg-style rounds with a server optimizer and per-task heads.

    Parameters
    ----------
    config : RunConfig
        The run's configuration; it is also sent to sites in every message.
    optimizer : ServerSGD or ServerAdam
        Applied to the weighted mean update with the server learning rate.
    rng : random.Random
        Site sampling (over sorted site names); its state is checkpointed. Under
        DP it is secret (:func:`fedmeta.fl.sampling.site_sampler`).
    account : PrivacyAccount or None
        Under DP noise, each training sample is checked against its budget.
    """

    def __init__(self, config: RunConfig, optimizer, rng: random.Random, account: PrivacyAccount | None = None):
        self.config = config
        self.optimizer = optimizer
        self.rng = rng
        self.account = account
        self.last_sample: tuple[int, int] | None = None  # (sampled, population) of the last training round
        self.last_sampled_sites: list[str] = []  # who that sample named (the privacy account charges them)
        self.connected: list[int] = []  # the nodes connected at the last sample
        self.asked: list[str] = []  # the sites the last exchange was sent to
        self.silent_nodes: dict[int, float] = {}  # nodes that missed a roll call -> when to ask them again
        self.sent_keys: dict[int, list[str]] = {}  # the keys each node was last sent, in order
        self.node_tasks: dict[int, list[str]] = {}
        self.node_sites: dict[int, str] = {}
        self.site_sums: dict[str, str] = {}  # each site's roll-call sums for the federation's normalization
        self.site_regions: dict[str, str] = {}  # the region each site declared at its roll call (fedmeta.fl.regions)
        self.only_sites: frozenset[str] | None = None  # when set, rounds sample from these sites only (a region's)
        # Each site's roll-call mapping status (fedmeta.fl.mapping_status), None when malformed or not sent.
        self.mapping_status: dict[str, dict | None] = {}
        self.mapping_limit = MAX_COLUMNS  # the most columns a status may count: the run sets its schema's
        self.on_roll_call = None  # called with the sites that answered a roll call (the run prints their mapping table)
        # {feature: (mean, std)} once settled before the first sample (None until then; {} if the schema states all).
        self.statistics: dict[str, tuple[float, float]] | None = None
        self.current: FlatState = {}
        self.site_rows: list[dict] = []
        self.failures: list[str] = []
        # When set, training messages also ask sites to evaluate the model they receive.
        self.evaluate_received = False
        self.evaluation_rows: list[dict] = []
        self.broadcast_bytes = self.broadcast_dense_bytes = 0  # of the last round's messages, as Flower counts them
        c = config.compression
        self.codec = make_codec(c.upload, c.topk_ratio, c.error_feedback)
        self.refused_groups: list[str] = []  # groups a robust rule could not combine in the last round
        self.round_contributions: dict[str, tuple[float, float]] | None = None  # the last aggregated round's (value, se) per site

    def summary(self) -> None:
        c = self.config
        log.info(
            "MetaStrategy: algorithm=%s server=%s(lr=%s) min_sites=%d aggregation=%s dp=%s compression=%s broadcast=%s",
            c.algorithm.name, c.server.optimizer, c.server.lr, c.server.min_sites, c.aggregation.rule,
            f"clip {c.privacy.clip_norm}, noise {c.privacy.noise_multiplier}" if c.privacy.enabled else "off", c.compression.upload, c.compression.broadcast,
        )

    # --- messages -------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, phase: str = "train") -> list[int]:
        """Sample sites by name (node ids are random at every start), so the same seed trains the same sites.

        A training sample is checked against the privacy budget with the
        population and sample size it really has.
        """
        s = self.config.server
        by_site = self.population(grid)
        size = min(len(by_site), max(s.min_sites, math.ceil(fraction * len(by_site))))
        if phase == "train":
            self.last_sample = (size, len(by_site))
            if self.account is not None:
                self.account.check_budget(size, len(by_site))
        chosen = self.rng.sample(sorted(by_site), size)
        self.asked = sorted(chosen)
        if phase == "train":
            self.last_sampled_sites = sorted(chosen)
        return sorted(by_site[site] for site in chosen)

    def population(self, grid: Grid) -> dict[str, int]:
        """``{site: node}`` of the connected sites that answered a roll call (one node per site).

        Connected nodes not yet known answer a roll call first (their site name
        and tasks); the federation's normalization is settled at the first call.
        """
        s = self.config.server
        # Before the first sample, wait (bounded) for the whole federation: sampling from the first few sites to
        # connect would make the population, and so the sample and its privacy account, depend on start-up timing.
        wanted = None if self.node_sites else self.config.federation.n_sites
        nodes = wait_for_nodes(grid, s.min_sites, s.sampling_timeout, wanted=wanted)
        self.connected = list(nodes)
        now = time.monotonic()
        self.roll_call(grid, [n for n in nodes if n not in self.node_sites and self.silent_nodes.get(n, -math.inf) <= now])
        by_site: dict[str, int] = {}
        for node in sorted(n for n in nodes if n in self.node_sites):
            site = self.node_sites[node]
            if site in by_site:
                log.warning("site %s is connected as two nodes (%s and %s); sampling node %s", site, by_site[site], node, by_site[site])
                continue
            by_site[site] = node
        if self.only_sites is not None:
            by_site = {site: node for site, node in by_site.items() if site in self.only_sites}
        if len(by_site) < s.min_sites:
            raise TooFewSitesError(
                f"only {len(by_site)} of {len(nodes)} connected site(s) answered the roll call; the run needs at least {s.min_sites} (server.min_sites)"
            )
        if self.statistics is None:
            # Fixed from the sites present at the first sample: a site joining later is encoded the same way.
            self.statistics = combine_site_sums({site: self.site_sums[site] for site in by_site if site in self.site_sums})
        return by_site

    def roll_call(self, grid: Grid, nodes: list[int]) -> None:
        """Ask ``nodes`` for their site name, tasks, normalization sums and mapping status (no rows, no model): a small query exchange.

        A mapping status that cannot be real is logged in one line naming the site and kept as None.
        """
        if not nodes:
            return
        config = ConfigRecord({"run-config": self.config.model_dump_json(), "round": 0, "phase": "roll-call"})
        messages = [Message(content=RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        replies = wire.exchange(grid, {"roll-call": messages}, self.config.server.round_timeout)["roll-call"]
        answered: list[str] = []
        for reply in replies:
            node = wire.node_of(reply)
            if reply.has_error():
                log.warning("roll call: node %s failed: %s", node, short_reason(reply.error.reason))
                continue
            self.node_sites[node] = str(reply.content["site"]["name"])
            self.node_tasks[node] = sorted(site_examples(reply.content["metrics"]))
            if SUMS in reply.content["site"]:
                self.site_sums[self.node_sites[node]] = str(reply.content["site"][SUMS])
            site = self.node_sites[node]
            self.mapping_status[site] = self._mapping_status(site, reply.content["site"].get(MAPPING_STATUS))
            region = declared_region(site, reply.content["site"].get(REGION))
            if region is not None:
                self.site_regions[site] = region
            answered.append(site)
        silent = set(nodes) - {wire.node_of(r) for r in replies}
        if silent:
            # A SuperNode killed without notice stays listed for a while: do not wait for it again every round.
            timeout = self.config.server.round_timeout
            retry_at = time.monotonic() + 10 * timeout
            self.silent_nodes.update({n: retry_at for n in silent})
            log.warning("roll call: %d node(s) did not answer within %.0f s (server.round_timeout); not asked again for %.0f s", len(silent), timeout, 10 * timeout)
        if answered and self.on_roll_call is not None:
            self.on_roll_call(answered)

    def _mapping_status(self, site: str, text) -> dict | None:
        """``site``'s roll-call mapping status if it can be real; None when it sent none, or a malformed one (one log line)."""
        if text is None:
            return None
        try:
            return validated_mapping_status(text, self.mapping_limit)
        except StatusError as e:
            log.warning("roll call: site %s sent a malformed mapping status, ignored: %s", site, e)
            return None

    def _messages(self, server_round: int, arrays: ArrayRecord, grid: Grid, phase: str, fraction: float) -> list[Message]:
        self.current = arrays.to_torch_state_dict()
        self.broadcast_bytes = self.broadcast_dense_bytes = 0
        return self.messages_for(self._sample(grid, fraction, phase), server_round, phase)

    def messages_for(self, nodes: list[int], server_round: int, phase: str, extra: dict | None = None) -> list[Message]:
        """One message per node with the current model (each node's tasks only) and the run's settings; ``extra`` joins the config."""
        config = ConfigRecord({"run-config": self.config.model_dump_json(), "round": server_round, "phase": phase, **(extra or {})})
        if phase == "train" and self.evaluate_received:
            config["evaluate-received"] = True
        messages = []
        if self.statistics:
            config[STATISTICS] = to_text(self.statistics)
        for node in nodes:
            flat = self.current if node not in self.node_tasks else select_for_tasks(self.current, self.node_tasks[node])
            arrays, node_config = self._broadcast(flat, config)
            content = RecordDict({"arrays": arrays, "config": node_config})
            self.sent_keys[node] = sorted(flat)
            # What travels: the arrays, plus the int8 layout (keys and shapes) when the broadcast is packed.
            self.broadcast_bytes += arrays.count_bytes() + (ConfigRecord({BROADCAST_LAYOUT: node_config[BROADCAST_LAYOUT]}).count_bytes() if BROADCAST_LAYOUT in node_config else 0)
            self.broadcast_dense_bytes += dense_bytes(flat)
            messages.append(Message(content=content, message_type=phase, dst_node_id=node))
        return messages

    def _broadcast(self, flat: FlatState, config: ConfigRecord) -> tuple[ArrayRecord, ConfigRecord]:
        """What a site receives: the model as it is, or int8-packed with its layout in the config."""
        if self.config.compression.broadcast == "none":
            return ArrayRecord(flat), config
        arrays, layout = encode_broadcast(flat)
        return ArrayRecord(arrays), ConfigRecord({**config, BROADCAST_LAYOUT: layout})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, arrays, grid, "train", self.config.server.fraction_train)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, arrays, grid, "evaluate", self.config.server.fraction_evaluate)

    # --- replies --------------------------------------------------------------
    def _good_replies(self, server_round: int, replies: Iterable[Message], phase: str) -> list[Message]:
        good = []
        self.site_rows, self.failures, self.evaluation_rows = [], [], []
        for reply in replies:
            if reply.has_error():
                # Not logged here: the round loop reports each failure once, by site name (RoundObserver.sites_failed).
                self.failures.append(f"node {wire.node_of(reply)}: {short_reason(reply.error.reason)}")
                continue
            self._record(server_round, wire.node_of(reply), str(reply.content["site"]["name"]), dict(reply.content["metrics"]), phase)
            good.append(reply)
        return good

    def _record(self, server_round: int, node: int, site: str, metrics: dict, phase: str) -> None:
        """Remember a site's tasks and keep its metric rows (and its score of the model it received)."""
        received = {k.removeprefix(EVALUATION_PREFIX): v for k, v in metrics.items() if k.startswith(EVALUATION_PREFIX)}
        metrics = {k: v for k, v in metrics.items() if not k.startswith(EVALUATION_PREFIX)}
        self.node_sites[node] = site
        self.node_tasks[node] = sorted(site_examples(metrics))
        self.site_rows.append({"round": server_round, "phase": phase, "site": site, **metrics})
        if received:
            self.evaluation_rows.append({"round": server_round - 1, "phase": "evaluate", "site": site, **received})

    def train_secure(self, server_round: int, state: FlatState, grid: Grid, context) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A SecAgg+ training round: sample sites, run the protocol, step from the unmasked sums."""
        self.current = dict(state)
        nodes = self._sample(grid, self.config.server.fraction_train)
        secure = run_secure_round(grid, context, self.config, server_round, self.current, nodes, self.evaluate_received, self.statistics)
        return self.aggregate_secure(server_round, secure)

    def aggregate_secure(self, server_round: int, secure: SecureRound) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server step from a SecAgg+ round: only the sums of the updates and of their weights are known."""
        self.site_rows, self.evaluation_rows, self.round_contributions = [], [], None
        dropped = len(secure.nodes) - len(secure.replies)
        self.failures = [f"{dropped} site(s) dropped out of the SecAgg+ protocol"] if dropped else []
        for node, metrics in secure.replies:
            site = str(metrics.pop("site-name"))
            self._record(server_round, node, site, metrics, "train")
        s = self.config.server
        if secure.aggregate is None or len(secure.replies) < s.min_sites:
            log.warning("round %d: SecAgg+ ended with %d site(s), fewer than server.min_sites = %d; nothing aggregated", server_round, len(secure.replies), s.min_sites)
            return None, None
        sums, weights = weighted_sums(secure.aggregate, self.current)
        privacy = self.config.privacy
        # Weights are multiples of 1 (DP) or of 1 / W: anything below half of that is quantization noise on a zero.
        floor = 0.5 if privacy.enabled else 0.5 / self.config.secure.max_examples
        std = privacy.noise_multiplier * privacy.clip_norm if privacy.enabled else 0.0
        mean = {}
        for key, total in sums.items():
            if weights[key] < floor:
                continue
            noise = secure_normal(tuple(total.shape), std) if std else 0.0
            mean[key] = ((total + noise) / weights[key]).float()
        if self.config.contributions.enabled:
            # Self-reported (fedmeta.fl.contributions): the server cannot see one site's update to score it.
            self.round_contributions = {row["site"]: (float(row[contributions.SELF_SCORE]), 0.0, 1) for row in self.site_rows if contributions.SELF_SCORE in row}
        metrics = {"loss": round_loss([m for _, m in secure.replies]), "sites": len(secure.replies), "failed_sites": dropped,
                   "broadcast_bytes": secure.broadcast_bytes, "broadcast_dense_bytes": secure.broadcast_dense_bytes}
        return ArrayRecord(self.optimizer.step(self.current, mean)), MetricRecord(metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.round_contributions = None
        good = self._good_replies(server_round, replies, "train")
        if len(good) < self.config.server.min_sites:
            log.warning(
                "round %d: %d good repl%s, fewer than server.min_sites = %d; nothing aggregated",
                server_round, len(good), "y" if len(good) == 1 else "ies", self.config.server.min_sites,
            )
            return None, None
        accepted = self._site_updates(server_round, good)
        if len(accepted) < self.config.server.min_sites:
            log.warning("round %d: %d well-formed update(s), fewer than server.min_sites = %d; nothing aggregated", server_round, len(accepted), self.config.server.min_sites)
            return None, None
        updates = [u for _, u in accepted]
        combined = self.combine(updates)
        if combined is None:
            log.warning("round %d: the body could not be combined (%s); nothing aggregated", server_round, "; ".join(self.refused_groups))
            return None, None
        new_state = self.optimizer.step(self.current, combined)
        if self.config.contributions.enabled:
            self.round_contributions = contributions.attribute(self, server_round, accepted)
        metrics = MetricRecord(
            {
                "loss": round_loss([r.content["metrics"] for r, _ in accepted]),
                "sites": len(accepted),
                "failed_sites": len(self.failures),
                "upload_bytes": sum(reply_bytes(r) for r in good),
                "upload_dense_bytes": sum(dense_bytes(u.update) for u in updates),
                "broadcast_bytes": self.broadcast_bytes,
                "broadcast_dense_bytes": self.broadcast_dense_bytes,
            }
        )
        return ArrayRecord(new_state), metrics

    def _site_updates(self, server_round: int, replies: list[Message]) -> list[tuple[Message, SiteUpdate]]:
        """Each reply with its decoded update; a reply whose keys or shapes do not fit the model it was sent is dropped."""
        shapes = {k: tuple(v.shape) for k, v in self.current.items()}
        updates = []
        for r in replies:
            site = str(r.content["site"]["name"])
            arrays = r.content["arrays"].to_torch_state_dict()
            try:
                update = self.codec.decode(arrays, self._packed_keys(r), shapes) if self.codec else arrays
                wrong = [k for k, t in update.items() if shapes.get(k) != tuple(t.shape) or not torch.isfinite(t).all()]
                if wrong:
                    raise ValueError(f"unexpected, misshapen or non-finite entries {wrong[:3]}")
            except (ValueError, RuntimeError) as e:
                self.failures.append(f"site {site}: its update was dropped: {e}")
                continue
            updates.append((r, SiteUpdate(site, update, site_examples(r.content["metrics"]))))
        return updates

    def _packed_keys(self, reply: Message) -> list[str]:
        """The key order of a packed update: the keys this node was sent, if its fingerprint says so."""
        keys = self.sent_keys.get(wire.node_of(reply), [])
        if str(reply.content["site"].get("keys-digest", "")) != keys_digest(keys):
            raise ValueError("its packed update is not laid out as the parameters it was sent")
        return keys

    def combine(self, updates: list[SiteUpdate]) -> FlatState | None:
        """The update the server optimizer applies, or None when the body cannot be combined.

        Under DP every update is clipped first (sites clip their own; clipping
        again binds sites that did not). Then, over the round's groups: the
        robust rule if one is set, else the equal-weight mean with Gaussian
        noise under DP (no noise when ``noise_multiplier`` is 0), else the
        example-weighted mean.
        """
        combined, self.refused_groups = self.combined(updates)
        for reason in self.refused_groups:
            log.warning("%s rule: not updated this round: %s", self.config.aggregation.rule, reason)
        return combined

    def combined(self, updates: list[SiteUpdate]) -> tuple[FlatState | None, list[str]]:
        """:meth:`combine` without its log lines: the update (None when the body cannot be combined) and the groups a robust rule refused."""
        privacy, agg = self.config.privacy, self.config.aggregation
        if privacy.enabled:
            updates = [SiteUpdate(u.site, clip_update(u.update, privacy.clip_norm)[0], u.examples) for u in updates]
        groups = group_updates(updates)
        if agg.rule != "mean":
            combined, refused = robust_mean(groups, agg.rule, agg.trim_fraction, agg.byzantine_sites, agg.multikrum_select)
            if any(g.task is None for g in groups) and not any(head_task(k) is None for k in combined):
                return None, refused
            return combined, refused
        if privacy.enabled:
            return noisy_mean(groups, privacy.noise_multiplier * privacy.clip_norm), []
        return weighted_mean(groups), []

    def evaluate_replies(self, server_round: int, replies: Iterable[Message]) -> list[dict]:
        """Per-site metric rows of the good evaluation replies."""
        self._good_replies(server_round, replies, "evaluate")
        return self.site_rows

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows = self.evaluate_replies(server_round, replies)
        return MetricRecord(mean_site_metrics(rows)) if rows else None


def reply_bytes(reply: Message) -> int:
    """What a training reply carries, as Flower counts it: the update's arrays, the site record (a compressed
    update's key list travels there), the metrics and, with contributions on, the validation gradient."""
    return sum(reply.content[name].count_bytes() for name in ("arrays", "site", "metrics", contributions.GRADIENT) if name in reply.content)


def mean_site_metrics(rows: list[dict]) -> dict[str, float]:
    """Example-weighted mean of each ``<task>.<global|personalized>.<metric>`` over sites."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[1] not in ("global", "personalized"):
                continue
            w = float(row.get(f"examples.{parts[0]}", 1))
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    return {k: sums[k] / weights[k] for k in sorted(sums)}


def describe(metrics: dict[str, float]) -> str:
    return json.dumps({k: round(v, 4) for k, v in metrics.items()})
