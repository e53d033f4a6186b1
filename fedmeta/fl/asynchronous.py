"""Buffered asynchronous rounds (``[asynchronous]``): FedBuff on Flower's Message API.

FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS 2022): the server keeps ``concurrency`` sites training,
each on the model version it was sent, and takes one server step whenever
``buffer`` updates have arrived (by default half the sites). Nothing waits for the slowest site: a fast
site is sent the newest model as soon as the step its update joined is
taken, and a slow one still contributes, down-weighted by its staleness τ
(the server steps taken since its version):

    step = Σ_i n_i · w(τ_i) · Δ_i / Σ_i n_i,    w(τ) = (1 + τ) ** -staleness_exponent

with n_i the site's examples (per head, its examples of the task), so with
no staleness the step is the synchronous weighted mean, and FedBuff's
1/√(1+τ) is the default exponent 0.5. An update older than ``max_staleness``
steps is dropped, naming the site. Flower has no asynchronous strategy (its
issue #469); the loop pushes and pulls messages itself (``Grid.push_messages``
/ ``Grid.pull_messages``). The mechanics follow FedBuff's algorithm. FedSaSync
(Hidalgo-Izquierdo et al., an open Flower baselines pull request, #7503) is a
semi-asynchronous alternative; only its description was read, not its code.

What the other features do here:

- **Heads**: as in synchronous rounds, a head is combined only from the
  buffered sites that hold its task.
- **Robust rules** apply to the buffer's staleness-weighted updates.
- **DP**: each update is clipped to ``clip_norm`` before its staleness
  weight (≤ 1) scales it, and the noise is added once per server step. A
  site has at most one update in a buffer (it gets the newer model after the
  step). Which sites fill a buffer depends on their speeds, not on a uniform
  sample, so the account claims no amplification by sampling: every step is
  charged as an unsampled Gaussian release of the buffer's sum.
- **SecAgg+** is refused (:class:`~fedmeta.fl.config.RunConfig`).
- **Checkpoints** are written after every server step; the buffer and the
  messages in flight are not kept: a resumed run sends the checkpointed
  model to the sites again.
- **Evaluation**: the model after the last step is evaluated as in
  synchronous rounds; during training, steps log their loss and staleness
  (sites do not score models in between).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import Message
from flwr.serverapp import Grid

from fedmeta.fl import exchange as wire
from fedmeta.fl.aggregation import FlatState, SiteUpdate
from fedmeta.fl.compression import dense_bytes
from fedmeta.fl.exchange import TooFewSitesError
from fedmeta.fl.privacy import PrivacyBudgetExceeded, clip_update
from fedmeta.fl.strategy import MetaStrategy, reply_bytes, round_loss, site_examples

log = logging.getLogger("flwr.fedmeta")

#: The message config key carrying the model version a site was sent (server steps taken before it).
MODEL_VERSION = "model-version"

POLL = 0.05  # seconds between pulls when nothing arrived
REFRESH = 1.0  # seconds between looks for newly connected sites


def staleness_weight(staleness: int, exponent: float) -> float:
    """An update's weight after ``staleness`` server steps: ``(1 + staleness) ** -exponent``."""
    return (1.0 + staleness) ** -exponent


@dataclass(frozen=True)
class Flight:
    """A training message out: to whom, on which model version, since when."""

    node: int
    site: str
    version: int
    sent: float


@dataclass(frozen=True)
class Buffered:
    """An update waiting for the next server step."""

    update: SiteUpdate
    version: int
    staleness: int
    metrics: dict
    upload_bytes: int


def weighted_updates(buffer: list[Buffered], exponent: float, clip_norm: float | None) -> list[SiteUpdate]:
    """Each buffered update scaled by its staleness weight, after clipping (under DP) so the weight cannot raise its norm."""
    out = []
    for b in buffer:
        update = clip_update(b.update.update, clip_norm)[0] if clip_norm else b.update.update
        w = staleness_weight(b.staleness, exponent)
        out.append(SiteUpdate(b.update.site, {k: v * w for k, v in update.items()}, b.update.examples))
    return out


#: ``save(version, state, rows, summary)``: the run loop's end of a server step (metrics, checkpoint, roster).
SaveStep = Callable[[int, FlatState, list[dict], dict], None]


