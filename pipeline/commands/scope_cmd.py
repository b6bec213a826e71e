"""`trainwatch model scope-eval`: the change-in-scope baseline measured on a simulated scenario."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipeline.scope_eval import evaluate
from schemas.serde import dumps


def scope_eval(
    json_out: bool = typer.Option(False, "--json", help="print the results JSON instead of the table"),
    scenario: str = typer.Option("demo", "--scenario", help="simulator scenario: demo | eval"),
    scale: float = typer.Option(1.0, "--scale", help="scenario scale (eval)"),
    seed: int = typer.Option(0, help="simulator seed"),
    model: str | None = typer.Option(None, "--model", help="classifier artifact (default: packaged; 'rule')"),
    out: Path = typer.Option(Path("var/scope_eval.json"), "--out", help="where the results JSON is written"),
) -> None:
    """Detection delay and false alarms of the change-in-scope detector on the simulator's accounts."""
    if scenario not in ("demo", "eval"):
        raise typer.BadParameter("scenario must be demo or eval", param_hint="--scenario")
    res = evaluate(scenario, scale=scale, seed=seed, model=model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(dumps(res) + b"\n")
    if json_out:
        typer.echo(dumps(res).decode())
        return
    typer.echo(format_table(res))
    typer.echo(f"results: {out}  ({res['elapsed_s']} s)")


def format_table(res: dict[str, Any]) -> str:
    sc, fa = res["scope_change"], res["false_alarms"]
    lines = [f"change in scope on `{res['scenario']}` (seed {res['seed']}, scale {res['scale']}): accounts "
             + ", ".join(f"{k} {v}" for k, v in res["accounts"].items()),
             f"  scope changes detected {sc['detected']}/{sc['n']}; delay median {_s(sc['delay_s']['median'])}, "
             f"max {_s(sc['delay_s']['max'])}; dating error median {_s(sc['dating_error_s']['median'])}",
             f"  false alarms {fa['n']} over {fa['account_days']} account-days "
             f"({fa['per_account_day'] if fa['per_account_day'] is not None else '-'} per account-day)"]
    for aid, row in res["per_account"].items():
        if row["kind"] == "other" and not row["use_changed"]:
            continue
        got = f"delay {_s(row.get('delay_s'))}" if row["kind"] == "scope_change" else \
            f"alarms {len(row['use_changed'])}"
        what = row.get("what") or (row["use_changed"][0]["what"] if row["use_changed"] else "")
        lines.append(f"  {aid:24} {row['kind']:12} {got:14} {what}")
    return "\n".join(lines)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} s"


def register(app: typer.Typer) -> None:
    # Attach to the `model` group registered by model_cmd (which comes first in COMMAND_MODULES).
    for group in app.registered_groups:
        if group.name == "model" and group.typer_instance is not None:
            group.typer_instance.command("scope-eval")(scope_eval)
            return
    app.command("scope-eval")(scope_eval)
