"""What a site tells its coordinator about its mapping at the roll call, checked, and the table the coordinator reads.

A site that keeps its own dialect translates it with its ``mapping.json``
(:mod:`fedmeta.data.mapping`). At the roll call it answers, besides its name,
tasks and sums, :func:`fedmeta.data.mapping.status` of that mapping as JSON
under :data:`STATUS`: the mapping's digest and how many columns it maps to a
schema column, converts (scale or offset), recodes (values) and holds under
review. No column name or value leaves the site. A site without a mapping
answers digest ``null`` and zeros.

The server trusts none of it (:func:`validated`): exactly those five fields,
the digest ``null`` or 8-64 lowercase hex digits, each count an integer from
0 to the schema's feature and label columns (no mapping can map more), and
no more columns converted, recoded or under review than mapped. A malformed
status is one log line naming the site, and its row in :func:`table` reads
"not reported"; the run goes on.

>>> print("\\n".join(table({"north": None, "st-marys": {"digest": "3f2a9c1b0d4e77aa", "mapped": 5, "converted": 1, "recoded": 3, "review": 0}})))
site      mapping       mapped  converted  recoded  under review
north     not reported
st-marys  3f2a9c1b0d4e       5          1        3             0
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedmeta.data.mapping import Mapping, status
from fedmeta.data.schema import Schema

#: The key of a roll-call answer's site record that carries the status (JSON text).
STATUS = "mapping-status"
COUNTS = ("mapped", "converted", "recoded", "review")
#: Longer than any honest status (five fields, a 64-digit digest and four counts); longer text is not even parsed.
MAX_TEXT = 256
#: The ceiling when the server does not know the schema; :func:`column_limit` is the real bound.
MAX_COLUMNS = 10_000
_DIGEST = re.compile(r"[0-9a-f]{8,64}")
#: Hex digits of the digest the table shows: enough to tell two sites' mappings apart at a glance.
SHORT_DIGEST = 12


class StatusError(ValueError):
    """A roll-call mapping status that cannot be a real one."""


def site_status(mapping_path: str | Path | None) -> str:
    """A site's answer: the status of the mapping at ``mapping_path`` (``None``: the site has none), as JSON."""
    return json.dumps(status(Mapping.load(mapping_path) if mapping_path is not None else None), sort_keys=True)


def column_limit(schema: Schema) -> int:
    """The most columns a mapping can map to ``schema``: its features plus its tasks' label columns."""
    return len(schema.features) + len({task.label for task in schema.tasks})


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validated(text, limit: int = MAX_COLUMNS) -> dict[str, int | str | None]:
    """The status in ``text`` if it can be real, else :class:`StatusError` saying which field is wrong (one line).

    >>> validated('{"digest": null, "mapped": 0, "converted": 0, "recoded": 0, "review": 0}')["mapped"]
    0
    >>> validated('{"digest": null, "mapped": 9, "converted": 0, "recoded": 0, "review": 0}', limit=5)
    Traceback (most recent call last):
    ...
    fedmeta.fl.mapping_status.StatusError: mapped = 9 is not an integer from 0 to 5
    """
    if not isinstance(text, str):
        raise StatusError(f"not JSON text but {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise StatusError(f"{len(text)} characters, more than {MAX_TEXT}")
    try:
        data = json.loads(text)
    except ValueError:
        raise StatusError("not JSON") from None
    if not isinstance(data, dict) or set(data) != {"digest", *COUNTS}:
        fields = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise StatusError(f"fields {_shown(fields)}, expected digest, {', '.join(COUNTS)}")
    digest = data["digest"]
    if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        raise StatusError(f"digest {_shown(digest)} is neither null nor 8-64 lowercase hex digits")
    for field in COUNTS:
        value = data[field]
        # bool is an int in Python, and JSON's true would otherwise count as one column.
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise StatusError(f"{field} = {_shown(value)} is not an integer from 0 to {limit}")
    for field in COUNTS[1:]:
        if data[field] > data["mapped"]:
            raise StatusError(f"{field} = {data[field]} is more than mapped = {data['mapped']}")
    if digest is None and data["mapped"]:
        raise StatusError(f"mapped = {data['mapped']} without a mapping (digest null)")
    return {"digest": digest, **{field: data[field] for field in COUNTS}}


def cell(found: dict | None) -> str:
    """One site's status in a few words, for ``fedmeta sites``: its short digest and what a person still has to look at.

    >>> cell({"digest": "de87f5a65ffe" + "0" * 52, "mapped": 3, "converted": 1, "recoded": 1, "review": 1}), cell(None)
    ('de87f5a65ffe: 3 mapped, 1 under review', 'not reported')
    """
    if found is None:
        return "not reported"
    if not found["digest"]:
        return "none"
    return f"{found['digest'][:SHORT_DIGEST]}: {found['mapped']} mapped" + (f", {found['review']} under review" if found["review"] else "")


def table(statuses: dict[str, dict | None]) -> list[str]:
    """The coordinator's table, one line per site (sorted by name): site, short digest, mapped, converted, recoded, under review.

    A site whose status is ``None`` (malformed, or an older site that sends none) reads "not reported";
    a site without a mapping reads "none".
    """
    header = ["site", "mapping", "mapped", "converted", "recoded", "under review"]
    rows = []
    for site, found in sorted(statuses.items()):
        if found is None:
            rows.append([site, "not reported"])
            continue
        digest = found["digest"][:SHORT_DIGEST] if found["digest"] else "none"
        rows.append([site, digest, *(str(found[field]) for field in COUNTS)])
    widths = [max(len(row[i]) for row in [header, *rows] if i < len(row)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Text columns to the left, counts to the right under their headings.
        parts = [cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(cells)]
        return "  ".join(parts).rstrip()

    return [line(header), *(line(row) for row in rows)]