class AsyncRounds:
    """The asynchronous loop of one run: dispatch, collect, step, until ``config.rounds`` server steps are taken."""

    def __init__(self, grid: Grid, strategy: MetaStrategy, state: FlatState, version: int, save: SaveStep, observer, roster):
        self.grid, self.strategy, self.config = grid, strategy, strategy.config
        self.state, self.version = state, version
        self.save, self.observer, self.roster = save, observer, roster
        self.flights: dict[str, Flight] = {}  # by message id
        self.buffer: list[Buffered] = []
        self.resting: set[str] = set()  # failed, silent or stale since the last step: asked again after it
        self.failed: list[tuple[str, str]] = []  # (site, reason) since the last step
        self.population: dict[str, int] = {}
        self.refreshed = -float("inf")
        self.stalls = 0  # times the resting sites were asked again since the last step
        self.size = 0  # K, the updates a step takes: settled at the first roll call (_settle)
        self.step_started = time.perf_counter()

    # --- the loop ---------------------------------------------------------------
    def run(self) -> tuple[FlatState, int]:
        """Take server steps until ``rounds``; returns the final state and the last step. Stops early at the privacy budget."""
        while self.version < self.config.rounds:
            if wire.STOP.is_set():
                raise wire.StopRequested(f"stop requested before server step {self.version + 1}")
            self._dispatch()
            arrived = wire.pull(self.grid, set(self.flights))
            try:
                for reply in arrived:
                    self._receive(reply)
                    if len(self.buffer) >= self.size and self.version < self.config.rounds:
                        self._step()  # at exactly `buffer` updates: what arrives with them waits for the next step
                self._expire()
                if self._stalled():
                    self._unstall()
                elif not arrived:
                    time.sleep(POLL)
            except PrivacyBudgetExceeded as e:
                log.warning("training stops before server step %d: %s", self.version + 1, e)
                break
        return self.state, self.version

    def _idle(self) -> list[str]:
        """Connected sites not training, not buffered and not resting: the ones a model can be sent to."""
        busy = {f.site for f in self.flights.values()} | {b.update.site for b in self.buffer} | self.resting
        return sorted(site for site in self.population if site not in busy)

    def _stalled(self) -> bool:
        """Nothing in flight and nobody to send to: the buffer cannot fill (too few sites, or the rest failed)."""
        return not self.flights and not self._idle() and self.version < self.config.rounds

    def _unstall(self) -> None:
        """Step with a short buffer if it holds ``server.min_sites`` updates; else ask the resting sites again, ``server.retries`` times."""
        s = self.config.server
        if len(self.buffer) >= s.min_sites:
            log.warning(
                "server step %d from %d update(s), fewer than asynchronous.buffer = %d: no other site can answer now",
                self.version + 1, len(self.buffer), self.size,
            )
            self._step()
            return
        self.stalls += 1
        if self.stalls > s.retries:
            raise RuntimeError(
                f"asynchronous rounds: {len(self.buffer)} update(s) buffered and no other site can answer "
                f"(server.min_sites = {s.min_sites}, {len(self.population)} site(s) connected, {len(self.resting)} failed or stale)"
            )
        log.warning("asking %d site(s) that failed or sent stale updates again (%d of %d)", len(self.resting), self.stalls, s.retries)
        self.resting.clear()

    def _dispatch(self) -> None:
        """Keep ``concurrency`` sites busy: idle sites (not in flight, buffered or resting) get the newest model."""
        now = time.monotonic()
        if now - self.refreshed >= REFRESH or not self.population:
            first = not self.population
            self.population = self.strategy.population(self.grid)
            self.refreshed = now
            if first:
                self._settle(len(self.population))
        limit = self.config.asynchronous.concurrency or len(self.population)
        free = limit - len(self.flights)
        if free <= 0:
            return
        idle = self._idle()
        if not idle:
            return
        chosen = sorted(self.strategy.rng.sample(idle, min(free, len(idle))))
        self.strategy.current = self.state
        nodes = [self.population[site] for site in chosen]
        messages = self.strategy.messages_for(nodes, self.version + 1, "train", {MODEL_VERSION: self.version})
        sent = time.monotonic()
        for mid, node, site in zip(wire.push(self.grid, messages), nodes, chosen):
            self.flights[mid] = Flight(node, site, self.version, sent)

    def _settle(self, sites: int) -> None:
        """The buffer's size once the federation has answered: ``asynchronous.buffer``, or half the sites (rounded up)."""
        a = self.config.asynchronous
        if a.buffer is not None and sites < a.buffer:
            raise TooFewSitesError(f"asynchronous.buffer = {a.buffer} needs at least {a.buffer} sites; {sites} answered the roll call")
        self.size = a.buffer or math.ceil(sites / 2)
        log.info(
            "asynchronous rounds: %s site(s) training at once, a server step every %d update(s), staleness weight (1 + tau) ** -%g, updates older than %d step(s) dropped",
            a.concurrency or "every connected", self.size, a.staleness_exponent, a.max_staleness,
        )

    def _receive(self, reply: Message) -> None:
        flight = self.flights.pop(reply.metadata.reply_to_message_id, None)
        if flight is None:
            return
        if reply.has_error():
            self._fail(flight.site, wire.short_reason(reply.error.reason))
            return
        metrics = dict(reply.content["metrics"])
        self.strategy.node_tasks[flight.node] = sorted(site_examples(metrics))
        self.strategy.failures = []
        accepted = self.strategy._site_updates(self.version + 1, [reply])
        if not accepted:
            self._fail(flight.site, wire.short_reason(self.strategy.failures[-1]) if self.strategy.failures else "its update was refused")
            return
        staleness = self.version - flight.version
        limit = self.config.asynchronous.max_staleness
        if staleness > limit:
            log.warning(
                "site %s: its update on model version %d arrived %d server step(s) later, more than asynchronous.max_staleness = %d; dropped",
                flight.site, flight.version, staleness, limit,
            )
            self.failed.append((flight.site, f"update dropped: {staleness} steps stale (asynchronous.max_staleness = {limit})"))
            self.resting.add(flight.site)
            return
        update = accepted[0][1]
        update = SiteUpdate(flight.site, update.update, update.examples)  # the site's roll-call name, not what the reply claims
        self.buffer.append(Buffered(update, flight.version, staleness, metrics, reply_bytes(reply)))

    def _fail(self, site: str, reason: str) -> None:
        self.failed.append((site, reason))
        self.resting.add(site)
        self.observer.sites_failed(self.version + 1, [(site, reason)])

    def _expire(self) -> None:
        """Messages out longer than ``server.round_timeout`` are given up; their sites are asked again after the next step."""
        timeout = self.config.server.round_timeout
        now = time.monotonic()
        for mid, flight in list(self.flights.items()):
            if now - flight.sent > timeout:
                del self.flights[mid]
                self._fail(flight.site, f"no reply within {timeout:.0f} s (server.round_timeout)")

    def _step(self) -> None:
        """One server step from the buffer: weight, combine, apply the optimizer, then log and checkpoint."""
        config, strategy = self.config, self.strategy
        account = strategy.account
        sites = [b.update.site for b in self.buffer]
        if account is not None:
            account.check_budget(len(sites), len(sites))
        a, privacy = config.asynchronous, config.privacy
        updates = weighted_updates(self.buffer, a.staleness_exponent, privacy.clip_norm if privacy.enabled else None)
        strategy.current = self.state
        combined = strategy.combine(updates)
        step = self.version + 1
        staleness = [b.staleness for b in self.buffer]
        rows = [
            {"round": step, "phase": "train", "site": b.update.site, "model_version": b.version, "staleness": b.staleness,
             "staleness_weight": staleness_weight(b.staleness, a.staleness_exponent), **b.metrics}
            for b in self.buffer
        ]
        if combined is None:
            log.warning("server step %d: the body could not be combined (%s); the buffer is dropped", step, "; ".join(strategy.refused_groups))
            self.buffer.clear()
            return
        self.state = strategy.optimizer.step(self.state, combined)
        self.version = step
        if account is not None:
            account.spend(len(sites), len(sites), sites=sites)  # unsampled: the buffer is not a uniform sample
        now = time.perf_counter()
        summary = {
            "round": step, "phase": "train", "site": "*", "seconds": now - self.step_started, "skipped": False,
            "loss": round_loss([b.metrics for b in self.buffer]), "sites": len(self.buffer), "failed_sites": len(self.failed),
            "staleness_mean": sum(staleness) / len(staleness), "staleness_max": max(staleness),
            "upload_bytes": sum(b.upload_bytes for b in self.buffer), "upload_dense_bytes": sum(dense_bytes(b.update.update) for b in self.buffer),
        }
        self.roster.record(step, strategy.node_sites, list(self.population.values()), [], sites, self.failed)
        self.save(step, self.state, rows, summary)
        log.info(
            "server step %d/%d: loss %.4f, %d update(s) (staleness mean %.1f, max %d), %.1f s%s",
            step, config.rounds, summary["loss"], len(sites), summary["staleness_mean"], summary["staleness_max"], summary["seconds"],
            f"; without {', '.join(sorted({s for s, _ in self.failed}))}" if self.failed else "",
        )
        self.observer.round_done(step, {k: summary[k] for k in ("loss", "sites", "failed_sites", "staleness_mean", "staleness_max")})
        if hasattr(self.observer, "model_after"):
            self.observer.model_after(step, self.state)
        self.buffer.clear()
        self.resting.clear()
        self.failed = []
        self.stalls = 0
        self.step_started = now
