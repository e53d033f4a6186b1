"""The typed configuration of a federated meta-training run, loaded from TOML.

One section per concern: ``[federation]`` (which sites), ``[model]``,
``[algorithm]`` (the meta-learner), ``[local]`` (site-side training),
``[server]`` (optimizer and sampling), ``[evaluation]``, and the protections:
``[privacy]`` (client-level DP), ``[aggregation]`` (robust rules),
``[compression]`` (upload codecs) and ``[secure]`` (SecAgg+); ``[deployment]``
(what the sites receive at the end of a ``flwr run``); ``[asynchronous]``
(buffered asynchronous rounds), ``[stragglers]`` (rehearsed slow sites) and ``[regions]``
(regional bases between the global one and the sites). CLI overrides
use dotted keys, e.g. ``--set server.lr=0.5``.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


SYNTHETIC_SITES = 10


class FederationConfig(_Section):
    """Where sites' data comes from.

    ``kind = "hospitals"`` or ``"fedprox"`` synthesize a seeded federation
    of ``n_sites`` sites (default 10; site i regenerates partition i itself).
    ``"csv"`` reads the sites found in ``data_dir``
    (:func:`fedmeta.data.federation.discover_sites`: ``<site>.csv|.parquet``
    or ``<site>/train.csv`` with an optional ``<site>/test.csv``) plus
    ``schema.json``; ``n_sites`` is then optional and, if given, must match
    the number of sites found.
    """

    kind: Literal["hospitals", "fedprox", "csv"] = Field("hospitals", description="hospitals or fedprox (synthetic, seeded), or csv (the sites in data_dir)")
    n_sites: int | None = Field(None, ge=1, description="sites in the federation (default 10; for csv, the sites found in data_dir)")
    seed: int = Field(0, description="seed of the synthetic sites and of every site's held-out rows")
    alpha: float = Field(1.0, ge=0, description="fedprox: how much the sites' models differ (FedProx Synthetic(alpha, beta))")
    beta: float = Field(1.0, ge=0, description="fedprox: how much the sites' features differ")
    data_dir: str | None = Field(None, description="csv: the folder of site files (<site>.csv or <site>/train.csv [+ test.csv], optionally in <region>/ folders or with regions.csv) and schema.json")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="share of a site's rows held out for scoring, for a site without a test file")

    @model_validator(mode="after")
    def _check(self) -> "FederationConfig":
        if self.kind == "csv" and not self.data_dir:
            raise ValueError("federation.kind = 'csv' needs federation.data_dir (a folder of site files and schema.json)")
        if self.kind != "csv" and self.n_sites is None:
            self.n_sites = SYNTHETIC_SITES
        if self.data_dir:
            # Sites may run in other processes with another working directory (Ray workers): pin the folder.
            self.data_dir = str(Path(self.data_dir).resolve())
        return self


class ModelConfig(_Section):
    hidden: list[int] = Field(default_factory=lambda: [64, 64], description="widths of the shared body's layers (csv: chosen from the data unless set)")


class AlgorithmConfig(_Section):
    """The meta-learner: ``maml``, ``fomaml``, ``metasgd``, ``anil`` or ``reptile``.

    ``fedavg`` is the non-meta baseline (McMahan et al. 2017): sites run plain
    minibatch SGD on their rows and the server averages the resulting models.
    """

    name: Literal["maml", "fomaml", "metasgd", "anil", "reptile", "fedavg"] = Field("fomaml", description="the meta-learner, or fedavg (no meta-learning)")
    lr: float = Field(0.05, gt=0, description="inner-loop learning rate")
    adaptation_steps: int = Field(3, ge=1, description="inner-loop steps on an episode's support set")
    first_order: bool | None = Field(None, description="drop second-order terms (default: true for fomaml and reptile, false for maml, metasgd, anil)")


class LocalConfig(_Section):
    """What a site does with the global model in one round."""

    steps: int = Field(10, ge=1, description="local meta-updates per round")
    lr: float = Field(0.05, gt=0, description="site-side learning rate of the local meta-updates")
    meta_batch: int = Field(8, ge=1, description="episodes per meta-update")
    shots: int = Field(5, ge=1, description="K: support rows per class of an episode (csv: chosen from the data unless set)")
    query_size: int = Field(16, ge=1, description="query rows of an episode (csv: chosen from the data unless set)")


class ServerConfig(_Section):
    """The server optimizer on the weighted mean update, sampling and fault tolerance."""

    optimizer: Literal["sgd", "adam"] = Field("sgd", description="the server's step on the mean update")
    lr: float = Field(1.0, gt=0, description="server learning rate beta")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd: momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam: betas")
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of the connected sites sampled each round (by site name, seeded)")
    fraction_evaluate: float = Field(1.0, gt=0, le=1, description="share of sites in the final evaluation (during training, the round's training sites evaluate)")
    min_sites: int = Field(2, ge=1, description="fewest replies a round may aggregate")
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies")
    sampling_timeout: float = Field(120.0, gt=0, description="seconds to wait for min_sites sites to connect")
    retries: int = Field(1, ge=0, description="retries of a round with too few replies before it is skipped")
    keep_every: int = Field(0, ge=0, description="also keep the global model after every Nth round as models/round-<r>.pt in the run folder (0: only the checkpoint)")


class EvaluationConfig(_Section):
    every: int = Field(1, ge=1, description="evaluate every N rounds (and after the last)")
    shots: int = Field(5, ge=1, description="K: support rows per class for the personalized score (csv: chosen from the data unless set)")
    steps: int = Field(5, ge=0, description="adaptation steps before personalized evaluation")
    lr: float | None = Field(None, description="adaptation rate (defaults to algorithm.lr)")


class PrivacyConfig(_Section):
    """Client-level differential privacy: the protected unit is a whole site, not a row.

    Each site clips its update to L2 norm ``clip_norm``; the server averages
    with equal site weights and adds Gaussian noise of std
    ``noise_multiplier * clip_norm`` to each sum. The (epsilon, delta) spent
    is accounted over the rounds (:mod:`fedmeta.fl.privacy`), with
    amplification by the sampling of ``server.fraction_train``, which is
    then drawn from a secret generator (:mod:`fedmeta.fl.sampling`), and
    also without it, against a site that knows the sample. Off while
    ``clip_norm`` is unset.
    """

    clip_norm: float | None = Field(None, gt=0, description="L2 bound of one site's update; unset = DP off")
    noise_multiplier: float = Field(0.0, ge=0, description="noise std relative to clip_norm (0 = clipping only, no guarantee)")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of the (epsilon, delta) account")
    max_epsilon: float | None = Field(None, gt=0, description="stop training before the next round would spend more")

    @property
    def enabled(self) -> bool:
        return self.clip_norm is not None

    @property
    def accounted(self) -> bool:
        return self.enabled and self.noise_multiplier > 0


class AggregationConfig(_Section):
    """How the server combines the sites' updates before its optimizer step.

    ``mean`` is the example-weighted mean. The robust rules treat sites
    equally and bound what a minority of malicious sites can do:
    ``median`` (coordinate-wise), ``trimmed_mean`` (drop ``trim_fraction`` of
    the values at each end, per coordinate), ``krum`` and ``multikrum``
    (Blanchard et al. 2017), which assume at most ``byzantine_sites`` attackers.
    """

    rule: Literal["mean", "median", "trimmed_mean", "krum", "multikrum"] = Field("mean", description="how the server combines the sites' updates")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed_mean: share dropped at each end, per coordinate")
    byzantine_sites: int = Field(1, ge=0, description="f, the attackers Krum guards against")
    multikrum_select: int | None = Field(None, ge=1, description="m, updates Multi-Krum averages (default n - f)")


class CompressionConfig(_Section):
    """Compression of the sites' updates (upload) and of the model sent to them (broadcast).

    ``int8``: per-tensor symmetric 8-bit quantization (4x smaller).
    ``topk``: only the ``topk_ratio`` largest-magnitude entries of each tensor,
    sent as int16 (int32 for large tensors) positions and int8 values; what is
    not sent is kept at the site (error feedback) and added to its next update.
    """

    upload: Literal["none", "int8", "topk"] = Field("none", description="codec of the sites' updates")
    topk_ratio: float = Field(0.05, gt=0, le=1, description="topk: share of each tensor's entries sent")
    error_feedback: bool = Field(True, description="topk: keep what is not sent and add it to the next update")
    broadcast: Literal["none", "int8"] = Field("none", description="int8: sites receive the global model quantized; the server keeps full precision")


class SecureConfig(_Section):
    """Secure aggregation with Flower's SecAgg+: the server learns only the sum of the updates."""

    secagg: bool = Field(False, description="SecAgg+: the server learns only the sum of the updates")
    clipping_range: float = Field(8.0, gt=0, description="update entries are clipped to +-this before quantization")
    quantization_range: int = Field(4_194_304, ge=2, description="quantization levels per entry")
    reconstruction_threshold: float = Field(0.6, gt=0, le=1, description="share of sampled sites whose key shares must survive")
    max_examples: int = Field(10_000, ge=1, description="public bound W on a site's example count; larger sites weigh as W")


