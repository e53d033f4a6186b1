"""The process the console starts for a run: ``fedmeta <args>`` with its output in the run folder and its exit recorded there.

``python -m fedmeta.console.launcher RUN_DIR train --config ... --run-dir RUN_DIR``
runs the command as a child, appends its output to ``RUN_DIR/console.log`` and
writes ``RUN_DIR/console-exit.json`` (``{"code", "ended"}``) when it ends, so a
console started later still sees how the run ended. It is a session leader
(the console starts it with ``start_new_session``): stopping the console stops
nothing, and a stop from the console is a SIGINT to the whole group, as a
terminal's Ctrl-C is. The launcher itself sits that signal out and waits for
the run to checkpoint and exit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedmeta.console.runs import LAUNCH_EXIT, LAUNCH_LOG
from fedmeta.files import atomic_write_text


def main(argv: list[str]) -> int:
    run_dir, args = Path(argv[0]), argv[1:]
    signal.signal(signal.SIGINT, lambda *_: None)  # caught, not ignored: the child starts with the default again
    with (run_dir / LAUNCH_LOG).open("ab") as log:
        code = subprocess.call([sys.executable, "-m", "fedmeta.cli", *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    atomic_write_text(run_dir / LAUNCH_EXIT, json.dumps({"code": code, "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
