"""The configuration reference: every key of a run configuration, its default and what it does.

docs/configuration.md's table is :func:`markdown`'s output (a test keeps them equal), so
a key added to :mod:`fedmeta.fl.config` without a description, or described
differently, shows up as a failing test rather than as a stale document.

>>> next(r for r in rows() if r[0] == "server.lr")
('server.lr', '1.0', 'server learning rate beta')
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from fedmeta.fl.config import RunConfig


def _toml(value: object) -> str:
    """A default as it would be written in the TOML file (``unset`` for none)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def rows(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, description)`` for every setting, sections flattened to dotted keys, in declaration order."""
    out = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += rows(kind, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", _toml(field.get_default(call_default_factory=True)), field.description or ""))
    return out


def markdown() -> str:
    """The reference as a Markdown table."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {description.replace('|', '/')} |" for key, default, description in rows()]
    return "\n".join(lines) + "\n"