class SimulationConfig(_Section):
    """Options of the embedded simulation only."""

    cpus_per_site: float = Field(1.0, gt=0, description="CPUs Ray gives each simulated site (its torch threads: the floor, at least 1)")
    failing_sites: list[int] = Field(default_factory=list, description="chaos testing: these partitions raise in training")
    byzantine_sites: list[int] = Field(default_factory=list, description="chaos testing: these partitions send a malicious update")
    attack: Literal["sign_flip", "noise"] = Field("sign_flip", description="sign_flip: -10 x the honest update; noise: N(0, 1) entries")
    free_riders: list[int] = Field(default_factory=list, description="chaos testing: these partitions send a zero update while claiming their examples")


class AsynchronousConfig(_Section):
    """Buffered asynchronous rounds (FedBuff, Nguyen et al., AISTATS 2022): :mod:`fedmeta.fl.asynchronous`.

    The server keeps ``concurrency`` sites training, each on the model version
    it was sent; when ``buffer`` updates have arrived it takes one server step
    (``rounds`` counts these steps) with each update weighted by
    ``(1 + staleness) ** -staleness_exponent``, the staleness being the server
    steps taken since the site's version. Older updates than ``max_staleness``
    are dropped and the site named. A site's replies are then sent the newest model.
    """

    enabled: bool = Field(False, description="asynchronous rounds: sites train at their own pace; a server step every `buffer` updates")
    concurrency: int | None = Field(None, ge=1, description="sites training at once (default: every connected site)")
    buffer: int | None = Field(None, ge=1, description="K: updates per server step (default: half the connected sites, rounded up)")
    max_staleness: int = Field(10, ge=0, description="updates on a model more than this many server steps old are dropped (the site is named)")
    staleness_exponent: float = Field(0.5, ge=0, description="an update's weight is (1 + staleness) ** -exponent: 0.5 is FedBuff's 1 / sqrt(1 + staleness), 0 weighs all equally")


