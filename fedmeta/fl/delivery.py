"""The model reaches the sites: the last exchange of a Deployment Engine run.

After the last round the server sends the bytes of ``base_model.pt`` with
their SHA-256 to every site that answered the roll call (message type
:data:`MESSAGE_TYPE`). Each site checks the hash against the bytes it is
about to store, stores the base in its site home (node config ``site-home``,
:class:`~fedmeta.registry.SiteHome`, every file written atomically) and
registers it with the run's lineage: run name, round, configuration digest,
Flower run id; the registry records the base's own hash. With
``[deployment] personalize = true`` the site then personalizes the base on
its own rows as ``fedmeta personalize`` does by default
(:func:`~fedmeta.personalize.choose_personalization`), and exports and
promotes the result. Its reply carries no rows: the version labels, the
candidate chosen and the held-out scores.

A site of a region with a base of its own (:mod:`fedmeta.fl.regional_rounds`)
also receives that regional base, checked the same way and registered as a
base version whose parent is the global one; personalizing, it weighs both
(``choose_personalization(regional=...)``), and the personalized version's
parent is the base its chosen candidate started from.

The server writes one ``metrics.jsonl`` row per site (phase ``deliver``) and
logs one line per site. Only ``flwr run``'s ServerApp delivers
(:func:`is_deployment_run`): the sites of ``fedmeta train``'s simulation
are partitions with no home.

:func:`base_model_at_sites` and :func:`personalized_at_sites` count, by
reading the site homes, how many sites hold what the run delivered.

The site's side reaches up to :mod:`fedmeta.personalize` and
:mod:`fedmeta.registry`, above this layer; it imports them when it runs, as
the ClientApp (the composition root of a site) does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedmeta.data.site import site_name
from fedmeta.fl import exchange as wire
from fedmeta.fl.config import RunConfig
from fedmeta.fl.run_dir import RunDir
from fedmeta.manifest import sha256_bytes, sha256_file

log = logging.getLogger("flwr.fedmeta")

#: The ClientApp's query action for the delivery (``@client_app.query(ACTION)``).
ACTION = "deliver_model"
MESSAGE_TYPE = f"{MessageType.QUERY}.{ACTION}"
PHASE = "deliver"
PAYLOAD = "base-model"  # the file's bytes as one uint8 array: Flower chunks arrays, not config values
SHA256 = "base-model-sha256"
REGIONAL_PAYLOAD = "regional-base-model"
REGIONAL_SHA256 = "regional-base-model-sha256"


class DeliveryRefused(ValueError):
    """A base model a site will not store: its bytes do not match the hash the server sent."""


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


def is_deployment_run(context: Context | None) -> bool:
    """``flwr run``'s ServerApp: its run config names the run folder; ``fedmeta train`` passes no run config."""
    return context is not None and "run-dir" in context.run_config


def after_run(grid: Grid, config: RunConfig, run_dir: RunDir, node_sites: dict[int, str], round_: int, context: Context | None) -> list[dict]:
    """The run's last exchange (deployment runs only): :func:`deliver`; returns its rows (none in simulation)."""
    if not is_deployment_run(context):
        if config.deployment.personalize:
            log.info("deployment.personalize has no effect here: simulated sites have no site home (it applies to flwr run)")
        return []
    return deliver(grid, config, run_dir, node_sites, round_, context.run_id)


def deliver(grid: Grid, config: RunConfig, run_dir: RunDir, node_sites: dict[int, str], round_: int, run_id: int | None = None) -> list[dict]:
    """Send ``base_model.pt`` to the connected sites of ``node_sites`` (node id -> site name), record and log each one's outcome."""
    data = run_dir.base_model_path.read_bytes()
    sha = sha256_bytes(data)
    lineage = {"run": config.name, "round": round_, "config_digest": config.digest(), "flower_run_id": run_id}
    connected = set(grid.get_node_ids())
    node_sites = latest_nodes(node_sites, connected)
    regional = regional_bases(run_dir)
    messages = [_delivery_message(node, config, data, sha, lineage, regional.get(node_sites[node])) for node in sorted(node_sites) if node in connected]
    started = time.perf_counter()
    replies = wire.exchange(grid, {PHASE: messages}, config.deployment.timeout)[PHASE] if messages else []
    answers = {wire.node_of(r): reply_fields(r) for r in replies}
    rows = delivery_rows(node_sites, answers, {m.metadata.dst_node_id for m in messages}, round_, sha, time.perf_counter() - started)
    for row in rows:
        (log.info if row["stored"] else log.warning)("%s", describe(row, config.deployment.timeout))
    run_dir.append_metrics(rows)
    return rows


