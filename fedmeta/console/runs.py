"""What the console knows about a run: read from its run folder alone, so every run shows (the console's, ``fedmeta train``'s, ``flwr run``'s).

A run folder (:mod:`fedmeta.fl.run_dir`) says everything the pages show:
``config.toml`` (rounds, algorithm, protections), ``metrics.jsonl`` (a row per
round and site), ``sites.json`` (the roster), ``regions.json``,
``contributions.json``, ``base_model.pt`` and ``.lock``, held by the process
training in it. Nothing here imports torch or opens a checkpoint.

Status:

- ``running``: some process holds the folder's lock (or the console started a
  process for it that has not exited yet: ``starting``);
- ``finished``: a base model was written after the last configured round;
- ``stopped``: rounds were checkpointed but the run is not finished and
  nothing trains in it (it can be resumed);
- ``failed``: the console's process for it exited with an error, or nothing was
  ever checkpointed.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

#: A run's name is its folder's name: one path component, no escapes.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LAUNCH_LOG = "console.log"  # a launched run's output
LAUNCH_EXIT = "console-exit.json"  # its exit: {"code": n, "ended": ...}, written by fedmeta.console.launcher


class RunNotFound(LookupError):
    pass


def check_name(name: str) -> str:
    """``name`` if it is a valid run name; else ValueError in one line."""
    if not NAME.fullmatch(name or "") or name in (".", ".."):
        raise ValueError(f"run name {name[:80]!r} is not valid: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return name


@dataclass
class _SiteTally:
    """What the sites table needs of a site's training rows, kept as they are read rather than the rows themselves."""

    rounds: set[int] = field(default_factory=set)
    replies: int = 0
    seconds: float = 0.0
    last: dict = field(default_factory=dict)

    def add(self, row: dict) -> None:
        self.rounds.add(row.get("round"))
        self.replies += 1
        self.seconds += float(row.get("seconds", 0.0))
        self.last = row


@dataclass
class _Rows:
    """``metrics.jsonl`` read incrementally: only the bytes appended since the last read are parsed, into the run's
    own rows (site ``*``: a few per round) and a tally per site, so that a poll costs the run's rounds, not its rows
    (a row per site per round: a million for 10,000 sites and 100 rounds)."""

    offset: int = 0
    identity: tuple[int, int] | None = None
    server: list[dict] = field(default_factory=list)
    sites: dict[str, _SiteTally] = field(default_factory=dict)

    def add(self, row: dict) -> None:
        site = row.get("site")
        if site == "*":
            self.server.append(row)
        elif site is not None and row.get("phase") == "train":
            self.sites.setdefault(str(site), _SiteTally()).add(row)


_cache: dict[Path, _Rows] = {}


def metric_rows(run_dir: Path) -> _Rows:
    """``metrics.jsonl`` as read so far (a partial last line, still being written, is left for the next read)."""
    path = run_dir / "metrics.jsonl"
    try:
        st = path.stat()
    except FileNotFoundError:
        _cache.pop(path, None)
        return _Rows()
    cached = _cache.get(path)
    if cached is None or cached.identity != (st.st_ino, st.st_dev) or st.st_size < cached.offset:
        cached = _cache[path] = _Rows(identity=(st.st_ino, st.st_dev))  # new, replaced or truncated (a resume): read again
    if st.st_size > cached.offset:
        with path.open("rb") as f:
            f.seek(cached.offset)
            chunk = f.read(st.st_size - cached.offset)
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a damaged line: the rest of the file still reads
            if isinstance(row, dict):
                cached.add(row)
        cached.offset += end
    return cached


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError, OSError):
        return None


def config_of(run_dir: Path) -> dict:
    try:
        return tomllib.loads((run_dir / "config.toml").read_text())
    except (FileNotFoundError, tomllib.TOMLDecodeError, OSError):
        return {}


