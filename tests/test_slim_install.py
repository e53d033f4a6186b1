"""The serving-only install: what it declares, what the serving path imports, and a fresh venv that serves a promoted model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.cli.extras import SERVING_COMMANDS, TRAINING_COMMANDS, training_requirements
from site_server import ROW, SITE, free_port, publish_version

ROOT = Path(__file__).resolve().parents[1]
TRAINING_MODULES = ("torch", "flwr", "ray", "sklearn", "matplotlib", "onnx", "onnxscript", "rapidfuzz")
EXTRA_LINE = 'needs the training extra (torch is not installed): pip install "fedmeta[train]"'


def _requirement_names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in requirements}


def test_the_core_install_leaves_out_the_training_stack_and_the_training_extra_pins_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    assert {"fastapi", "uvicorn", "onnxruntime", "numpy", "orjson", "prometheus_client", "pydantic", "typer", "click", "rich"} <= core
    assert not core & {"torch", "flwr", "ray", "scikit-learn", "matplotlib", "onnx", "onnxscript"}
    extras = project["optional-dependencies"]
    assert "serve" in extras
    assert "torch==2.13.0" in extras["train"] and "rapidfuzz>=3,<4" in extras["train"]
    assert extras["dev"][0] == "fedmeta[train,serve]"  # `pip install -e ".[dev]"` (README, CI) keeps installing everything


def test_the_guard_reads_the_training_extra_from_the_installed_metadata():
    names = {n.lower() for n in training_requirements()}
    assert {"torch", "flwr", "scikit-learn", "matplotlib", "rapidfuzz"} <= names
    assert not names & {"fastapi", "onnxruntime", "fedmeta"}


def test_every_command_is_either_a_serving_or_a_training_command():
    import typer

    commands = set(typer.main.get_command(app).commands)
    assert not SERVING_COMMANDS & TRAINING_COMMANDS
    assert commands == SERVING_COMMANDS | TRAINING_COMMANDS


def test_importing_and_running_the_serving_path_imports_no_training_package(tmp_path):
    """``serving.app``, the CLI, ``fedmeta serve --help``, ``python -m serving --help``, ``models`` and ``keys`` in a fresh interpreter."""
    from fedmeta.registry import SiteHome

    (tmp_path / "home").mkdir()
    SiteHome(tmp_path / "home").registry.record("test", "note")  # a registry without models: `models list`, `audit` and `keys list` read it
    script = f"""
import contextlib, io, json, sys
import serving.app, fedmeta.cli, fedmeta.predict
from fedmeta.cli import app
import serving.__main__
home = {str(tmp_path / "home")!r}
with contextlib.redirect_stdout(io.StringIO()):
    codes = [app(args, standalone_mode=False) for args in (["serve", "--help"], ["models", "--help"], ["keys", "--help"],
             ["models", "list", "--site-home", home], ["models", "list", "--json", "--site-home", home], ["keys", "list", "--site-home", home],
             ["models", "audit", "--site-home", home])]
    codes.append(serving.__main__.main(["--help"]))
