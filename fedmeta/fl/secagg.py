"""Secure aggregation with Flower's SecAgg+: the server learns only the sum of the sites' updates.

Flower 1.41 offers SecAgg+ (Bell et al. 2020) only through its legacy API:
``secaggplus_mod`` on the ClientApp and ``SecAggPlusWorkflow`` on the
server, which speak the legacy FitIns/FitRes message layout and one scalar
weight per site. This module bridges them to our rounds:

- Every site sends one vector of the same layout: for each key of the global
  model (sorted), ``w_k / W * update_k`` (zeros for heads of tasks it does not
  have), then the vector of its ``w_k / W``. The masked sum therefore holds,
  per key, the weighted sum of updates and the sum of weights, and the server
  divides one by the other: the same per-head weighted mean as without
  SecAgg+, up to quantization. ``W`` is ``secure.max_examples``, a public
  bound on a site's example count; under DP every present key weighs 1.
- :func:`secure_aggregation_mod` runs ``secaggplus_mod`` for SecAgg+
  messages only, so one ClientApp serves both kinds of round.
- :class:`SecureRound` is the legacy strategy the workflow drives: it hands
  each sampled node its FitIns and keeps the aggregate it is given.

What the server still sees in the clear: each site's name, example counts,
loss and evaluation metrics (scalars), as without SecAgg+. A site that fails
mid-protocol is a dropout; its masks are reconstructed from the others'
shares while at least ``reconstruction_threshold`` of the sampled sites remain.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow

from fedmeta.fl.aggregation import FlatState, head_task
from fedmeta.fl.compression import BROADCAST_ARRAYS, BROADCAST_LAYOUT, decode_broadcast, dense_bytes, encode_broadcast
from fedmeta.fl.config import RunConfig
from fedmeta.fl.normalization import STATISTICS, Statistics, to_text

log = logging.getLogger("flwr.fedmeta")

#: Where the legacy layout puts the global model in a SecAgg+ training message.
PARAMETERS = "fitins.parameters"


def secure_aggregation_mod(message: Message, context: Context, call_next) -> Message:
    """``secaggplus_mod`` for SecAgg+ training messages; every other message passes through."""
    if message.metadata.message_type == "train" and RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def key_weights(config: RunConfig, keys: list[str], examples: Mapping[str, int]) -> np.ndarray:
    """Per key, this site's weight divided by the public bound W (0 for heads of tasks it lacks)."""
    bound = float(config.secure.max_examples)
    weights = []
    for key in keys:
        task = head_task(key)
        count = sum(examples.values()) if task is None else examples.get(task, 0)
        if config.privacy.enabled:
            weights.append(1.0 if count > 0 else 0.0)  # DP: equal site weights
        else:
            weights.append(min(float(count), bound) / bound)
    return np.asarray(weights, dtype=np.float32)


def secure_vector(config: RunConfig, keys: list[str], update: Mapping[str, torch.Tensor], examples: Mapping[str, int]) -> list[np.ndarray]:
    """The arrays a site masks: weighted update per key (at least 1-d), then the weights."""
    weights = key_weights(config, keys, examples)
    # 1-d at least: Flower 1.41's unmasking drops its offset and rescale for 0-d arrays.
    arrays = [np.atleast_1d(w * update[k].detach().numpy().astype(np.float32)) for k, w in zip(keys, weights)]
    return arrays + [weights]


def secure_reply(message: Message, arrays: list[np.ndarray], metrics: Mapping[str, float | int | str]) -> Message:
    """A training reply in the legacy FitRes layout that ``secaggplus_mod`` masks."""
    content = RecordDict(
        {
            "fitres.parameters": ArrayRecord(arrays),
            # Equal to the workflow's max_weight, so its own scalar weight is exactly 1: ours travel in the vector.
            "fitres.num_examples": MetricRecord({"num_examples": 1}),
            "fitres.metrics": ConfigRecord(dict(metrics)),
            "fitres.status": ConfigRecord({"code": 0, "message": "ok"}),
        }
    )
    return Message(content, reply_to=message)


