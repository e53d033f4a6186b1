"""Bring your own data, end to end through the CLI: the README's commands, run verbatim, do what they promise.

Clinic folders (train.csv + test.csv, two tasks, some labels missing, from the
hospital generator), ``fedmeta schema infer``, training from a five-line
config, and ``fedmeta personalize --shots all --test`` at every clinic. The
control for the personalized scores is the unadapted base on the same test rows.
"""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmeta.registry import SiteHome

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> str:
    """The bash block under ``<!-- bring-your-own-data -->`` in the README."""
    text = README.read_text()
    block = re.search(r"<!-- bring-your-own-data -->\n```bash\n(.*?)```", text, re.S)
    assert block, "README has no bring-your-own-data block"
    return block.group(1)


@pytest.mark.slow
def test_the_readme_commands_train_and_personalize_every_clinic_from_its_own_files(tmp_path):
    script = f'set -e\nfedmeta() {{ "{sys.executable}" -m fedmeta.cli "$@"; }}\n' + readme_commands()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FEDMETA_SITE_HOME", None)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=1800)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Traceback" not in output

    clinics = sorted(p.name for p in (tmp_path / "clinics").iterdir() if p.is_dir())
    assert len(clinics) >= 4
    # The five-line config trained every clinic found; the run folder says how many.
    assert tomllib.loads((tmp_path / "runs" / "clinics" / "config.toml").read_text())["federation"]["n_sites"] == len(clinics)
    assert f"({len(clinics)} sites found, {len(clinics)} with a test file)" in output
    # Progress: a loss every round, with the time left.
    assert re.search(r"^round 1/10  loss \d+\.\d{4}  \d+\.\d s  ETA \d", done.stdout, re.M), done.stdout
    assert len(re.findall(r"^round \d+/10  loss ", done.stdout, re.M)) == 10

    home = SiteHome(tmp_path / "site-home")
    base_acc, personalized_acc = [], []
    for clinic in clinics:
        version = home.registry.current(clinic)
        assert version is not None, f"{clinic} has no promoted model"
        manifest, _ = home.load(version)
        test = pd.read_csv(tmp_path / "clinics" / clinic / "test.csv")
        train = pd.read_csv(tmp_path / "clinics" / clinic / "train.csv")
        assert manifest.data["held_out"] == len(test) and manifest.data["rows"] == len(train)
        assert manifest.training["shots"] == "all"
        labels = {t["name"]: t["label"] for t in manifest.schema_["tasks"]}
        personalized = [t.name for t in manifest.tasks if t.personalized]
        # --shots all: every labelled training row of the personalized tasks, and no test row.
        assert manifest.training["steps_selection"]["rows"] == sum(int(train[labels[t]].notna().sum()) for t in personalized)
        for task in personalized:
            base_acc.append(manifest.metrics[f"{task}.base.acc"])
            personalized_acc.append(manifest.metrics[f"{task}.personalized.acc"])
    # The control: the same base, unadapted, on the same test rows.
    print(f"mean test accuracy over {len(base_acc)} clinic-tasks: base {np.mean(base_acc):.4f}, personalized {np.mean(personalized_acc):.4f}")
    assert np.mean(personalized_acc) >= np.mean(base_acc)
