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
import subprocess
import sys

import pandas as pd
import pytest

from readme_session import ALIASES, MARKER, README, REPO, RUN_LANGUAGES, RUNNABLE, Block, PastingSession, fenced_blocks


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


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.slow
@pytest.mark.xdist_group("readme")  # one pasting folder: every block in one worker, in order
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block_runs_when_pasted(readme_session: PastingSession, block: Block):
    result = readme_session.run_through(block)
    earlier = readme_session.failed_before(block)
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
