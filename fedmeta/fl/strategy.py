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
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmeta.fl.aggregation import FlatState, SiteUpdate, select_for_tasks, weighted_mean
from fedmeta.fl.compression import BROADCAST_LAYOUT, dense_bytes, encode_broadcast, make_codec
from fedmeta.fl.config import RunConfig
from fedmeta.fl.privacy import clip_update, noisy_mean
from fedmeta.fl.robust import robust_mean
from fedmeta.fl.secagg import SecureRound, run_secure_round, weighted_sums

log = logging.getLogger("flwr.fedmeta")  # a child of Flower's logger: shown in `flwr run --stream`


class TooFewSitesError(RuntimeError):
    """Fewer sites connected than the run needs, after waiting ``sampling_timeout``."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Connected node ids once at least ``minimum`` are there; raise after ``timeout`` seconds.

    Flower's own sampling waits forever, and the strategy timeout does not cover it.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise TooFewSitesError(
                f"only {len(nodes)} site(s) connected after waiting {timeout:.0f} s; the run needs at least {minimum} "
                "(server.min_sites). Start more SuperNodes or lower server.min_sites."
            )
        time.sleep(poll)


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
        Site sampling; its state is checkpointed.
    """

    def __init__(self, config: RunConfig, optimizer, rng: random.Random):
        self.config = config
        self.optimizer = optimizer
        self.rng = rng
        self.node_tasks: dict[int, list[str]] = {}
        self.node_sites: dict[int, str] = {}
        self.current: FlatState = {}
        self.site_rows: list[dict] = []
        self.failures: list[str] = []
        # When set, training messages also ask sites to evaluate the model they receive.
        self.evaluate_received = False
        self.evaluation_rows: list[dict] = []
        self.broadcast_bytes = self.broadcast_dense_bytes = 0  # of the last round's messages, as Flower counts them
        c = config.compression
        self.codec = make_codec(c.upload, c.topk_ratio, c.error_feedback)
        # DP noise must be unpredictable: a seeded generator would let anyone who knows the seed remove it.
        self.noise = torch.Generator().manual_seed(secrets.randbits(63))

    def sample_size(self, nodes: int) -> int:
        """How many of ``nodes`` connected sites a training round samples."""
        s = self.config.server
        return min(nodes, max(s.min_sites, math.ceil(s.fraction_train * nodes)))

    def summary(self) -> None:
        c = self.config
        log.info(
            "MetaStrategy: algorithm=%s server=%s(lr=%s) min_sites=%d aggregation=%s dp=%s compression=%s broadcast=%s",
            c.algorithm.name, c.server.optimizer, c.server.lr, c.server.min_sites, c.aggregation.rule,
            f"clip {c.privacy.clip_norm}, noise {c.privacy.noise_multiplier}" if c.privacy.enabled else "off", c.compression.upload, c.compression.broadcast,
        )

    # --- messages -------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float) -> list[int]:
        s = self.config.server
        nodes = wait_for_nodes(grid, s.min_sites, s.sampling_timeout)
        size = self.sample_size(len(nodes)) if fraction == s.fraction_train else min(len(nodes), max(s.min_sites, math.ceil(fraction * len(nodes))))
        return sorted(self.rng.sample(nodes, size))

    def _messages(self, server_round: int, arrays: ArrayRecord, grid: Grid, phase: str, fraction: float) -> list[Message]:
        self.current = arrays.to_torch_state_dict()
        config = ConfigRecord({"run-config": self.config.model_dump_json(), "round": server_round, "phase": phase})
        if phase == "train" and self.evaluate_received:
            config["evaluate-received"] = True
        messages = []
        self.broadcast_bytes = self.broadcast_dense_bytes = 0
        for node in self._sample(grid, fraction):
            flat = self.current if node not in self.node_tasks else select_for_tasks(self.current, self.node_tasks[node])
            arrays, node_config = self._broadcast(flat, config)
            content = RecordDict({"arrays": arrays, "config": node_config})
            self.broadcast_bytes += arrays.count_bytes()
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
                err = reply.error
                self.failures.append(f"node {reply.metadata.src_node_id}: {err.reason}")
                log.warning("round %d %s: site on node %s failed: %s", server_round, phase, reply.metadata.src_node_id, err.reason)
                continue
            self._record(server_round, reply.metadata.src_node_id, str(reply.content["site"]["name"]), dict(reply.content["metrics"]), phase)
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
        secure = run_secure_round(grid, context, self.config, server_round, self.current, nodes, self.evaluate_received)
        return self.aggregate_secure(server_round, secure)

    def aggregate_secure(self, server_round: int, secure: SecureRound) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server step from a SecAgg+ round: only the sums of the updates and of their weights are known."""
        self.site_rows, self.evaluation_rows = [], []
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
            noise = torch.randn(total.shape, generator=self.noise, dtype=torch.float64) * std if std else 0.0
            mean[key] = ((total + noise) / weights[key]).float()
        metrics = {"loss": round_loss([m for _, m in secure.replies]), "sites": len(secure.replies), "failed_sites": dropped,
                   "broadcast_bytes": secure.broadcast_bytes, "broadcast_dense_bytes": secure.broadcast_dense_bytes}
        return ArrayRecord(self.optimizer.step(self.current, mean)), MetricRecord(metrics)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
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
        new_state = self.optimizer.step(self.current, self.combine(updates))
        metrics = MetricRecord(
            {
                "loss": round_loss([r.content["metrics"] for r, _ in accepted]),
                "sites": len(accepted),
                "failed_sites": len(self.failures),
                "upload_bytes": sum(r.content["arrays"].count_bytes() for r in good),
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
                update = self.codec.decode(arrays, list(r.content["site"].get("keys", [])), shapes) if self.codec else arrays
                wrong = [k for k, t in update.items() if shapes.get(k) != tuple(t.shape) or not torch.isfinite(t).all()]
                if wrong:
                    raise ValueError(f"unexpected, misshapen or non-finite entries {wrong[:3]}")
            except (ValueError, RuntimeError) as e:
                self.failures.append(f"site {site}: {e}")
                log.warning("round %d: update of site %s dropped: %s", server_round, site, e)
                continue
            updates.append((r, SiteUpdate(site, update, site_examples(r.content["metrics"]))))
        return updates

    def combine(self, updates: list[SiteUpdate]) -> FlatState:
        """The update the server optimizer applies: DP noisy mean, robust rule or weighted mean."""
        privacy, agg = self.config.privacy, self.config.aggregation
        if privacy.enabled:
            # Sites clip their own updates; clipping again here costs nothing and binds sites that did not.
            clipped = [clip_update(u.update, privacy.clip_norm)[0] for u in updates]
            return noisy_mean(clipped, privacy.noise_multiplier * privacy.clip_norm, self.noise)
        if agg.rule != "mean":
            return robust_mean(updates, agg.rule, agg.trim_fraction, agg.byzantine_sites, agg.multikrum_select)
        return weighted_mean(updates)

    def evaluate_replies(self, server_round: int, replies: Iterable[Message]) -> list[dict]:
        """Per-site metric rows of the good evaluation replies."""
        self._good_replies(server_round, replies, "evaluate")
        return self.site_rows

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows = self.evaluate_replies(server_round, replies)
        return MetricRecord(mean_site_metrics(rows)) if rows else None


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
