"""`trainwatch topics create|check`: provision the pipeline's topics from settings, or compare them with it."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.settings import load_settings

topics_app = typer.Typer(help="Provision and check the Kafka topics (partitions, replication, configs).",
                         no_args_is_help=True)

_APP_ID = typer.Option("trainwatch-detect", "--app-id", help="faust app id (names the app's owners topic)")
_CONFIG = typer.Option(None, "--config", help="settings TOML file")


@topics_app.command("create")
def create(
    app_id: str = _APP_ID,
    config: Path | None = _CONFIG,
    shadow: str | None = typer.Option(None, "--shadow", help="also the topics of a shadow detect worker for this "
                                      "policy (its owners topic and detections topic; see `run --shadow`)"),
) -> None:
    """Create every missing topic with settings' partitions, replication and configs; then check them all."""
    from pipeline import topics

    settings = load_settings(config)
    if shadow is not None:
        from pipeline.policy_ops import shadow_settings

        settings, app_id = shadow_settings(settings, shadow, app_id)
    made = topics.create(settings, app_id)
    for name in made:
        typer.echo(f"created {name}")
    rep = topics.check(settings, "all", app_id)
    for p in rep.problems:
        typer.echo(f"warning: {p}", err=True)
    typer.echo(f"{len(made)} topic(s) created, {len(rep.specs) - len(made)} already there"
               + (f", {len(rep.problems)} differ from settings (trainwatch topics check)" if rep.problems else ""))
    if rep.fatal:
        raise typer.Exit(2)


@topics_app.command("check")
def check(
    stage: str = typer.Option("all", "--stage", help="ingest | detect | all: the topics this stage needs"),
    app_id: str = _APP_ID,
    config: Path | None = _CONFIG,
) -> None:
    """One line per topic: ok, or what differs from settings. Exit 2 when any topic is missing or differs."""
    from pipeline import topics
    from schemas.errors import ConfigError

    if stage not in ("ingest", "detect", "all"):
        raise ConfigError(f"--stage {stage!r}: expected ingest, detect or all")
    rep = topics.check(load_settings(config), stage, app_id)  # type: ignore[arg-type]
    bad = {p.topic for p in rep.problems}
    for s in rep.specs:
        st = rep.state.get(s.name)
        if s.name not in bad and st is not None:
            typer.echo(f"ok       {s.name:<40} {st.partitions:>3} partition(s) x{st.replication}")
    for p in rep.problems:
        typer.echo(f"{'FATAL' if p.fatal else 'differs':<8} {p}")
    if rep.problems:
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.add_typer(topics_app, name="topics")
