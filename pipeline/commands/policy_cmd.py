"""`trainwatch policy list|show`."""

from __future__ import annotations

import typer

from schemas.policy import load_policy, shipped_policies
from schemas.serde import dumps

policy_app = typer.Typer(help="Policy profiles.", no_args_is_help=True)


@policy_app.command("list")
def list_() -> None:
    """List the shipped profiles."""
    for name in shipped_policies():
        p = load_policy(name)
        typer.echo(f"{p.id}\t{p.version}\t{p.title}")


@policy_app.command("show")
def show(name: str = typer.Argument(..., help="shipped profile name or path to a TOML file")) -> None:
    """Print a profile as JSON (validated)."""
    typer.echo(dumps(load_policy(name).model_dump(mode="json")).decode())


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")