def received_state(message: Message) -> tuple[RunConfig, int, bool, dict[str, torch.Tensor], list[str]]:
    """Run config, round, whether to evaluate, the global model and its key order, from a SecAgg+ message."""
    cfg = message.content["fitins.config"]
    keys = json.loads(str(cfg["keys"]))
    arrays = [torch.from_numpy(np.array(a.numpy())) for a in message.content[PARAMETERS].values()]
    if BROADCAST_LAYOUT in cfg:
        state = decode_broadcast(dict(zip(BROADCAST_ARRAYS, arrays)), str(cfg[BROADCAST_LAYOUT]))
    else:
        state = dict(zip(keys, arrays))
    return RunConfig.model_validate_json(str(cfg["run-config"])), int(cfg["round"]), bool(cfg.get("evaluate-received", False)), state, keys


class SecureRound(LegacyStrategy):
    """The legacy strategy ``SecAggPlusWorkflow`` drives: our FitIns out, the unmasked aggregate in."""

    def __init__(self, grid, run_id: int):
        self.grid, self.run_id = grid, run_id
        self.nodes: list[int] = []
        self.fit_ins: FitIns | None = None
        self.aggregate: list[np.ndarray] | None = None
        self.replies: list[tuple[int, dict]] = []
        self.failures = 0
        self.broadcast_bytes = self.broadcast_dense_bytes = 0

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, self.run_id), self.fit_ins) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        # Every result carries the same unmasked aggregate: the mean of the vectors (their weights are all 1).
        self.aggregate = [a * len(results) for a in parameters_to_ndarrays(results[0][1].parameters)]
        self.replies = [(proxy.node_id, dict(res.metrics)) for proxy, res in results]
        self.failures = len(failures)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_fit_ins(
    config: RunConfig, server_round: int, state: Mapping[str, torch.Tensor], evaluate_received: bool, statistics: Statistics | None = None
) -> tuple[FitIns, int]:
    """What each site of a SecAgg+ round receives (the model, int8-packed if so configured, and the federation's
    normalization statistics), and its bytes."""
    keys = sorted(state)
    fit_config = {"run-config": config.model_dump_json(), "round": server_round, "keys": json.dumps(keys), "evaluate-received": evaluate_received}
    if statistics:
        fit_config[STATISTICS] = to_text(statistics)
    if config.compression.broadcast == "int8":
        packed, fit_config[BROADCAST_LAYOUT] = encode_broadcast(state)
        arrays = [packed[name].numpy() for name in BROADCAST_ARRAYS]
    else:
        arrays = [state[k].numpy() for k in keys]
    return FitIns(ndarrays_to_parameters(arrays), fit_config), ArrayRecord(arrays).count_bytes()


def run_secure_round(
    grid, context: Context, config: RunConfig, server_round: int, state: Mapping[str, torch.Tensor], nodes: list[int], evaluate_received: bool,
    statistics: Statistics | None = None,
) -> SecureRound:
    """One SecAgg+ training round over ``nodes``; ``.aggregate`` stays None if the protocol halted."""
    secure = SecureRound(grid, context.run_id)
    secure.nodes = nodes
    secure.fit_ins, sent = secure_fit_ins(config, server_round, state, evaluate_received, statistics)
    secure.broadcast_bytes = len(nodes) * sent
    secure.broadcast_dense_bytes = len(nodes) * dense_bytes(state)
    s = config.secure
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=s.reconstruction_threshold,
        max_weight=1.0,
        clipping_range=s.clipping_range,
        quantization_range=s.quantization_range,
        timeout=config.server.round_timeout,
    )
    legacy = LegacyContext(Context(context.run_id, context.node_id, context.node_config, RecordDict(), context.run_config), strategy=secure)
    legacy.state["config"] = ConfigRecord({"current_round": server_round})
    legacy.state["parameters"] = ArrayRecord()
    workflow(grid, legacy)
    return secure


def weighted_sums(aggregate: list[np.ndarray], state: Mapping[str, torch.Tensor]) -> tuple[FlatState, dict[str, float]]:
    """Split the unmasked aggregate into per-key weighted sums and per-key weight sums (in units of W)."""
    keys = sorted(state)
    weights = aggregate[-1]
    sums = {k: torch.from_numpy(np.asarray(a, dtype=np.float64).reshape(tuple(state[k].shape))) for k, a in zip(keys, aggregate[:-1])}
    return sums, {k: float(w) for k, w in zip(keys, weights)}