def latest_nodes(node_sites: dict[int, str], connected: set[int]) -> dict[int, str]:
    """One node per site: a SuperNode that restarted answered the roll call again under a new node id; its connected one counts.

    >>> latest_nodes({3: "a", 7: "a", 5: "b"}, connected={3, 5})
    {3: 'a', 5: 'b'}
    """
    chosen: dict[str, int] = {}
    for node in sorted(node_sites):
        name = node_sites[node]
        if name not in chosen or node in connected:
            chosen[name] = node
    return {node: name for name, node in sorted(chosen.items(), key=lambda item: item[1])}


def regional_bases(run_dir: RunDir) -> dict[str, bytes]:
    """``{site: bytes of its region's base}`` for every site of a region that trained a base of its own."""
    from fedmeta.fl.regions import load_regions, regional_base_path

    out = {}
    for region, entry in ((load_regions(run_dir.path) or {}).get("regions") or {}).items():
        path = regional_base_path(run_dir.path, region)
        if path is not None:
            data = path.read_bytes()
            out.update({site: data for site in entry["sites"]})
    return out


def _delivery_message(node: int, config: RunConfig, data: bytes, sha: str, lineage: dict, regional: bytes | None = None) -> Message:
    settings = ConfigRecord({"run-config": config.model_dump_json(), SHA256: sha, "lineage": json.dumps(lineage)})
    arrays = ArrayRecord({PAYLOAD: Array(np.frombuffer(data, dtype=np.uint8))})
    if regional is not None:
        arrays[REGIONAL_PAYLOAD] = Array(np.frombuffer(regional, dtype=np.uint8))
        settings[REGIONAL_SHA256] = sha256_bytes(regional)
    return Message(content=RecordDict({"config": settings, "arrays": arrays}), message_type=MESSAGE_TYPE, dst_node_id=node)


def reply_fields(reply: Message) -> dict:
    """What a site's reply says: its ``delivery`` fields and scores, or ``{"error": ...}`` for an error reply."""
    if reply.has_error():
        return {"error": wire.short_reason(reply.error.reason)}
    fields = dict(reply.content["delivery"])
    if "metrics" in reply.content:
        fields.update(dict(reply.content["metrics"]))
    return fields


def delivery_rows(node_sites: dict[int, str], answers: dict[int, dict], sent: set[int], round_: int, sha: str, seconds: float) -> list[dict]:
    """One ``metrics.jsonl`` row per site of the run: stored or not, and why, with the site's scores when it personalized.

    ``answers`` maps a node to :func:`reply_fields`; a node in ``sent``
    without an answer did not reply in time, one not in ``sent`` was no
    longer connected at the end of the run.
    """
    rows = []
    for node in sorted(node_sites, key=lambda n: (node_sites[n], n)):  # the coordinator reads them by site name
        row = {"round": round_, "logged_in_round": round_ + 1, "phase": PHASE, "site": node_sites[node], "node": node, "sha256": sha, "seconds": seconds}
        answer = answers.get(node)
        if answer is None:
            row.update(stored=False, reason="no reply" if node in sent else "not connected at the end of the run")
        else:
            row.update({"stored": False, **answer})
            registered_as = row.pop("site")
            row["site"] = node_sites[node]  # the roll call's name, which every other row of the run uses
            if registered_as != row["site"]:
                row["registered_as"] = registered_as
        row.setdefault("personalized", False)
        rows.append(row)
    return rows


def describe(row: dict, timeout: float) -> str:
    """The coordinator's line for one site's delivery."""
    who = f"site {row['site']} (node {row['node']})"
    if row.get("reason") == "no reply":
        return f"{who}: no reply within {timeout:.0f} s (deployment.timeout): the base model may not have reached it"
    if row.get("error"):
        return f"{who}: the base model was not delivered: {row['error']}"
    if not row["stored"]:
        return f"{who}: stored nothing: {row.get('reason', 'no reason given')}"
    line = f"{who}: base model {row['sha256'][:16]}... stored in its site home as {row.get('version', '?')}"
    if row.get("personalized"):
        scores = ", ".join(f"{k.replace('.personalized.', ' ')} {v:.4f}" for k, v in sorted(row.items()) if ".personalized." in k)
        line += f"; personalized ({row.get('candidate', '?')}), promoted {row.get('personalized_version', '?')}, held-out {scores or 'no scores'}"
    elif row.get("personalize_error"):
        line += f"; personalization failed: {row['personalize_error']}"
    return line


