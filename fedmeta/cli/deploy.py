"""The coordinator's commands on the Deployment Engine: ``fedmeta launch`` a run, and see its ``fedmeta sites``.

``flwr run --stream`` exits 0 whatever happened to the run, and Ctrl-C on it
only stops the log stream: the run goes on at the SuperLink. ``fedmeta
launch`` runs it and answers for it: Ctrl-C stops the run itself (``flwr
stop``; the last completed round stays checkpointed), and the exit status
says whether a base model was made from every site (0), without some of them
(1, the sites named), or not at all (1). It reads the run folder, so it runs
on the coordinator, where the ServerApp writes it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import typer

from fedmeta.cli.errors import fail
from fedmeta.cli.output import console, print_json, print_rows

#: Where ``flwr run`` finds the app: this checkout's pyproject.toml declares it (``[tool.flwr.app]``).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
_STARTED = re.compile(r"Successfully started run (\d+)")


def _flwr() -> str:
    path = Path(sys.executable).parent / "flwr"
    return str(path) if path.exists() else "flwr"


def _summary(run_dir: Path, run_id: int | None) -> dict | None:
    """The run's end-of-run summary from ``sites.json``, if the run ``run_id`` wrote one."""
    from fedmeta.fl.roster import Roster

    roster = Roster.load(run_dir)
    summary = roster.summary
    if summary is None or (run_id is not None and summary.get("run_id") not in (None, run_id)):
        return None
    return {**summary, "sites": roster.sites}


def launch(
    connection: str = typer.Argument(..., help="The SuperLink connection's name in $FLWR_HOME/config.toml (the coordinator's loopback one)."),
    config: Path = typer.Option(None, "--config", "-c", help="Run configuration (TOML); not needed to resume a run folder that has one."),
    run_dir: Path = typer.Option(..., "--run-dir", help="The run folder on this machine: checkpoints, metrics, sites.json, base_model.pt."),
    app_dir: Path = typer.Option(PROJECT_ROOT, "--app", help="The Flower app to run (a folder with pyproject.toml)."),
) -> None:
    """Launch (or resume) a training run on the Deployment Engine and wait for it; Ctrl-C stops the run."""
    run_dir = run_dir.resolve()
    if config is None and not (run_dir / "config.toml").exists():
        raise fail(f"{run_dir} holds no run to resume; give --config RUN.toml")
    if config is not None and not config.exists():
        raise fail(f"{config}: no such file")
    if not (app_dir / "pyproject.toml").exists():
        raise fail(f"{app_dir} has no pyproject.toml declaring the Flower app; give --app with a checkout of fedmeta")
    run_config = f'run-dir="{run_dir}"' + (f' config-path="{config.resolve()}"' if config is not None else "")
    command = [_flwr(), "run", str(app_dir), connection, "--run-config", run_config, "--stream"]
    run_id = None
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            started = _STARTED.search(line)
            if started and run_id is None:
                run_id = int(started.group(1))
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        if run_id is None:
            raise fail("stopped before the SuperLink started a run", 130) from None
        stopped = subprocess.run([_flwr(), "stop", str(run_id), connection], capture_output=True, text=True)
        if stopped.returncode != 0:
            raise fail(f"could not stop run {run_id}: {(stopped.stdout + stopped.stderr).strip().splitlines()[-1:]}; stop it with: flwr stop {run_id} {connection}", 130) from None
        raise fail(f"stopped run {run_id}; its last completed round is checkpointed. Resume with: fedmeta launch {connection} --run-dir {run_dir}", 130) from None
    if run_id is None:
        raise fail(f"flwr run did not start a run (exit {proc.returncode}); see its output above")
    summary = _summary(run_dir, run_id)
    if summary is None:
        raise fail(f"run {run_id} ended without a base model; see the log above. Resume with: fedmeta launch {connection} --run-dir {run_dir}", 1)
    console.print(f"base model: {summary['base_model']} (round {summary['round']})", highlight=False)
    known = len(summary["sites"])
    console.print(f"stored in {len(summary.get('delivered', []))} of {known} site homes; personalized and promoted at {len(summary.get('personalized', []))}", highlight=False)
    if summary["trained_without"]:
        from fedmeta.fl.roster import without_text

        sites = summary["sites"]
        without = {name: sites[name]["missed"] for name in summary["trained_without"]}
        raise fail(without_text(without, {name: site["node"] for name, site in sites.items()}), 1)


def sites(
    run_dir: Path = typer.Argument(..., help="A run folder (fedmeta train's or flwr run's)."),
    as_json: bool = typer.Option(False, "--json", help="Print sites.json's content as JSON."),
) -> None:
    """The run's sites by name: node id, status, last contact, last round trained, rounds the model went without them, mapping status."""
    from fedmeta.fl.mapping_status import cell
    from fedmeta.fl.roster import FILE, Roster, rounds_text

    if not (run_dir / FILE).exists():
        raise fail(f"{run_dir} has no {FILE}: not a run folder, or no round has ended yet")
    roster = Roster.load(run_dir)
    if as_json:
        print_json({"round": roster.round, "sites": roster.sites, "summary": roster.summary})
        return
    rows = []
    for name, site in sorted(roster.sites.items()):
        missed = sorted(int(r) for r in site["missed"])
        rows.append([
            name, str(site["node"]), site["status"], site["last_contact"] or "-", str(site["last_round"] or "-"),
            f"{rounds_text(missed)}: {site['missed'][str(missed[-1])]}" if missed else "", cell(site.get("mapping")),
        ])
    state = "finished" if roster.summary else f"after round {roster.round}"
    print_rows(f"{run_dir}: {len(rows)} site(s), {state}", ["site", "node", "status", "last contact (UTC)", "last round", "missed", "mapping"], rows)
