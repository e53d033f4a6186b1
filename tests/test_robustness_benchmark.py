"""benchmarks/robustness.py records what each run went through (sites that sat out, restarts, a run that
failed) and always ends with its JSON line."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fedmeta.cli.output import ProgressObserver, console

SAT_OUT_REASON = "local training diverged (non-finite update, also after 3 restarts with smaller steps); this site sits out the round"


@pytest.fixture(scope="module")
def robustness():
    path = Path(__file__).parents[1] / "benchmarks" / "robustness.py"
    spec = importlib.util.spec_from_file_location("robustness_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_output(failures: list[tuple[int, str, str]]) -> str:
    """What `fedmeta train` prints about sites that sat out or failed, from its own progress observer."""
    observer = ProgressObserver()
    with console.capture() as captured:
        for round_, site, reason in failures:
            observer.sites_failed(round_, [(site, reason)])
    return captured.get()


def _run_folder(path: Path, accuracy: float, restarts: int = 0) -> Path:
    """A completed run's folder: two rounds, two sites, a final evaluation."""
    path.mkdir(parents=True)
    rows = []
    for round_ in (1, 2):
        rows += [{"round": round_, "phase": "train", "site": site, "loss": 0.5, "restarts": restarts if (round_, site) == (2, "hospital_001") else 0}
                 for site in ("hospital_000", "hospital_001")]
        rows.append({"round": round_, "phase": "train", "site": "*", "skipped": False, "loss": 0.5, "upload_bytes": 1000, "broadcast_bytes": 2000})
    rows += [{"round": 2, "phase": "evaluate", "site": site, "examples.readmission_30d": 30, "examples.mortality": 10} for site in ("hospital_000", "hospital_001")]
    rows.append({"round": 2, "phase": "evaluate", "site": "*", "readmission_30d.global.acc": accuracy - 0.1, "mortality.global.acc": accuracy - 0.1,
                 "readmission_30d.personalized.acc": accuracy, "mortality.personalized.acc": accuracy})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "base_model.pt").write_bytes(b"")
    return path


def test_a_run_in_which_a_site_sat_out_and_another_restarted_is_recorded_with_both(robustness, tmp_path):
    run_dir = _run_folder(tmp_path / "dp_eps1", accuracy=0.8, restarts=2)
    row = robustness.read_run("dp_eps1", run_dir, 0, _train_output([(19, "hospital_488", SAT_OUT_REASON)]), 60.0)
    assert "failed" not in row and row["personalized_acc"] == pytest.approx(0.8) and row["rounds"] == 2
    assert row["sat_out"] == [{"round": 19, "site": "hospital_488", "reason": SAT_OUT_REASON}] and row["failed_sites"] == []
    assert row["restarts"] == 2


def test_a_completed_run_in_which_a_site_raised_is_kept_with_the_site_listed(robustness, tmp_path):
    run_dir = _run_folder(tmp_path / "clean", accuracy=0.8)
    output = _train_output([(3, "hospital_002", "site.csv: cannot read")]) + "error: 1 site(s) failed during training\n"
    row = robustness.read_run("clean", run_dir, 1, output, 60.0)
    assert "failed" not in row and row["personalized_acc"] == pytest.approx(0.8)
    assert row["failed_sites"] == [{"round": 3, "site": "hospital_002", "reason": "site.csv: cannot read"}] and row["sat_out"] == []


def test_a_run_that_did_not_complete_is_a_row_with_its_reason(robustness, tmp_path):
    (tmp_path / "dp_eps1").mkdir()
    output = "fedmeta train fomaml on hospitals (60 sites)\nerror: the simulation stopped before finishing; see the log above\n"
    row = robustness.read_run("dp_eps1", tmp_path / "dp_eps1", 1, output, 5.0)
    assert row["failed"] == "error: the simulation stopped before finishing; see the log above"
    assert "personalized_acc" not in row


def test_the_benchmark_goes_on_after_a_failed_run_and_prints_its_json_line(robustness, tmp_path, monkeypatch, capsys):
    folders = {"dp_clean": 0.80, "dp_eps8": 0.79, "dp_eps4": 0.77, "clean": 0.78}

    def run(work, name, sites, rounds, fraction, overrides):
        if name == "dp_eps1":
            (tmp_path / name).mkdir()
            return robustness.read_run(name, tmp_path / name, 1, "error: the simulation stopped before finishing\n", 5.0)
        sat_out = _train_output([(4, "hospital_048", SAT_OUT_REASON)]) if name == "dp_eps4" else ""
        return robustness.read_run(name, _run_folder(tmp_path / name, folders[name], restarts=1 if name == "dp_eps8" else 0), 0, sat_out, 5.0)

    monkeypatch.setattr(robustness, "run", run)
    monkeypatch.setattr(robustness, "noise_multiplier_for", lambda epsilon, *_: 10.0 / epsilon)  # the calibration takes seconds; not what is tested
    monkeypatch.setattr(sys, "argv", ["robustness.py", "--json", "--quick", "--sections", "dp"])
    robustness.main()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dp_eps8_acc_drop"] == pytest.approx(1.0) and summary["dp_eps4_acc_drop"] == pytest.approx(3.0)
    assert "dp_eps1_acc_drop" not in summary
    assert summary["failed_runs"] == {"dp_eps1": "error: the simulation stopped before finishing"}
    assert summary["sat_out"] == {"dp_eps4": ["hospital_048 (round 4)"]} and summary["restarts"] == {"dp_eps8": 1}
