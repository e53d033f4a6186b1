"""One server per run folder: a second holder is refused by name, and a crashed holder frees the folder."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedmeta.fl.run_dir import RunDir, RunDirHeld

HOLD_FOREVER = """
import sys, time
from fedmeta.fl.run_dir import RunDir
with RunDir(sys.argv[1]).hold(run_id=4242, engine="deployment"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process holding ``tmp_path / "run"`` as Flower run 4242, killed with SIGKILL at the end."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_FOREVER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_server_on_a_held_folder_is_refused_naming_the_holder_and_how_to_stop_it(tmp_path, holder):
    with pytest.raises(RunDirHeld) as refused:
        with RunDir(tmp_path / "run").hold(run_id=7, engine="deployment"):
            pytest.fail("two servers held one run folder")
    message = str(refused.value)
    assert "\n" not in message
    assert f"Flower run 4242 (pid {holder.pid}" in message
    assert "flwr stop 4242 <connection>" in message


def test_a_holder_killed_without_warning_frees_the_folder(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with RunDir(tmp_path / "run").hold(run_id=8, engine="deployment"):
        record = json.loads((tmp_path / "run" / ".lock").read_text())
        assert (record["run_id"], record["pid"]) == (8, os.getpid())


def test_the_folder_is_free_again_after_its_holder_ends_and_holds_are_exclusive_within_a_process(tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.hold():
        with pytest.raises(RunDirHeld, match=r"a training process \(pid \d+ .*Ctrl-C"):
            with RunDir(tmp_path / "run").hold():
                pass
    with rd.hold():
        pass


def test_fedmeta_train_refuses_a_folder_another_server_holds(tmp_path, holder):
    from typer.testing import CliRunner

    from fedmeta.cli import app

    result = CliRunner().invoke(app, ["train", "--config", "examples/fedprox_synthetic.toml", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "is in use by Flower run 4242" in result.output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_run_refused_before_it_wrote_anything_leaves_no_folder_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with RunDir(tmp_path / "run").hold():
            raise RuntimeError("a bad configuration, found before round 1")
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    with RunDir(tmp_path / "kept").hold():
        pass
    assert (tmp_path / "kept").is_dir(), "a folder that was there before stays"
