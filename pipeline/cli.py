"""`trainwatch` command line. Each command group lives in pipeline/commands/ and registers itself on `app`."""

from __future__ import annotations

import importlib
import sys

import typer
from typer._click import exceptions as cli_exc  # what typer raises (its vendored click), not click's own

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
    "classify_cmd", "run_cmd", "topics_cmd", "serve_cmd", "suppress_cmd",
)


#: Commands that restart after a crash register alone: the model commands import scikit-learn (~1.2 CPU s), a large
#: share of the 10 s a restarted `run` worker has to consume again (issue 12, docs/faust.md).
ALONE = {"run": "run_cmd"}


def _register_all(only: str | None = None) -> None:
    if only in ALONE:
        app.callback()(lambda: None)  # a group still (typer runs a lone command without its name)
    for name in (ALONE[only],) if only in ALONE else COMMAND_MODULES:
        importlib.import_module(f"pipeline.commands.{name}").register(app)


def _fail(message: str, code: int = 2) -> None:
    typer.secho("error: " + " ".join(message.split()), fg="red", err=True)  # one line, whatever the message
    sys.exit(code)


def main() -> None:
    from pipeline import log_setup

    log_setup.configure_from_settings()  # every command logs one way (TRAINWATCH_LOG_FORMAT, TRAINWATCH_LOG_LEVEL)
    _register_all(sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        rv = app(standalone_mode=False)  # usage errors come here, to be one line instead of a framed box
    except TrainwatchError as exc:
        _fail(str(exc))
    except cli_exc.NoArgsIsHelpError as exc:  # a bare command group: its help, as before
        exc.show()
        sys.exit(exc.exit_code)
    except cli_exc.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "trainwatch"
        _fail(f"{exc.format_message()} (see '{where} --help')", exc.exit_code)
    except cli_exc.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
