"""`trainwatch ingest run`: the ingest stage over Kafka (telemetry -> workload.windows, bad input -> DLQ)."""

from __future__ import annotations

import logging
import signal
from datetime import UTC, datetime
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
    from pipeline import topics
    from pipeline.ingest.kafka_stage import KafkaIngestStage, tune_gc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)  # basicConfig is a no-op under the CLI's log_setup handler
    settings = load_settings(config)
    topics.require(settings, "ingest")  # one line (exit 2) for a missing topic or an unreachable broker
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


@ingest_app.command("status")
def status(
    group: str = typer.Option("trainwatch-ingest", help="consumer group id"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per partition"),
    config: Path | None = typer.Option(None, "--config", help="settings TOML file"),
) -> None:
    """Per partition of the telemetry topic: committed offset, end, lag, and the event time a restart resumes at."""
    from pipeline import topics
    from pipeline.ingest.status import group_status
    from schemas.serde import dumps

    settings = load_settings(config)
    topics.probe(settings)  # no broker: one line (exit 2), not librdkafka's connection log and a traceback
    rows = group_status(settings, group)
    if as_json:
        for r in rows:
            typer.echo(dumps(r.to_dict()).decode())
        return
    typer.echo(f"{'topic':<24} {'part':>4} {'committed':>12} {'end':>12} {'lag':>10}  event time (UTC)")
    for r in rows:
        when = datetime.fromtimestamp(r.event_time, UTC).isoformat(timespec="seconds") if r.event_time else "-"
        committed = "-" if r.committed is None else str(r.committed)
        typer.echo(f"{r.topic:<24} {r.partition:>4} {committed:>12} {r.end:>12} {r.lag:>10}  {when}")
    typer.echo(f"group {group}: lag {sum(r.lag for r in rows)} messages over {len(rows)} partition(s)")


def register(app: typer.Typer) -> None:
    app.add_typer(ingest_app, name="ingest")
