"""The ``fedmeta`` command line: the Typer app, with one module per command group.

- ``synth``: seeded synthetic federations on disk
- ``schema``: a federation schema inferred from site files
- ``train``: meta-training in an embedded Flower simulation
- ``personalize`` and ``heads``: adaptation at a site, new task heads
- ``models``: the site's registry (versions, promotion, rollback, audit)
- ``demo``, ``evaluate``, ``report``: the main job and the comparison of methods
- ``serve`` and ``keys``: the prediction server and its API keys
- ``predict``: offline batch scoring with the promoted model
- ``certs``: credentials for Flower's Deployment Engine
- ``launch`` and ``sites``: a coordinator's run on the Deployment Engine, and its sites by name

``serve``, ``predict``, ``models`` and ``keys`` work in the serving-only
install; the others need the training extra (:mod:`fedmeta.cli.extras`).
"""

from __future__ import annotations

import typer

import fedmeta
from fedmeta.cli import certs, console as console_cli, contributions, demo, deploy, keys, models, personalize, predict, schema, serve, synth, train
from fedmeta.cli.errors import FedmetaGroup, fail
from fedmeta.cli.extras import SERVING_COMMANDS, training_extra_problem
from fedmeta.cli.output import console

app = typer.Typer(
    cls=FedmetaGroup,  # the error boundary: one line per error, never a traceback with local variables
    help="fedmeta: federated meta-learning with per-site personalization.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"fedmeta {fedmeta.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: bool = typer.Option(None, "--version", callback=_print_version, is_eager=True, help="Print the fedmeta version and exit."),
    threads: int = typer.Option(
        None, "--threads", min=1, envvar="FEDMETA_THREADS",
        help="CPU threads for a training command's own work and for each process it starts (default 1: many one-threaded workers share a busy machine best).",
    ),
) -> None:
    """fedmeta: federated meta-learning with per-site personalization."""
    command = ctx.invoked_subcommand
    if command in SERVING_COMMANDS:
        return  # never import torch here: a serving-only install has none (onnxruntime's threads are the server's setting)
    problem = training_extra_problem(command)
    if problem:
        raise fail(problem)
    from fedmeta.threads import limit_threads

    limit_threads(threads)


@app.command()
def version() -> None:
    """Print the fedmeta version."""
    console.print(f"fedmeta {fedmeta.__version__}")


app.add_typer(synth.app, name="synth")
app.add_typer(schema.app, name="schema")
app.command()(train.train)
app.command("contributions")(contributions.contributions)
app.command("console")(console_cli.console_command)
app.add_typer(personalize.heads_app, name="heads")
app.add_typer(models.app, name="models")
app.command()(personalize.personalize)
app.command()(demo.demo)
app.command("evaluate")(demo.evaluate_command)
app.command("report")(demo.report_command)
app.add_typer(keys.app, name="keys")
app.command(epilog=serve.EPILOG)(serve.serve)
app.command()(predict.predict)
app.add_typer(certs.app, name="certs")
app.command()(deploy.launch)
app.command()(deploy.sites)