class StragglersConfig(_Section):
    """Rehearsing sites of different speeds: each site waits before replying to a training message.

    Site ``s`` waits ``sites[s]`` seconds if listed, else ``delay * exp(sigma * z_s)``
    with ``z_s`` a standard normal drawn from the run seed and the site's name
    (the same site is as slow in every round and on every engine). With
    ``sigma = 1.8`` the slowest tenth of a large federation waits about 10x the
    median (exp(1.28 sigma)). In simulation a waiting site holds its worker:
    give ``simulation.cpus_per_site`` room for the sites meant to wait at once.
    """

    delay: float = Field(0.0, ge=0, description="median seconds a site waits before replying to a training message")
    sigma: float = Field(0.0, ge=0, description="lognormal spread of the sites' waits around the median")
    sites: dict[str, float] = Field(default_factory=dict, description="seconds chosen sites wait, by site name (overrides delay and sigma)")

    @property
    def enabled(self) -> bool:
        return self.delay > 0 or any(v > 0 for v in self.sites.values())


class RegionsConfig(_Section):
    """Regional bases, between the global base and the sites: :mod:`fedmeta.fl.regions`.

    After the global rounds, each region (sites declare theirs: a region
    folder, ``regions.csv``, or the SuperNode's ``region`` node config) with at
    least ``min_sites`` connected sites meta-trains the global base further for
    ``rounds`` rounds on its own sites only; a region's updates never mix with
    another's. Runs whose sites declare no region are unaffected. Off by
    default (``rounds = 0``): on ``benchmarks/hierarchy.py``'s fresh seeds 4 to 6
    the regional level cost the seen sites of a truly regional network 0.6 to 1.4
    points of held-out accuracy against personalizing from the global base
    alone (20 rounds, the value selection seed 0 had chosen against 5).
    """

    rounds: int = Field(0, ge=0, description="rounds of meta-training per region after the global rounds, on that region's sites only (0, the default: no regional level; experimental, 20 is what was measured)")
    min_sites: int = Field(3, ge=1, description="a region with fewer connected sites keeps the global base (and the run says so)")
    validation_bases: bool = Field(False, description="each region of at most 12 sites also trains its rounds once without each site, for that site's choice to validate the regional level on (experimental: costs the region's rounds once more per site)")