print(json.dumps({{"codes": codes, "loaded": sorted(m for m in {TRAINING_MODULES!r} if m in sys.modules)}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0] * 8, "loaded": []}


@pytest.mark.parametrize("command", sorted(TRAINING_COMMANDS))
def test_a_training_command_without_the_training_extra_names_the_extra_in_one_line(command, monkeypatch):
    monkeypatch.setattr("fedmeta.cli.extras.missing_training_package", lambda: "torch")
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: fedmeta {command} {EXTRA_LINE}"


# --- a fresh venv with only the serving install -----------------------------------------------------


def _project_copy(target: Path) -> Path:
    """The files a wheel is built from, copied: building in the working copy would leave build/ in it."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, target / name)
    for package in ("fedmeta", "serving"):
        shutil.copytree(ROOT / package, target / package, ignore=ignore)
    return target


def _clean_env() -> dict:
    """The environment without anything pointing at this checkout or the main environment's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory):
    """A venv (no system site packages) holding ``pip install <project>[serve]`` and nothing else; pip's cache is used."""
    root = tmp_path_factory.mktemp("slim")
    (root / "src").mkdir()
    source = _project_copy(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{source}[serve]"], capture_output=True, text=True, env=_clean_env(), timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def promoted_home(tmp_path_factory, hospitals, base_run):
    """A site home built with the main environment's training tools: one promoted personalized model and a predict key."""
    from fedmeta.registry import SiteHome
    from serving.auth import KeyStore

    home = SiteHome(tmp_path_factory.mktemp("slim-home") / "home")
    publish_version(home, hospitals, base_run, seed=1, promote=True)
    _, key = KeyStore(home.path).create("slim-test", "predict")
    _, department = KeyStore(home.path).create("slim-department", "department")
    return home.path, key, department


def _in_venv(venv: Path, *args: str) -> subprocess.CompletedProcess:
    """``args`` run with the venv's own executables, from a folder outside this checkout (so ``import fedmeta`` finds the installed copy)."""
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, env=_clean_env(), timeout=120, cwd=venv)


@pytest.mark.slow  # creates a venv and installs the serving stack into it (minutes the first time, pip's cache after)
def test_a_serving_only_venv_has_no_training_stack_and_serves_a_promoted_model(serving_venv, promoted_home, tmp_path):
    home, key, department = promoted_home
    present = _in_venv(serving_venv, "python", "-c", f"import importlib.util as u, fedmeta; print(fedmeta.__file__); print([m for m in {TRAINING_MODULES!r} if u.find_spec(m)])")
    where, found = present.stdout.splitlines()
    assert where.startswith(str(serving_venv)) and found == "[]"
    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen([str(serving_venv / "bin" / "fedmeta"), "serve", "--site-home", str(home), "--port", str(port)],
                              stdout=log, stderr=log, env=_clean_env(), cwd=tmp_path)
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None, (log.seek(0), log.read())[1]
            assert time.time() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/v2/health/live", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        v1 = httpx.post(url + "/v1/predict", json={"row": ROW}, headers=headers, timeout=10)
        assert v1.status_code == 200, v1.text
        assert {"mortality", "length_of_stay"} <= set(v1.json()["predictions"])
        inputs = [{"name": k, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP32", "data": [v]} for k, v in ROW.items()]
        v2 = httpx.post(f"{url}/v2/models/{SITE}/infer", json={"inputs": inputs}, headers=headers, timeout=10)
        assert v2.status_code == 200, v2.text
        assert v2.json()["model_name"] == SITE and {o["name"] for o in v2.json()["outputs"]} >= {"mortality", "length_of_stay"}
        head = httpx.post(url + "/v1/heads", json={"task": "sepsis", "kind": "binary", "rows": [ROW]}, headers={"Authorization": f"Bearer {department}"}, timeout=10)
        assert head.status_code == 501 and 'pip install "fedmeta[train]"' in head.json()["error"], head.text
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert server.returncode in (0, -signal.SIGTERM)  # uvicorn drains, then re-raises the signal it caught


@pytest.mark.slow  # shares the serving-only venv above
def test_a_serving_only_venv_scores_files_lists_models_and_names_the_extra_for_training(serving_venv, promoted_home, hospitals, tmp_path):
    home, _, _ = promoted_home
    scored = _in_venv(serving_venv, "fedmeta", "predict", "--data", str(hospitals / f"{SITE}.csv"), "--site-home", str(home), "--out", str(tmp_path / "p.csv"))
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert {"mortality", "mortality.p_1", "length_of_stay"} <= set((tmp_path / "p.csv").read_text().splitlines()[0].split(","))
    listed = _in_venv(serving_venv, "fedmeta", "models", "list", "--json", "--site-home", str(home))
    assert listed.returncode == 0 and [v["promoted"] for v in json.loads(listed.stdout)["versions"]] == [False, True]
    for command in ("train", "personalize", "demo"):
        refused = _in_venv(serving_venv, "fedmeta", command, "--help")
        assert refused.returncode == 2 and refused.stdout.strip() == f"error: fedmeta {command} {EXTRA_LINE}" and not refused.stderr
