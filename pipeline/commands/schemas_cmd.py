"""`trainwatch schemas export DIR`."""

from __future__ import annotations

from pathlib import Path

import typer

from schemas.export import export_json_schemas

schemas_app = typer.Typer(help="Message schemas.", no_args_is_help=True)


@schemas_app.command("export")
def export(out_dir: Path = typer.Argument(..., help="folder to write one JSON Schema file per message type")) -> None:
    """Write one JSON Schema file per message type."""
    for path in export_json_schemas(out_dir):
        typer.echo(str(path))


def register(app: typer.Typer) -> None:
    app.add_typer(schemas_app, name="schemas")
