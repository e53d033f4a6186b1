"""The run's sites by name: who took part in each round, who failed or vanished, and what the base model lacks.

The server keeps one :class:`Roster` per run and saves it as
``RUN_DIR/sites.json`` after every round (atomically), so a coordinator can
see the federation while it trains (``fedmeta sites RUN_DIR``) and a script
can tell, at the end, whether the base model was made from every site.

A site is known by the name it gave at the roll call; node ids change at
every SuperNode start, so they are recorded, never used as the key. A round
*misses* a site when the site was sampled and sent nothing usable (an error,
a malformed update, no reply before ``server.round_timeout``), or when a
site that had answered the roll call is no longer connected. A site that was
simply not sampled (``server.fraction_train`` < 1) has missed nothing.

The file::

    {"round": 3, "updated": "2026-12-05T06:00:00Z", "summary": null | {...the end-of-run summary...},
     "sites": {"<site>": {"node": 12345, "status": "trained", "last_contact": "...", "last_round": 3,
                          "missed": {"<round>": "<reason>"},
                          "mapping": null | {"digest": "<sha256 of its mapping.json>" | null,
                                             "mapped": 5, "converted": 1, "recoded": 3, "review": 0}}}}

``mapping`` is what the site reported at the roll call
(:mod:`fedmeta.fl.mapping_status`): its mapping's digest and counts, digest
``null`` and zeros for a site without one, ``null`` for a site whose report
was malformed or missing. No column name or value is recorded.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from fedmeta.files import atomic_write_text

FILE = "sites.json"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Roster:
    """Per-site status of one run, saved as ``sites.json`` in its run folder.

    A round changes the few sites it sampled, not the federation: :meth:`record`
    visits only the sites whose status can change (those asked, those not
    "not sampled" yet, those offline), and :meth:`save` re-encodes only the
    sites changed since the last save, writing the others' cached JSON. At
    10,000 sites a round's roster costs milliseconds, not the 0.25 s that
    encoding every site took (``benchmarks/scale.py``).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / FILE
        self.sites: dict[str, dict] = {}
        self.round = 0
        self.summary: dict | None = None
        self._active: set[str] = set()  # sites whose status is not "not sampled": a round may change them without asking them
        self._changed: set[str] = set()  # sites changed since their JSON was last encoded
        self._encoded: dict[str, str] = {}  # each site's '"name": {...}' line of sites.json

    @classmethod
    def load(cls, run_dir: str | Path, after_round: int | None = None) -> "Roster":
        """The saved roster; with ``after_round``, forget what rounds after it recorded (they will run again)."""
        roster = cls(run_dir)
        if roster.path.exists():
            data = json.loads(roster.path.read_text())
            roster.sites, roster.round, roster.summary = data["sites"], data["round"], data.get("summary")
        if after_round is not None:
            roster.round, roster.summary = min(roster.round, after_round), None
            for site in roster.sites.values():
                site["missed"] = {r: why for r, why in site["missed"].items() if int(r) <= after_round}
        roster._active = {name for name, site in roster.sites.items() if site["status"] != "not sampled"}
        roster._changed = set(roster.sites)
        return roster

    def _site(self, name: str, node: int | None) -> dict:
        site = self.sites.get(name)
        if site is None:
            site = self.sites[name] = {"node": node, "status": "connected", "last_contact": None, "last_round": None, "missed": {}, "mapping": None}
            self._active.add(name)
            self._changed.add(name)
        if node is not None and site["node"] != node:
            site["node"] = node
            self._changed.add(name)
        return site

    def record(self, round_: int, node_sites: dict[int, str], connected: list[int], asked: list[str], replied: list[str], failed: list[tuple[str, str]]) -> None:
        """One exchange of round ``round_``: the sites connected, asked, replying, and failing (``(site, reason)``)."""
        self.round = max(self.round, round_)
        now = _now()
        for name in set(node_sites.values()).difference(self.sites):
            self._site(name, None)
        for node in connected:  # a site restarted under a new node id is known by both: the connected one is current
            name = node_sites.get(node)
            if name is not None and self.sites[name]["node"] != node:
                self._site(name, node)
        online = {node_sites[n] for n in connected if n in node_sites}
        replied, asked, reasons = set(replied), set(asked), dict(failed)
        # Any other site is online, was not asked, and is "not sampled" already: this round changes nothing about it.
        # A failure not about one known site (SecAgg+'s "(several)" dropped out) names no row.
        for name in (replied | asked | reasons.keys() | self._active | (self.sites.keys() - online)) & self.sites.keys():
            site = self.sites[name]
            if name in replied:
                site.update(status="trained", last_contact=now, last_round=round_)
                site["missed"].pop(str(round_), None)  # a retry of the round reached it
            elif name in reasons:
                site.update(status="failed", last_contact=now)
                site["missed"][str(round_)] = reasons[name]
            elif name in asked:
                site["status"] = "no reply"
                site["missed"][str(round_)] = "no reply within server.round_timeout"
            elif name not in online:
                site["status"] = "disconnected"
                site["missed"][str(round_)] = "not connected"
            else:
                site["status"] = "not sampled"
            self._changed.add(name)
            if site["status"] == "not sampled":
                self._active.discard(name)
            else:
                self._active.add(name)

    def record_mappings(self, statuses: dict[str, dict | None]) -> None:
        """Each site's roll-call mapping status (checked by the server; ``None``: not reported)."""
        for name, status in statuses.items():
            self._site(name, None)["mapping"] = status
            self._changed.add(name)

    def failure_counts(self) -> dict[str, int]:
        """Rounds each site was asked to train in and did not (failed, timed out or disconnected)."""
        return {name: len(site["missed"]) for name, site in self.sites.items()}

    def trained_without(self) -> dict[str, dict[str, str]]:
        """``{site: {round: reason}}`` for every site some round went without."""
        return {name: site["missed"] for name, site in sorted(self.sites.items()) if site["missed"]}

    def save(self, summary: dict | None = None) -> None:
        """Write ``sites.json`` (atomically), one line per site."""
        if summary is not None:
            self.summary = summary
        for name in self._changed:
            if name in self.sites:
                self._encoded[name] = f"{json.dumps(name)}: {json.dumps(self.sites[name], sort_keys=True)}"
        self._changed.clear()
        if len(self._encoded) != len(self.sites):  # a caller replaced or removed sites behind the roster's back
            self._encoded = {name: f"{json.dumps(name)}: {json.dumps(site, sort_keys=True)}" for name, site in self.sites.items()}
        head = json.dumps({"round": self.round, "summary": self.summary, "updated": _now()}, sort_keys=True)[:-1]
        sites = ",\n".join(self._encoded[name] for name in sorted(self._encoded))
        atomic_write_text(self.path, f'{head}, "sites": {{\n{sites}\n}}}}\n')


def rounds_text(rounds: list[int]) -> str:
    """``[2, 3, 4, 7]`` as ``"rounds 2-4, 7"``."""
    spans: list[list[int]] = []
    for r in sorted(rounds):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
    return f"round{'s' if len(rounds) > 1 else ''} {text}"


def without_text(without: dict[str, dict[str, str]], nodes: dict[str, int | None]) -> str:
    """One line naming each site a base model lacks, its node, the rounds and the last reason."""
    parts = []
    for name, missed in sorted(without.items()):
        rounds = sorted(int(r) for r in missed)
        node = f" (node {nodes[name]})" if nodes.get(name) is not None else ""
        parts.append(f"{name}{node}: {rounds_text(rounds)}, {missed[str(rounds[-1])]}")
    return f"the base model was trained without {len(without)} site(s) in some rounds: " + "; ".join(parts)
