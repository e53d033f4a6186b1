"""The README works when pasted: every bash and Python block runs, or says why it cannot.

A fenced ```bash or ```python block of README.md either runs here, or the line
right before its fence is ``<!-- not run in tests: REASON -->``. The blocks
that run, run in README order in one fresh working folder, as a reader pastes
them: a later block may use what an earlier one wrote (``runs/hospitals``,
``site-home``). That folder holds a copy of the repository's ``examples/``,
because README paths are relative to the repository's root. ``fedmeta`` and
``python`` resolve to this interpreter and this checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUN_LANGUAGES = ("bash", "python")
# Other names for the same languages: a block tagged with one of them would escape this test.
ALIASES = ("sh", "shell", "console", "zsh", "py", "python3", "pycon")
MARKER = re.compile(r"^\s*<!--\s*not run in tests:(?P<reason>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
BLOCK_TIMEOUT_S = 900  # two Flower simulations start Ray; on a busy machine one took 60 s


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


def test_every_block_runs_or_is_marked_with_a_reason():
    text = README.read_text()
    blocks = fenced_blocks(text)
    unreasoned = [b.line for b in blocks if b.not_run_reason == ""]
    assert not unreasoned, f"README.md lines {unreasoned}: '<!-- not run in tests: ... -->' needs a reason"
    aliased = [(b.line, b.lang) for b in blocks if b.lang in ALIASES]
    assert not aliased, f"README.md {aliased}: tag shell blocks ```bash and Python blocks ```python, so that they are tested"
    fence_lines = {b.line - 1 for b in blocks}  # 1-based line numbers of the lines right before fences
    stray = [n for n, line in enumerate(text.splitlines(), 1) if MARKER.match(line) and n not in fence_lines]
    assert not stray, f"README.md lines {stray}: a not-run marker must be on the line right before its block's fence"
    marked_other = [(b.line, b.lang) for b in blocks if b.not_run_reason is not None and b.lang not in RUN_LANGUAGES]
    assert not marked_other, f"README.md {marked_other}: only bash and python blocks run, so only they take a not-run marker"
    assert any(b.lang == "bash" for b in RUNNABLE) and any(b.lang == "python" for b in RUNNABLE), "the parser found no runnable block"


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


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> PastingSession:
    return PastingSession(tmp_path_factory.mktemp("readme"))


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block_runs_when_pasted(session: PastingSession, block: Block):
    result = session.run_through(block)
    earlier = session.failed_before(block)
    assert result.returncode == 0, (
        f"README.md line {block.line} ({block.lang}) failed: exit {result.returncode}"
        + (f" (after the failed blocks at lines {earlier})" if earlier else "")
        + f"\n--- block ---\n{block.code}--- stdout (end) ---\n{tail(result.stdout)}\n--- stderr (end) ---\n{tail(result.stderr)}\n"
        + f"If the block cannot run in a test, put '<!-- not run in tests: REASON -->' on the line right before its fence."
    )


def test_the_shipped_sepsis_rows_are_what_their_script_writes(tmp_path):
    from fedmeta.data.synthetic import hospital_schema

    shipped = REPO / "examples" / "hospitals" / "sepsis_rows.csv"
    subprocess.run([sys.executable, str(shipped.with_suffix(".py")), str(tmp_path / "sepsis_rows.csv")], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert (tmp_path / "sepsis_rows.csv").read_bytes() == shipped.read_bytes(), (
        "examples/hospitals/sepsis_rows.csv differs from what its script writes now: rerun python examples/hospitals/sepsis_rows.py "
        "and update the README's description of the file"
    )
    rows = pd.read_csv(shipped)
    assert list(rows.columns) == [f.name for f in hospital_schema().features] + ["sepsis"]
    assert set(rows["sepsis"]) == {0, 1}
