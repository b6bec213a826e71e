"""`trainwatch model scope-eval`: the change-in-scope baseline measured on a simulated scenario (default `scope`,
whose ground truth labels each account's change; see pipeline/scope_eval.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipeline.scope_eval import evaluate
from schemas.serde import dumps

SCENARIOS = ("demo", "eval", "scope")


def scope_eval(
    json_out: bool = typer.Option(False, "--json", help="print the results JSON instead of the table"),
    scenario: str = typer.Option("scope", "--scenario", help="simulator scenario: " + " | ".join(SCENARIOS)),
    scale: float = typer.Option(1.0, "--scale", help="scenario scale (eval, scope)"),
    seed: int = typer.Option(0, help="simulator seed"),
    folder: Path | None = typer.Option(None, "--folder", help="judge an existing simulator folder instead"),
    model: str | None = typer.Option(None, "--model", help="classifier artifact (default: packaged; 'rule')"),
    out: Path = typer.Option(Path("var/scope_eval.json"), "--out", help="where the results JSON is written"),
) -> None:
    """Detection delay, dating error and false alarms of the change-in-scope detector, per kind of account."""
    if folder is None and scenario not in SCENARIOS:
        raise typer.BadParameter(f"scenario must be one of {', '.join(SCENARIOS)}", param_hint="--scenario")
    res = evaluate(scenario, scale=scale, seed=seed, model=model, folder=folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(dumps(res) + b"\n")
    if json_out:
        typer.echo(dumps(res).decode())
        return
    typer.echo(format_table(res))
    typer.echo(f"results: {out}  ({res['elapsed_s']} s)")


def format_table(res: dict[str, Any]) -> str:
    sc, fa, p = res["scope_change"], res["false_alarms"], res["params"]
    lines = [f"change in scope on `{res['scenario']}` (seed {res['seed']}, scale {res['scale']}, {res['labels']} "
             "labels): accounts " + ", ".join(f"{k} {v}" for k, v in res["accounts"].items()),
             f"  thresholds: baseline >= {p['min_baseline_s']:.0f} s, dwell {p['dwell']} windows of "
             f"{res['window_s']:.0f} s, devices >= {p['scale_factor']:g}x (+{p['min_devices_added']}), rate >= "
             f"{p['rate_factor']:g}x, P(training) band {p['p_low']:g}/{p['p_high']:g} (policy {p['policy']}); "
             f"alarms: {', '.join(res['alarm_reasons'])}",
             f"  scope changes detected {sc['detected']}/{sc['n']}; delay median {_s(sc['delay_s']['median'])}, "
             f"max {_s(sc['delay_s']['max'])}; dating error median {_s(sc['dating_error_s']['median'])}, max |.| "
             f"{_s(sc['dating_error_s']['max_abs'])}",
             f"  false alarms {fa['n']} over {fa['account_days']} account-days "
             f"({fa['per_account_day'] if fa['per_account_day'] is not None else '-'} per account-day)",
             f"  {'kind':26} {'group':8} {'detected':9} {'delay med/max':15} {'dating med/max':15} false alarms"]
    for kind, k in res["by_kind"].items():
        fa_k = f"{k['false_alarms']} / {k['account_days']} d"
        if k["group"] == "change":
            lines.append(f"  {kind:26} {k['group']:8} {k['detected']}/{k['accounts']:<7} "
                         f"{_s(k['delay_s']['median']) + ' / ' + _s(k['delay_s']['max']):15} "
                         f"{_s(k['dating_error_s']['median']) + ' / ' + _s(k['dating_error_s']['max_abs']):15} {fa_k}")
        else:  # controls; `other` (inferred labels: training from first use) is listed, not scored
            lines.append(f"  {kind:26} {k['group']:8} {'-':9} {'-':15} {'-':15} "
                         f"{fa_k if k['group'] == 'control' else 'not scored'}")
    for aid, row in res["per_account"].items():
        if row["group"] == "other" and not row["use_changed"]:
            continue
        got = f"delay {_s(row.get('delay_s'))}" if row["group"] == "change" else \
            f"alarms {len(row['use_changed'])}"
        what = row.get("what") or (row["use_changed"][0]["what"] if row["use_changed"] else "")
        lines.append(f"  {aid:34} {row['kind']:26} {got:14} {what}")
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
