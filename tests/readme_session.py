"""The README and docs/ as a reader pastes them: their fenced blocks, and one working folder where they run in order.

A fenced ```bash or ```python block of README.md or of a page of docs/ either
runs, or the line right before its fence is ``<!-- not run in tests: REASON
-->``. The blocks that run, run in one fresh working folder, the README's
first and then each page of docs/ in name order, each in page order: a later
block may use what an earlier one wrote (``runs/hospitals``, ``site-home``,
``site-homes/clinic_003``). That folder holds a copy of the repository's
``examples/``, because the pages' paths are relative to the repository's
root. ``fedmeta`` and ``python`` resolve to this interpreter and this checkout.

A block that serves until stopped (``fedmeta serve --port 8080``) runs when the
line right before its fence is ``<!-- serves in tests: NOTE -->``: it is started
in the background on a free 127.0.0.1 port instead of 8080, the next runnable
block of its page (the requests a reader sends from another terminal) runs with
``127.0.0.1:8080`` pointing at that port, and then the server is stopped.

One session serves the whole test run (the ``readme_session`` fixture of
``conftest.py``): ``test_readme.py`` runs every block and
``test_bring_your_own_data.py`` checks what the bring-your-own-data blocks
made, without running them twice.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
RUN_LANGUAGES = ("bash", "python")
# Other names for the same languages: a block tagged with one of them would escape this test.
ALIASES = ("sh", "shell", "console", "zsh", "py", "python3", "pycon")
MARKER = re.compile(r"^\s*<!--\s*not run in tests:(?P<reason>.*?)-->\s*$")
SERVES = re.compile(r"^\s*<!--\s*serves in tests:(?P<note>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
PAGE_PORT = "8080"  # the port the pages serve on; a test serves on a free one
PORT_IN_TEXT = re.compile(rf"(?<=127\.0\.0\.1:){PAGE_PORT}\b|(?<=--port ){PAGE_PORT}\b")
BLOCK_TIMEOUT_S = 1800  # the bring-your-own-data block trains, personalizes seven clinics and evaluates; a bound, not an expectation
SERVER_START_S = 120


def pages() -> list[Path]:
    """README.md, then every page of docs/ in name order: the order their blocks run in."""
    return [README, *sorted(DOCS.glob("*.md"))]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run_reason: str | None  # None: no marker; "" : a marker without a reason
    serves: bool = False  # marked <!-- serves in tests: ... -->

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)} line {self.line}"

    @property
    def id(self) -> str:
        prefix = "" if self.page == README else f"{self.page.stem}-"
        return f"{prefix}line{self.line}-{self.lang}"


def fenced_blocks(text: str, page: Path = README) -> list[Block]:
    """Every fenced block (any language), with the marker on the line right before it, if any."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent = opening["indent"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page.name} line {i + 1}: fence never closed"
        body = [line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1 : end]]
        before = lines[i - 1] if i > 0 else ""
        marker = MARKER.match(before)
        reason = marker["reason"].strip() if marker else None
        blocks.append(Block(page, i + 1, opening["lang"], "\n".join(body) + "\n", reason, serves=bool(SERVES.match(before))))
        i = end + 1
    return blocks


def page_blocks() -> list[Block]:
    return [b for page in pages() for b in fenced_blocks(page.read_text(), page) if b.lang in RUN_LANGUAGES]


RUNNABLE = [b for b in page_blocks() if b.not_run_reason is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PastingSession:
    """One working folder where the runnable blocks run in order, each at most once."""

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
        self.results: dict[tuple[Path, int], subprocess.CompletedProcess] = {}
        self.server: subprocess.Popen | None = None  # a serving block's process, until the block after it has run
        self.port: str | None = None

    def run_through(self, block: Block) -> subprocess.CompletedProcess:
        """Run every runnable block up to and including ``block`` that has not run yet."""
        for earlier in RUNNABLE[: RUNNABLE.index(block) + 1]:
            key = (earlier.page, earlier.line)
            if key not in self.results:
                self.results[key] = self._start(earlier) if earlier.serves else self._run(earlier)
                if not earlier.serves:
                    self.stop_server()
        return self.results[(block.page, block.line)]

    def _script(self, block: Block) -> list[str]:
        code = PORT_IN_TEXT.sub(self.port, block.code) if self.port else block.code
        script = self.root / f"readme_{block.id}.{'sh' if block.lang == 'bash' else 'py'}"
        script.write_text(code)
        return ["bash", "-euo", "pipefail", str(script)] if block.lang == "bash" else [sys.executable, str(script)]

    def _run(self, block: Block) -> subprocess.CompletedProcess:
        command = self._script(block)
        try:
            return subprocess.run(command, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(command, f"timed out after {BLOCK_TIMEOUT_S} s", e.stdout or "", e.stderr or "")

    def _start(self, block: Block) -> subprocess.CompletedProcess:
        """Start a serving block on a free port and wait until it answers its liveness probe; it runs until :meth:`stop_server`."""
        self.stop_server()
        self.port = str(free_port())
        command = self._script(block)
        log = open(self.root / f"server_{block.id}.log", "w+")  # a file, not a pipe: an unread pipe would block the server's logging
        self.server = subprocess.Popen(command, cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.server_log = log
        deadline = time.time() + SERVER_START_S
        while True:
            if self.server.poll() is not None or time.time() > deadline:
                returncode = self.server.poll()
                self.stop_server()
                log.seek(0)
                return subprocess.CompletedProcess(command, returncode if returncode else f"did not answer within {SERVER_START_S} s", "", log.read())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/live", timeout=2) as answer:
                    if answer.status == 200:
                        return subprocess.CompletedProcess(command, 0, f"serving on 127.0.0.1:{self.port}\n", "")
            except OSError:
                time.sleep(0.2)

    def stop_server(self) -> None:
        """Stop the serving block's process group (SIGTERM, then SIGKILL after 60 s), if one runs."""
        if self.server is not None:
            if self.server.poll() is None:
                os.killpg(self.server.pid, signal.SIGTERM)
                try:
                    self.server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.server.pid, signal.SIGKILL)
                    self.server.wait()
            self.server_log.close()
            self.server = None
        self.port = None

    def failed_before(self, block: Block) -> list[str]:
        return [b.where for b in RUNNABLE[: RUNNABLE.index(block)] if self.results[(b.page, b.line)].returncode != 0]


def marked_block(marker: str) -> Block:
    """The runnable block right after the line ``<!-- marker -->``, in README.md or docs/."""
    for block in RUNNABLE:
        lines = block.page.read_text().splitlines()
        if lines[block.line - 2].strip() == f"<!-- {marker} -->":
            return block
    raise AssertionError(f"no page has a runnable block after <!-- {marker} -->")
