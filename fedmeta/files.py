"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

Every artifact fedmeta writes (schemas, checkpoints, manifests, metrics)
goes through here, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to a temporary file, fsync it, rename it over ``path``: never half-written.

    ``private`` keeps the file readable by its owner only (0600) from its first byte on,
    for keys and credentials; otherwise it gets the usual permissions (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        if not private:
            os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, private: bool = False) -> None:
    atomic_write_bytes(path, text.encode(), private)


def atomic_write_json(path: str | Path, obj: object, private: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True), private)
