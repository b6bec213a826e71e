"""`trainwatch` command line. Each command group lives in pipeline/commands/ and registers itself on `app`."""

from __future__ import annotations

import importlib
import sys

import typer

from schemas.errors import TrainwatchError

app = typer.Typer(
    name="trainwatch",
    help="Find foreign customers' large AI training runs in GPU telemetry and start the report clock.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per command group; each defines `register(app)`.
COMMAND_MODULES = (
    "schemas_cmd", "policy_cmd", "simulate_cmd", "ingest_cmd", "pipeline_cmd", "cases_cmd", "model_cmd", "scope_cmd",
    "classify_cmd", "run_cmd", "topics_cmd",
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"pipeline.commands.{name}").register(app)


def main() -> None:
    _register_all()
    try:
        app()
    except TrainwatchError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