class ContributionsConfig(_Section):
    """What each site contributes, round by round: :mod:`fedmeta.fl.contributions` (``RUN/contributions.json``).

    Each round's sites also send the gradient of their held-out loss at the
    model they received; the server values every site's update by its
    Shapley value in that round (exactly up to 10 sites, else by
    ``samples`` permutations), scored by the other sites' gradients.
    """

    enabled: bool = Field(False, description="per-round Shapley contributions of each site (sites also send their held-out loss gradient)")
    samples: int = Field(64, ge=1, description="random permutations per round when a round has more than 10 sites")
    truncation: float = Field(0.01, ge=0, lt=1, description="a permutation stops once its sites are worth the whole round within this fraction")


class DeploymentConfig(_Section):
    """The end of a Deployment Engine run (``flwr run``): the base model reaches every site (:mod:`fedmeta.fl.delivery`).

    Each site stores it in its site home (node config ``site-home``); with
    ``personalize``, it also adapts it on its own rows as ``fedmeta personalize``
    does and promotes the result, replying only its held-out scores.
    ``fedmeta train``'s simulated sites have no home: it delivers nothing.
    """

    personalize: bool = Field(False, description="flwr run: each site also personalizes the base model on its own rows and promotes the result in its site home; the coordinator sees only held-out scores")
    timeout: float = Field(600.0, gt=0, description="flwr run: seconds to wait for the sites to store (and personalize) the base model at the end of the run")


