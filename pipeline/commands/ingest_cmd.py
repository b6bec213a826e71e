"""`trainwatch ingest run`: the ingest stage over Kafka (telemetry -> workload.windows, bad input -> DLQ)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import typer

from pipeline.settings import load_settings

ingest_app = typer.Typer(help="The ingest stage.", no_args_is_help=True)


@ingest_app.command("run")
def run(
    group: str = typer.Option("trainwatch-ingest", help="consumer group id"),
    decoder: str | None = typer.Option(None, help="native | otlp_json | prometheus_json (default: settings)"),
    idle_exit: float | None = typer.Option(None, help="exit after this many seconds without messages"),
    max_seconds: float | None = typer.Option(None, help="exit after this many seconds"),
    config: Path | None = typer.Option(None, "--config", help="settings TOML file"),
) -> None:
    """Consume telemetry, emit partial window aggregates; commit after write. Ctrl-C stops cleanly."""
    from pipeline.ingest.kafka_stage import KafkaIngestStage, tune_gc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(config)
    stage = KafkaIngestStage(settings, group_id=group, decoder=decoder)
    tune_gc()
    stopping = {"now": False}

    def _stop(*_: object) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stats = stage.run(idle_exit_s=idle_exit, max_seconds=max_seconds, stop=lambda: stopping["now"])
    counters = " ".join(f"{k}={v}" for k, v in sorted(stage.core.counters.items()))
    typer.echo(f"batches={stats.batches} messages={stats.messages} windows={stats.windows} "
               f"dead_letters={stats.dead_letters} commits={stats.commits} pauses={stats.pauses} {counters}")


def register(app: typer.Typer) -> None:
    app.add_typer(ingest_app, name="ingest")
