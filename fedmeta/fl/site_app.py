"""The sites' side of the Flower app: a ClientApp that finds a site's own data and trains, scores and reports on it.

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
also carries each site's mapping status (:mod:`fedmeta.fl.mapping_status`)
and region (:mod:`fedmeta.fl.regions`). The server's side is :mod:`fedmeta.fl.app`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmeta.data import SiteData, hospital_federation, hospital_schema, load_site
from fedmeta.data.mapping import Mapping, require_reviewed
from fedmeta.data.synthetic import FedProxSites, fedprox_schema
from fedmeta.data.schema import Schema
from fedmeta.fl import contributions, delivery, normalization
from fedmeta.fl.compression import BROADCAST_LAYOUT, decode_broadcast, keys_digest, make_codec
from fedmeta.fl.config import FederationConfig, RunConfig
from fedmeta.fl.mapping_status import STATUS as MAPPING_STATUS
from fedmeta.fl.mapping_status import site_status
from fedmeta.fl.regions import REGION
from fedmeta.fl.secagg import PARAMETERS as SECURE_PARAMETERS
from fedmeta.fl.secagg import received_state, secure_aggregation_mod, secure_reply, secure_vector
from fedmeta.fl.sites import csv_site, csv_site_files
from fedmeta.fl.site_training import evaluate_site, local_update, outgoing_update
from fedmeta.fl.stragglers import wait_as_configured
from fedmeta.fl.strategy import EVALUATION_PREFIX, site_examples
from fedmeta.threads import limit_threads, site_threads


@lru_cache(maxsize=8)
def _synthetic_federation(federation_json: str) -> Sequence[SiteData]:
    """The seeded federation's sites by partition. FedProx sites are drawn one at a time (a worker holds the sites it
    serves, not 10,000); hospital sites all at once, since their normalization is computed over all of them."""
    fed = FederationConfig.model_validate_json(federation_json)
    if fed.kind == "hospitals":
        return tuple(hospital_federation(fed.n_sites, fed.seed, fed.test_fraction))
    return FedProxSites(fed.alpha, fed.beta, fed.n_sites, fed.seed, fed.test_fraction)


def synthetic_schema(kind: str) -> Schema:
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
    features = synthetic_schema(config.federation.kind).unnormalized if synthetic else None
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
