"""The README as a reader pastes it: its fenced blocks, and one working folder where they run in order.

A fenced ```bash or ```python block of README.md either runs, or the line
right before its fence is ``<!-- not run in tests: REASON -->``. The blocks
that run, run in README order in one fresh working folder: a later block may
use what an earlier one wrote (``runs/hospitals``, ``site-home``). That
folder holds a copy of the repository's ``examples/``, because README paths
are relative to the repository's root. ``fedmeta`` and ``python`` resolve to
this interpreter and this checkout.

One session serves the whole test run (the ``readme_session`` fixture of
``conftest.py``): ``test_readme.py`` runs every block and
``test_bring_your_own_data.py`` checks what the bring-your-own-data block
made, without running it twice.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUN_LANGUAGES = ("bash", "python")
# Other names for the same languages: a block tagged with one of them would escape this test.
ALIASES = ("sh", "shell", "console", "zsh", "py", "python3", "pycon")
MARKER = re.compile(r"^\s*<!--\s*not run in tests:(?P<reason>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
BLOCK_TIMEOUT_S = 1800  # the bring-your-own-data block trains, personalizes seven clinics and evaluates; a bound, not an expectation


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run_reason: str | None  # None: no marker; "" : a marker without a reason

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.lang}"


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block (any language), with the not-run marker on the line right before it, if any."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent = opening["indent"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README.md line {i + 1}: fence never closed"
        body = [line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1 : end]]
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        reason = marker["reason"].strip() if marker else None
        blocks.append(Block(i + 1, opening["lang"], "\n".join(body) + "\n", reason))
        i = end + 1
    return blocks


def readme_blocks() -> list[Block]:
    return [b for b in fenced_blocks(README.read_text()) if b.lang in RUN_LANGUAGES]


RUNNABLE = [b for b in readme_blocks() if b.not_run_reason is None]


class PastingSession:
    """One working folder where the README's runnable blocks run in order, each at most once."""

    def __init__(self, root: Path):
        self.root = root
        self.folder = root / "work"
        self.folder.mkdir()
        shutil.copytree(REPO / "examples", self.folder / "examples", ignore=shutil.ignore_patterns("__pycache__"))
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for name, command in {"fedmeta": f'"{sys.executable}" -m fedmeta.cli', "python": f'"{sys.executable}"'}.items():
            shim = bin_dir / name
            shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
            shim.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMETA_")}  # a reader's defaults: ./site-home
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.results: dict[int, subprocess.CompletedProcess | None] = {}

    def run_through(self, block: Block) -> subprocess.CompletedProcess:
        """Run every runnable block up to and including ``block`` that has not run yet."""
        for earlier in RUNNABLE[: RUNNABLE.index(block) + 1]:
            if earlier.line not in self.results:
                self.results[earlier.line] = self._run(earlier)
        return self.results[block.line]

    def _run(self, block: Block) -> subprocess.CompletedProcess:
        script = self.root / f"readme_{block.id}.{'sh' if block.lang == 'bash' else 'py'}"
        script.write_text(block.code)
        command = ["bash", "-euo", "pipefail", str(script)] if block.lang == "bash" else [sys.executable, str(script)]
        try:
            return subprocess.run(command, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(command, f"timed out after {BLOCK_TIMEOUT_S} s", e.stdout or "", e.stderr or "")

    def failed_before(self, block: Block) -> list[int]:
        return [b.line for b in RUNNABLE[: RUNNABLE.index(block)] if self.results[b.line].returncode != 0]


def marked_block(marker: str) -> Block:
    """The runnable block right after the line ``<!-- marker -->``."""
    lines = README.read_text().splitlines()
    for block in RUNNABLE:
        if lines[block.line - 2].strip() == f"<!-- {marker} -->":
            return block
    raise AssertionError(f"README.md has no runnable block after <!-- {marker} -->")