# --------------------------------------------------------------------------
# Site
# --------------------------------------------------------------------------


def node_site_name(node_config: dict) -> str:
    """The name a site registers under: ``site-name`` from its node config, else its data file's (:func:`~fedmeta.data.site.site_name`).

    >>> node_site_name({"site-name": "st-marys", "data-path": "/data/site.csv"}), node_site_name({"data-path": "/data/site.csv"})
    ('st-marys', 'site')
    """
    if node_config.get("site-name"):
        return str(node_config["site-name"])
    if "data-path" in node_config:
        return site_name(str(node_config["data-path"]))
    return f"partition {node_config.get('partition-id', '?')}"


def handle(message: Message, context: Context) -> Message:
    """The ClientApp's ``deliver_model`` query: store (and personalize) the base model, reply what became of it."""
    settings = message.content["config"]
    config = RunConfig.model_validate_json(str(settings["run-config"]))
    data = message.content["arrays"][PAYLOAD].numpy().tobytes()
    regional = None
    if REGIONAL_PAYLOAD in message.content["arrays"]:
        regional = (message.content["arrays"][REGIONAL_PAYLOAD].numpy().tobytes(), str(settings.get(REGIONAL_SHA256, "")))
    try:
        fields, scores = receive(data, str(settings[SHA256]), dict(context.node_config), config, json.loads(str(settings["lineage"])), regional)
    except DeliveryRefused as e:
        fields, scores = {"site": node_site_name(dict(context.node_config)), "stored": False, "reason": str(e)}, {}
    content = RecordDict({"delivery": ConfigRecord(fields)})
    if scores:
        content["metrics"] = MetricRecord(scores)
    return Message(content=content, reply_to=message)


