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

from fedmeta.files import atomic_write_json

FILE = "sites.json"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Roster:
    """Per-site status of one run, saved as ``sites.json`` in its run folder."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / FILE
        self.sites: dict[str, dict] = {}
        self.round = 0
        self.summary: dict | None = None

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
        return roster

    def _site(self, name: str, node: int | None) -> dict:
        site = self.sites.setdefault(name, {"node": node, "status": "connected", "last_contact": None, "last_round": None, "missed": {}, "mapping": None})
        if node is not None:
            site["node"] = node
        return site

    def record(self, round_: int, node_sites: dict[int, str], connected: list[int], asked: list[str], replied: list[str], failed: list[tuple[str, str]]) -> None:
        """One exchange of round ``round_``: the sites connected, asked, replying, and failing (``(site, reason)``)."""
        self.round = max(self.round, round_)
        now = _now()
        for node, name in node_sites.items():
            self._site(name, None)
        for node in connected:  # a site restarted under a new node id is known by both: the connected one is current
            if node in node_sites:
                self.sites[node_sites[node]]["node"] = node
        online = {node_sites[n] for n in connected if n in node_sites}
        reasons = dict(failed)
        for name, site in self.sites.items():
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

    def record_mappings(self, statuses: dict[str, dict | None]) -> None:
        """Each site's roll-call mapping status (checked by the server; ``None``: not reported)."""
        for name, status in statuses.items():
            self._site(name, None)["mapping"] = status

    def trained_without(self) -> dict[str, dict[str, str]]:
        """``{site: {round: reason}}`` for every site some round went without."""
        return {name: site["missed"] for name, site in sorted(self.sites.items()) if site["missed"]}

    def save(self, summary: dict | None = None) -> None:
        if summary is not None:
            self.summary = summary
        atomic_write_json(self.path, {"round": self.round, "updated": _now(), "sites": self.sites, "summary": self.summary})


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