def lock_holder(run_dir: Path) -> dict | None:
    """Who trains in the run folder (the holder its ``.lock`` names), or None when nobody does.

    The console never takes the lock itself, even for a moment: a run
    starting at that instant would be refused. A holder writes its name into
    the file and empties it on release; a name left by a killed process is
    recognized by its pid being gone from this host.
    """
    try:
        text = (run_dir / ".lock").read_text()
    except (FileNotFoundError, OSError):
        return None
    if not text.strip():
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
    return holder


def protections(config: dict) -> dict:
    privacy, secure = config.get("privacy", {}), config.get("secure", {})
    compression = config.get("compression", {})
    return {
        "dp": privacy.get("clip_norm") is not None,
        "secagg": bool(secure.get("secagg", False)),
        "rule": config.get("aggregation", {}).get("rule", "mean"),
        "compression": compression.get("upload", "none"),
        "max_epsilon": privacy.get("max_epsilon"),
    }


def summary(run_dir: Path, launched: dict | None = None) -> dict:
    """The runs table's row: status, round r of R, elapsed and estimated seconds left, algorithm, protections, ε spent."""
    config = config_of(run_dir)
    train = [r for r in metric_rows(run_dir).server if r.get("phase") == "train"]
    rounds = int(config.get("rounds", 0) or 0)
    done = max((int(r["round"]) for r in train), default=0)
    elapsed = float(train[-1].get("elapsed", 0.0)) if train else 0.0
    seconds = [float(r.get("seconds", 0.0)) for r in train[1:]] or [float(r.get("seconds", 0.0)) for r in train]
    holder = lock_holder(run_dir)
    exit_ = _json(run_dir / LAUNCH_EXIT)
    status = _status(run_dir, holder, exit_, launched, done, rounds)
    left = (rounds - done) * (sum(seconds) / len(seconds)) if status == "running" and seconds and rounds > done else None
    last = train[-1] if train else {}
    return {
        "name": run_dir.name, "status": status, "round": done, "rounds": rounds, "elapsed": round(elapsed, 1),
        "seconds_left": None if left is None else round(left, 1), "algorithm": config.get("algorithm", {}).get("name", "reptile"),
        "protections": protections(config), "epsilon": last.get("epsilon"), "delta": last.get("delta"),
        "launched": launched is not None or exit_ is not None, "exit_code": exit_.get("code") if exit_ else None,
        "holder": holder,
    }


def _status(run_dir: Path, holder: dict | None, exit_: dict | None, launched: dict | None, done: int, rounds: int) -> str:
    if holder is not None:
        return "running"
    if launched is not None and launched.get("alive"):
        return "starting"
    if (run_dir / "base_model.pt").exists() and done >= rounds:
        return "finished"
    if exit_ is not None and exit_.get("code") not in (0, 130):
        return "failed"
    if (run_dir / "checkpoint.pt").exists():
        return "stopped"
    return "failed" if exit_ is not None else "stopped"


def sites(run_dir: Path) -> list[dict]:
    """One row per site: rows per task, rounds it trained in, last reply, mean seconds per round, failures, status, region, mapping, contribution."""
    roster = (_json(run_dir / "sites.json") or {}).get("sites", {})
    regions = {site: region for region, entry in ((_json(run_dir / "regions.json") or {}).get("regions") or {}).items() for site in entry.get("sites", [])}
    contributions = (_json(run_dir / "contributions.json") or {}).get("sites", {})
    trained = metric_rows(run_dir).sites
    out = []
    for name in sorted(set(roster) | set(trained)):
        entry, tally = roster.get(name, {}), trained.get(name, _SiteTally())
        last = tally.last
        missed = entry.get("missed", {})
        mapping = entry.get("mapping") or {}
        contribution = contributions.get(name)
        out.append({
            "site": name, "status": entry.get("status", "trained" if tally.replies else "unknown"),
            "rows": {k.removeprefix("examples."): int(v) for k, v in last.items() if k.startswith("examples.")},
            "rounds": len(tally.rounds), "last_round": entry.get("last_round"), "last_contact": entry.get("last_contact"),
            "seconds": round(tally.seconds / tally.replies, 3) if tally.replies else None,
            "failures": len(missed), "last_failure": missed[max(missed, key=int)] if missed else None,
            "region": regions.get(name), "mapping": "review" if mapping.get("review") else ("mapped" if mapping.get("mapped") else None),
            "contribution": contribution.get("contribution") if contribution else None,
        })
    return out


