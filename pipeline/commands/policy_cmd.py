"""`trainwatch policy list|show|diff`."""

from __future__ import annotations

import time

import typer

from schemas.errors import TrainwatchError
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


def _t(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


@policy_app.command("diff")
def diff(
    live: str = typer.Argument(..., help="the live profile (name or TOML path)"),
    shadow: str = typer.Argument(..., help="the shadow profile (name or TOML path) run with `replay --shadow`"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    show_same: bool = typer.Option(False, "--all", help="also list the cases both decide alike"),
    store_dsn: str | None = typer.Option(None, "--store", help="ClickHouse DSN (default: settings)"),
    database: str | None = typer.Option(None, "--database", help="database (default: settings)"),
) -> None:
    """What the shadow would open, not open, or date differently (knowledge_at deltas) against the live profile."""
    from pipeline.policy_ops import diff_cases, stored_shadows
    from pipeline.settings import load_settings
    from pipeline.store import Store

    lp, sp = load_policy(live), load_policy(shadow)
    settings = load_settings()
    with Store.connect(store_dsn or settings.clickhouse_dsn, database or settings.database) as store:
        live_cases = store.list_cases(policy_id=lp.id)
        shadow_cases = stored_shadows(store, sp.id, sp.version)
    if not shadow_cases:
        raise TrainwatchError(f"no shadow cases of {sp.id}@{sp.version} in the store: run `trainwatch replay DIR "
                              f"--shadow {shadow}` (or a shadow detect worker) first")
    result = {"live": f"{lp.id}@{lp.version}", "shadow": f"{sp.id}@{sp.version}",
              **diff_cases(live_cases, shadow_cases)}
    if not show_same:
        result.pop("same")
    if as_json:
        typer.echo(dumps(result).decode())
        return
    typer.echo(f"live {result['live']} vs shadow {result['shadow']}: " +
               ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result["counts"].items()))
    typer.echo(f"{'change':<18}{'subject':<30}{'reason':<18}{'live':<14}{'shadow':<14}{'live knowledge':<22}"
               f"{'shadow knowledge':<22}delta")
    for kind in ("would_open", "would_not_open", "dated_differently", *(["same"] if show_same else [])):
        for r in result[kind]:
            delta = "" if r["knowledge_delta_s"] is None else f"{r['knowledge_delta_s']:+.0f} s"
            typer.echo(f"{kind:<18}{r['subject'][:29]:<30}{r['reason'][:17]:<18}{r['live_status'] or '-':<14}"
                       f"{r['shadow_status'] or '-':<14}{_t(r['live_knowledge_at']):<22}"
                       f"{_t(r['shadow_knowledge_at']):<22}{delta}")


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")