class RunConfig(_Section):
    """A whole run; its hash guards resumption against changed settings."""

    name: str = Field("run", description="the run's name (its folder: runs/<name>)")
    rounds: int = Field(10, ge=1, description="federated rounds")
    seed: int = Field(0, description="seed of sampling, episodes and initial weights")
    federation: FederationConfig = Field(default_factory=FederationConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    secure: SecureConfig = Field(default_factory=SecureConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    asynchronous: AsynchronousConfig = Field(default_factory=AsynchronousConfig)
    stragglers: StragglersConfig = Field(default_factory=StragglersConfig)
    regions: RegionsConfig = Field(default_factory=RegionsConfig)
    contributions: ContributionsConfig = Field(default_factory=ContributionsConfig)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.federation.n_sites is not None and self.server.min_sites > self.federation.n_sites:
            raise ValueError(f"server.min_sites = {self.server.min_sites} exceeds federation.n_sites = {self.federation.n_sites}")
        robust = self.aggregation.rule != "mean"
        if self.secure.secagg and robust:
            raise ValueError(f"aggregation.rule = {self.aggregation.rule!r} needs each site's update, which secure.secagg hides; use rule 'mean' with SecAgg+")
        if self.secure.secagg and self.compression.upload != "none":
            raise ValueError(f"compression.upload = {self.compression.upload!r} cannot combine with secure.secagg (SecAgg+ quantizes and masks dense vectors itself)")
        if self.asynchronous.enabled and self.secure.secagg:
            raise ValueError(
                "secure.secagg cannot run with asynchronous.enabled yet: SecAgg+ masks one fixed cohort together, "
                "and a buffer fills from sites that started at different times on different models; use synchronous rounds"
            )
        if self.regions.validation_bases and not self.regions.rounds:
            raise ValueError("regions.validation_bases needs regional bases to validate: set regions.rounds (e.g. 20) or drop validation_bases")
        if self.regions.validation_bases and self.privacy.enabled:
            raise ValueError(
                "regions.validation_bases cannot run with privacy.clip_norm: each validation base is one more release of its "
                "region's other sites that their privacy account does not charge"
            )
        if self.contributions.enabled and self.privacy.enabled:
            raise ValueError(
                "contributions.enabled cannot run with privacy.clip_norm: per-site values computed from unnoised updates "
                "would release more than the run's (epsilon, delta) covers"
            )
        if self.contributions.enabled and self.asynchronous.enabled:
            raise ValueError("contributions.enabled needs synchronous rounds: a round's coalitions are the sites that trained on the same model")
        if self.privacy.accounted and robust:
            raise ValueError(f"privacy.noise_multiplier > 0 is accounted for the mean only; aggregation.rule = {self.aggregation.rule!r} has another sensitivity")
        if self.privacy.max_epsilon is not None and not self.privacy.accounted:
            raise ValueError("privacy.max_epsilon needs privacy.clip_norm and privacy.noise_multiplier > 0")
        if self.aggregation.rule in ("krum", "multikrum") and self.federation.n_sites is not None:
            f = self.aggregation.byzantine_sites
            n = self.federation.n_sites
            sampled = min(n, max(self.server.min_sites, math.ceil(self.server.fraction_train * n)))
            if sampled < 2 * f + 3:
                raise ValueError(
                    f"aggregation.rule = {self.aggregation.rule!r} with aggregation.byzantine_sites = {f} needs at least {2 * f + 3} sites "
                    f"per round (n > 2f + 2); a round samples {sampled} of federation.n_sites = {n} (server.fraction_train = {self.server.fraction_train:g})"
                )
        unused = _unused_options(self)
        if unused:
            raise ValueError("options set that this run would ignore:\n  " + "\n  ".join(unused))
        return self

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "RunConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        return cls.from_dict(data, overrides, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> "RunConfig":
        data = json.loads(json.dumps(data))
        for item in overrides or []:
            apply_override(data, item)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            lines = [_error_line(err) for err in e.errors()]
            raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None

    def digest(self) -> str:
        """SHA-256 of the settings that shape training (the name is excluded)."""
        # What happens after the last global round shapes none of its weights: changing it must not refuse a resume
        # (a regional stage cut short starts again from the global base).
        payload = self.model_dump(mode="json", exclude={"name": True, "rounds": True, "deployment": True, "regions": True, "server": {"keep_every"}})
        # Off, contributions change nothing a site sends (and digests from before the section stay valid); on, a
        # resume needs them on from the start, or the ledger would miss the first rounds.
        if not self.contributions.enabled:
            del payload["contributions"]
        if not self.simulation.free_riders:
            del payload["simulation"]["free_riders"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_toml(self) -> str:
        return _to_toml(self.model_dump(mode="json", exclude_none=True))


def _unused_options(config: "RunConfig") -> list[str]:
    """Options given a non-default value that the rest of the configuration would silently ignore."""
    def changed(section: _Section, name: str) -> bool:
        return getattr(section, name) != type(section).model_fields[name].get_default(call_default_factory=True)

    rules = [
        (config.aggregation, "trim_fraction", config.aggregation.rule == "trimmed_mean", "aggregation.rule = 'trimmed_mean'"),
        (config.aggregation, "byzantine_sites", config.aggregation.rule in ("krum", "multikrum"), "aggregation.rule = 'krum' or 'multikrum'"),
        (config.aggregation, "multikrum_select", config.aggregation.rule == "multikrum", "aggregation.rule = 'multikrum'"),
        (config.compression, "topk_ratio", config.compression.upload == "topk", "compression.upload = 'topk'"),
        (config.compression, "error_feedback", config.compression.upload == "topk", "compression.upload = 'topk'"),
        (config.privacy, "noise_multiplier", config.privacy.enabled, "privacy.clip_norm"),
        (config.privacy, "delta", config.privacy.accounted, "privacy.clip_norm and privacy.noise_multiplier > 0"),
        (config.stragglers, "sigma", config.stragglers.delay > 0, "stragglers.delay > 0"),
        (config.simulation, "attack", bool(config.simulation.byzantine_sites), "simulation.byzantine_sites"),
    ]
    rules += [(config.asynchronous, name, config.asynchronous.enabled, "asynchronous.enabled = true") for name in ("concurrency", "buffer", "max_staleness", "staleness_exponent")]
    rules += [(config.contributions, name, config.contributions.enabled, "contributions.enabled = true") for name in ("samples", "truncation")]
    rules += [(config.secure, name, config.secure.secagg, "secure.secagg = true") for name in ("clipping_range", "quantization_range", "reconstruction_threshold", "max_examples")]
    section_of = {id(getattr(config, name)): name for name in type(config).model_fields}
    return [
        f"{section_of[id(section)]}.{name} = {getattr(section, name)!r} has no effect without {needs}"
        for section, name, used, needs in rules
        if not used and changed(section, name)
    ]


def _error_line(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``section.key=value`` (value parsed as TOML, else kept as a string)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _toml_value(value: Any) -> str:
    """A value in TOML: JSON's scalars and arrays are TOML's; a table is written inline (``{"a" = 1.0}``)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _to_toml(data: dict[str, Any]) -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"