def receive(
    data: bytes, sha256: str, node_config: dict, config: RunConfig, lineage: dict, regional: tuple[bytes, str] | None = None
) -> tuple[dict, dict[str, float]]:
    """A site's side of the delivery: ``(fields, held-out scores)`` for its reply.

    ``regional``: the bytes and hash of the site's regional base, when its
    region has one. Raises :class:`DeliveryRefused`, before anything is
    written, when either does not hash as the server said. A node config
    without ``site-home`` stores nothing and says so.
    """
    name = node_site_name(node_config)
    _check_hash(name, "base model", data, sha256)
    if regional is not None:
        _check_hash(name, "regional base model", *regional)
    if not node_config.get("site-home"):
        return {"site": name, "stored": False, "reason": "its node config has no site-home (add site-home=\"/path\" to the SuperNode's --node-config)"}, {}
    from fedmeta.personalize.base import read_base, register_base
    from fedmeta.registry import SiteHome

    home = SiteHome(str(node_config["site-home"]))
    base = read_base(data, f"run {lineage.get('run')} round {lineage.get('round')} (flwr run {lineage.get('flower_run_id')})")
    version = register_base(home, base, delivery={**lineage, "site": name})
    fields: dict = {"site": name, "stored": True, "version": version.label}
    region = None
    if regional is not None:
        regional_base = read_base(regional[0], f"run {lineage.get('run')} regional base (flwr run {lineage.get('flower_run_id')})")
        region = (regional_base, register_base(home, regional_base, delivery={**lineage, "site": name}, parent=version))
        fields["regional_version"] = region[1].label
    if not config.deployment.personalize:
        return fields, {}
    try:
        chosen, published, scores = personalize_at_site(home, base, version, node_config, name, region)
    except Exception as e:  # the base is stored whatever happens here: the site says why it has no personalized model instead of failing the exchange
        fields["personalize_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return fields, {}
    fields.update(personalized=True, candidate=chosen, personalized_version=published.version.label)
    return fields, scores


def _check_hash(site: str, what: str, data: bytes, expected: str) -> None:
    actual = sha256_bytes(data)
    if actual != expected:
        raise DeliveryRefused(f"site {site}: the {what} received hashes to SHA-256 {actual[:16]}..., the server sent {expected[:16]}...; refusing to store it")


def personalize_at_site(home, base, base_version, node_config: dict, name: str, region=None):
    """``fedmeta personalize``'s default on the site's rows (the candidates weighed on validation folds), exported and promoted.

    ``region``: ``(regional base, its registered version)``: its candidates are weighed too, and the
    personalized version's parent is the base the chosen one started from.

    Returns the candidate chosen, the published version and the held-out scores
    (``<task>.base.<metric>``, ``<task>.personalized.<metric>``).
    """
    from fedmeta.data import Schema, load_site
    from fedmeta.data.mapping import Mapping, require_reviewed
    from fedmeta.personalize import PersonalizationError, choose_personalization, data_lineage, publish
    from fedmeta.personalize.choice import REGIONAL
    from fedmeta.threads import limit_threads, site_threads

    if "data-path" not in node_config or "schema-path" not in node_config:
        raise PersonalizationError("the node config needs data-path and schema-path to personalize")
    limit_threads(site_threads(None))
    data_path, schema_path = str(node_config["data-path"]), str(node_config["schema-path"])
    test_path = str(node_config["test-path"]) if node_config.get("test-path") else None
    federation = base.config.federation
    # Normalized as the federation normalized, held out as training held out (the seed and the site's name decide).
    mapping, accepted = None, False
    if node_config.get("mapping-path"):  # the site's own columns, codes and units, read as training read them (fedmeta.fl.site_app.site_for)
        mapping = Mapping.load(str(node_config["mapping-path"]))
        accepted = bool(require_reviewed(mapping, str(node_config["mapping-path"]), bool(node_config.get("accept-review", False))))
    site = load_site(data_path, base.schema_for(Schema.load(schema_path), schema_path), name=name,
                     test_fraction=federation.test_fraction, seed=federation.seed, test_path=test_path, mapping=mapping)
    defaults = base.adaptation
    regional = region[0].for_schema(site.schema) if region else None
    result = choose_personalization(base.for_schema(site.schema), site, shots=defaults["shots"], lr=defaults["lr"], seed=0, regional=regional)
    if region and str(result.steps_selection.get("chosen", "")).startswith(REGIONAL):
        base_version = region[1]
    held_out = int(site.test_mask.sum())
    if test_path is None:
        rows = data_lineage(data_path, rows=site.n_rows, held_out=held_out, test_fraction=federation.test_fraction, held_out_rows_sha256=site.held_out_digest())
    else:
        scored = data_lineage(test_path)
        rows = data_lineage(data_path, rows=site.n_rows - held_out, held_out=held_out, test_file=scored["file"], test_sha256=scored["sha256"])
    published = publish(
        home, result.model, "personalized", site.name, parent=base_version, base=base_version, metrics=result.metrics, data=rows,
        training={"mode": result.mode, "shots": result.shots, "steps": result.steps, "steps_selection": result.steps_selection, "lr": result.lr,
                  "seed": result.seed, "seconds": round(result.seconds, 4)},
        shots=result.shots if isinstance(result.shots, int) else None, personalized_tasks=result.tasks, promote=True,
        feature_ranges=site.feature_ranges(), mapping=mapping, review_accepted=accepted,
    )
    chosen = (result.steps_selection or {}).get("chosen", result.mode)
    return str(chosen), published, {k: float(v) for k, v in result.metrics.items()}


# --------------------------------------------------------------------------
# What arrived
# --------------------------------------------------------------------------


def base_model_at_sites(base_model: str | Path, homes: Iterable[str | Path]) -> int:
    """How many of the site ``homes`` hold ``base_model`` (a ``base_model.pt``), registered and matching its registered hash."""
    sha = sha256_file(base_model)
    return sum(1 for home in homes if _base_version(home, sha) is not None)


def personalized_at_sites(base_model: str | Path, homes: Iterable[str | Path]) -> int:
    """How many of the site ``homes`` have promoted a personalized model made from ``base_model``, its files matching the registry."""
    from fedmeta.registry import SiteHome

    sha = sha256_file(base_model)
    count = 0
    for home in homes:
        if _base_version(home, sha) is None:
            continue
        site_home = SiteHome(home)
        promoted = [site_home.registry.current(site) for site in site_home.registry.sites()]
        count += any(v is not None and v.kind == "personalized" and v.lineage.get("base_sha256") == sha and not site_home.verify_files(v) for v in promoted)
    return count


def _base_version(home: str | Path, sha: str):
    """The home's registered version of the base with hash ``sha`` whose file still matches the registry, else None."""
    from fedmeta.manifest import ManifestError
    from fedmeta.registry import REGISTRY_FILE, SiteHome

    if not (Path(home) / REGISTRY_FILE).is_file():
        return None
    site_home = SiteHome(home)
    version = site_home.registry.by_sha256(sha)
    if version is None or version.kind != "base":
        return None
    try:
        site_home.load(version)
    except ManifestError:
        return None
    return version
