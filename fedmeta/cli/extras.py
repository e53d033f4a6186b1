"""Which commands need the training extra, and the one line a serving-only install prints for them.

A site box that only serves installs ``fedmeta[serve]``: no torch, Flower,
Ray, scikit-learn or matplotlib. The serving commands (:data:`SERVING_COMMANDS`)
never import them; a training command (:data:`TRAINING_COMMANDS`) first
checks that the training extra's packages are installed, and names the extra
if one is missing, instead of failing deep inside an import.
"""

from __future__ import annotations

import re
from importlib import metadata

SERVING_COMMANDS = frozenset({"serve", "predict", "models", "keys", "version", "contributions"})
TRAINING_COMMANDS = frozenset({"console", "synth", "schema", "train", "heads", "personalize", "demo", "evaluate", "report", "certs", "launch", "sites"})
TRAINING_EXTRA = "train"
INSTALL_TRAINING = 'pip install "fedmeta[train]"'
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def training_requirements() -> list[str]:
    """The distributions the training extra installs, read from fedmeta's own metadata (pyproject.toml decides them once)."""
    names = []
    for requirement in metadata.requires("fedmeta") or []:
        spec, _, marker = requirement.partition(";")
        if re.search(rf"extra\s*==\s*[\"']{TRAINING_EXTRA}[\"']", marker):
            name = _NAME.match(spec.strip()).group(0)
            if name.lower() != "fedmeta":
                names.append(name)
    return names


def missing_training_package() -> str | None:
    """The first package of the training extra that is not installed; None when the extra is complete."""
    try:
        wanted = training_requirements()
    except metadata.PackageNotFoundError:  # a source tree that was never installed: nothing to compare against
        return None
    for name in wanted:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return name
    return None


def training_extra_problem(command: str) -> str | None:
    """One line naming the extra ``fedmeta <command>`` needs, if it is not installed; else None."""
    if command not in TRAINING_COMMANDS:
        return None
    missing = missing_training_package()
    if missing is None:
        return None
    return f"fedmeta {command} needs the training extra ({missing} is not installed): {INSTALL_TRAINING}"
