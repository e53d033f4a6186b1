"""The README and docs/ work when pasted: every bash and Python block runs, or says why it cannot; every link lands.

A fenced ```bash or ```python block of README.md or of a page of docs/ either
runs here, or the line right before its fence is ``<!-- not run in tests:
REASON -->``. The blocks that run, run in one fresh working folder, README.md
first and then docs/ page by page, as a reader pastes them: a later block may
use what an earlier one wrote (``runs/hospitals``, ``site-home``). A block
marked ``<!-- serves in tests: NOTE -->`` is started as a server on a free port
and stopped after the block that follows it (:mod:`readme_session`). The
README stays a front door: under 300 lines, with the reference in docs/.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from urllib.parse import unquote

import pandas as pd
import pytest

from readme_session import ALIASES, MARKER, PORT_IN_TEXT, README, REPO, RUN_LANGUAGES, RUNNABLE, SERVES, Block, PastingSession, fenced_blocks, pages

README_MAX_LINES = 300
LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_block_runs_or_is_marked_with_a_reason(page):
    text = page.read_text()
    name = page.relative_to(REPO)
    blocks = fenced_blocks(text, page)
    unreasoned = [b.line for b in blocks if b.not_run_reason == ""]
    assert not unreasoned, f"{name} lines {unreasoned}: '<!-- not run in tests: ... -->' needs a reason"
    aliased = [(b.line, b.lang) for b in blocks if b.lang in ALIASES]
    assert not aliased, f"{name} {aliased}: tag shell blocks ```bash and Python blocks ```python, so that they are tested"
    fence_lines = {b.line - 1 for b in blocks}  # 1-based line numbers of the lines right before fences
    stray = [n for n, line in enumerate(text.splitlines(), 1) if (MARKER.match(line) or SERVES.match(line)) and n not in fence_lines]
    assert not stray, f"{name} lines {stray}: a marker must be on the line right before its block's fence"
    marked_other = [(b.line, b.lang) for b in blocks if (b.not_run_reason is not None or b.serves) and b.lang not in RUN_LANGUAGES]
    assert not marked_other, f"{name} {marked_other}: only bash and python blocks run, so only they take a marker"
    runnable = [b for b in blocks if b.lang in RUN_LANGUAGES and b.not_run_reason is None]
    for i, b in enumerate(runnable):
        if b.serves:  # the server runs on a free port while the next block sends it requests
            assert i + 1 < len(runnable) and not runnable[i + 1].serves, f"{name} line {b.line}: a serving block needs a block of requests after it"
            assert PORT_IN_TEXT.search(b.code) and PORT_IN_TEXT.search(runnable[i + 1].code), (
                f"{name} line {b.line}: the server and its requests use port 8080 (--port 8080, 127.0.0.1:8080), which the tests replace by a free port"
            )


def test_the_parser_finds_runnable_blocks_of_both_languages():
    assert any(b.lang == "bash" for b in RUNNABLE) and any(b.lang == "python" for b in RUNNABLE), "the parser found no runnable block"
    assert any(b.page != README for b in RUNNABLE), "no block of docs/ runs"


def test_the_readme_is_a_front_door_under_300_lines():
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: move reference material into docs/ (at most {README_MAX_LINES - 1})"


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page) -> set[str]:
    in_fence, found = False, set()
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"^#{1,6}\s+(.*)$", line)):
            found.add(github_anchor(m[1]))
    return found


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.S | re.M)  # links inside code blocks are code
    broken = []
    for m in LINK.finditer(text):
        target = m["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / unquote(path)).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no file {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked})")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target} (no heading '#{fragment}' in {linked.name})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.slow
@pytest.mark.xdist_group("readme")  # one pasting folder: every block in one worker, in order
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block_runs_when_pasted(readme_session: PastingSession, block: Block):
    result = readme_session.run_through(block)
    earlier = readme_session.failed_before(block)
    assert result.returncode == 0, (
        f"{block.where} ({block.lang}) failed: exit {result.returncode}"
        + (f" (after the failed blocks at {earlier})" if earlier else "")
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