def series(run_dir: Path, since: int = 0) -> dict:
    """Per-round series after round ``since``: the training loss, and each evaluated metric (``<task>.<global|personalized>.<metric>``)."""
    loss = {"round": [], "loss": []}
    evaluation: dict[str, list] = {"round": []}
    for row in metric_rows(run_dir).server:
        if int(row.get("round", 0)) <= since:
            continue
        if row.get("phase") == "train" and "loss" in row:
            loss["round"].append(int(row["round"]))
            loss["loss"].append(_finite(row["loss"]))
        elif row.get("phase") == "evaluate":
            evaluation["round"].append(int(row["round"]))
            n = len(evaluation["round"])
            for key, value in row.items():
                if key.count(".") == 2 and key.split(".")[1] in ("global", "personalized"):
                    evaluation.setdefault(key, [None] * (n - 1))
            for key in evaluation:
                if key != "round":
                    evaluation[key].append(_finite(row.get(key)))
    return {"train": loss, "evaluation": evaluation}


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def events(run_dir: Path, limit: int = 200) -> list[dict]:
    """What went wrong or was refused, newest last: each site's missed rounds (roster), and the warning lines of a launched run's log."""
    out = []
    for name, entry in ((_json(run_dir / "sites.json") or {}).get("sites", {})).items():
        for round_, reason in (entry.get("missed") or {}).items():
            out.append({"round": int(round_), "site": name, "event": reason})
    out.sort(key=lambda e: (e["round"], e["site"]))
    log = run_dir / LAUNCH_LOG
    if log.exists():
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 256_000))
            tail = f.read().decode("utf-8", "replace").splitlines()
        for line in tail:
            if re.search(r"\b(WARNING|ERROR|error:|refused|failed|dropped)\b", line):
                out.append({"round": None, "site": None, "event": line.strip()[:300]})
    return out[-limit:]


def models(run_dir: Path) -> list[dict]:
    """The base models written: the global one and each regional one, with its lineage."""
    out = []
    base = run_dir / "base_model.pt"
    if base.exists():
        out.append({"level": "global", "path": str(base), "bytes": base.stat().st_size, "round": _last_round(run_dir)})
    regions = _json(run_dir / "regions.json") or {}
    for region, entry in sorted((regions.get("regions") or {}).items()):
        path = run_dir / "regions" / region / "base_model.pt"
        out.append({"level": "region", "region": region, "path": str(path) if path.exists() else None, "parent": "global",
                    "global_round": regions.get("global_round"), "rounds": entry.get("rounds"), "sites": len(entry.get("sites", [])),
                    "note": entry.get("note") or None})
    return out


def _last_round(run_dir: Path) -> int:
    return max((int(r["round"]) for r in metric_rows(run_dir).server if r.get("phase") == "train"), default=0)


def account(run_dir: Path) -> dict:
    """The privacy account as the last round logged it, or a note that the run has no DP."""
    config = config_of(run_dir)
    p = protections(config)
    last = next((r for r in reversed(metric_rows(run_dir).server) if "epsilon" in r), None)
    if not p["dp"]:
        return {"dp": False, "note": "no differential privacy in this run"}
    return {"dp": True, "epsilon": last.get("epsilon") if last else None, "epsilon_known_sample": last.get("epsilon_known_sample") if last else None,
            "delta": last.get("delta") if last else config.get("privacy", {}).get("delta"), "max_epsilon": p["max_epsilon"],
            "noise_multiplier": config.get("privacy", {}).get("noise_multiplier"), "clip_norm": config.get("privacy", {}).get("clip_norm")}


def detail(run_dir: Path, launched: dict | None = None) -> dict:
    return {**summary(run_dir, launched), "sites": sites(run_dir), "account": account(run_dir), "events": events(run_dir), "models": models(run_dir)}
