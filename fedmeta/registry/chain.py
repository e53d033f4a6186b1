"""The audit log's hash chain: how an entry is hashed, how the chain is walked, anchored and migrated.

Every entry stores ``prev_hash`` and ``row_hash = sha256(prev_hash + canonical
JSON of the entry)``; the first entry's ``prev_hash`` is :data:`GENESIS`.
An entry without a hash is a break, like a broken link or a rewritten entry:
otherwise removing every hash would switch the check off. The one exception
is a log written before the chain existed; :func:`legacy_hashes` hashes it once,
when the registry is first opened by a version with the chain, and the
registry records an entry saying so.

A chain rebuilt consistently by someone who can write the file, or cut
after its newest entries, still walks cleanly. Only a head recorded elsewhere
(:class:`~fedmeta.registry.interface.ChainHead`, ``COUNT:SHA256``) detects
that: :func:`reaches` checks that entry number COUNT still has that hash, so a
chain that has grown past the recorded head still passes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3

from fedmeta.registry.interface import ChainHead

GENESIS = "0" * 64  # prev_hash of the first audit entry
MIGRATE = "migrate"  # the action of the entry that records the hashing of a pre-chain log

AUDIT_FIELDS = ("id", "at", "actor", "action", "site", "version", "sha256", "detail")


def canonical(row: dict) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def link(prev_hash: str, row: dict) -> str:
    """The ``row_hash`` of an entry with these fields after ``prev_hash``."""
    return digest(prev_hash + canonical(row))


def fields(row: sqlite3.Row, names: tuple[str, ...]) -> dict:
    return {name: row[name] for name in names}


def describe(row: sqlite3.Row) -> str:
    """``audit entry #5 (register v3)``: how a problem names the entry."""
    return f"audit entry #{row['id']} ({row['action']}{'' if row['version'] is None else ' v' + str(row['version'])})"


def walk(rows: list[sqlite3.Row]) -> tuple[list[tuple[int, str]], list[str]]:
    """Each entry's id and its hash recomputed from GENESIS over the entries' contents, and every break found.

    The recomputed hashes do not trust any stored hash, so an anchor is
    compared with what the entries say, not with what they claim. Problems
    resume from the stored hash after a break, so one rewritten entry is
    reported once, not once per later entry.
    """
    recomputed, problems = [], []
    head, stored_head = GENESIS, GENESIS
    for row in rows:
        entry = fields(row, AUDIT_FIELDS)
        head = link(head, entry)
        recomputed.append((row["id"], head))
        if row["prev_hash"] is None or row["row_hash"] is None:
            problems.append(f"{describe(row)} has no hash: it was written or altered outside fedmeta")
            stored_head = head
            continue
        if row["prev_hash"] != stored_head:
            problems.append(f"{describe(row)}: the chain breaks before it (an entry was removed, inserted or rewritten)")
        if row["row_hash"] != link(row["prev_hash"], entry):
            problems.append(f"{describe(row)} was rewritten: its contents do not match its hash")
        stored_head = row["row_hash"]
    return recomputed, problems


def reaches(recomputed: list[tuple[int, str]], expect: ChainHead) -> str | None:
    """None if entry number ``expect.entries`` of the chain has ``expect.hash``; else why not, in one line."""
    if expect.entries == 0:
        return None if expect.hash == GENESIS else f"the expected head {expect.short} is not a chain head: an empty chain's hash is {GENESIS[:16]}..."
    if len(recomputed) < expect.entries:
        return (f"the audit log has {len(recomputed)} entries, fewer than the {expect.entries} of the expected head {expect.short}: "
                "its newest entries were removed")
    entry_id, actual = recomputed[expect.entries - 1]
    if actual != expect.hash:
        return (f"audit entry #{entry_id} no longer has the expected head's hash ({actual[:16]}..., expected {expect.hash[:16]}...): "
                "the log was rewritten at or before it")
    return None


def legacy_hashes(rows: list[sqlite3.Row], columns_added: bool) -> list[tuple[str, str, int]]:
    """``(prev_hash, row_hash, id)`` for each entry of a log written before the chain; empty when there is nothing to migrate.

    A log is migrated at most once, and only if it is from before the chain:
    its hash columns were just added, or (a registry opened by a version that
    chained old entries as it read them) the first hashed entry's
    ``prev_hash`` already commits to the unhashed ones, so hashing them
    changes nothing that entry vouched for. A log whose hashes were removed
    afterwards matches neither and is left for :func:`walk` to report.
    """
    unhashed = 0
    while unhashed < len(rows) and rows[unhashed]["prev_hash"] is None and rows[unhashed]["row_hash"] is None:
        unhashed += 1
    if unhashed == 0 or any(row["action"] == MIGRATE for row in rows):
        return []
    head, hashes = GENESIS, []
    for row in rows[:unhashed]:
        hashes.append((head, link(head, fields(row, AUDIT_FIELDS)), row["id"]))
        head = hashes[-1][1]
    chained_later = unhashed < len(rows) and rows[unhashed]["prev_hash"] == head
    return hashes if columns_added or chained_later else []
