"""`trainwatch simulate SCENARIO --out DIR`: a simulated fleet's telemetry, allocations, CIP and ground truth."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.settings import load_settings
from pipeline.simulator.scenarios import SCENARIOS, build
from pipeline.simulator.writer import write


def simulate(
    scenario: str = typer.Argument(..., help=f"one of: {', '.join(sorted(SCENARIOS))}"),
    out: Path = typer.Option(..., "--out", help="output folder (created)"),
    seed: int = typer.Option(0, help="same seed, byte-identical files"),
    scale: float = typer.Option(1.0, help="size multiplier (bench, eval)"),
    smi_share: float = typer.Option(0.25, help="share of nodes that report nvidia-smi fields only"),
    malformed_share: float = typer.Option(0.001, help="share of samples sent as malformed messages"),
    columnar: bool = typer.Option(False, "--columnar", help="also write telemetry.columns.jsonl"),
    kafka: bool = typer.Option(False, "--kafka", help="also produce to the Kafka topics from Settings.topics"),
    rate: float = typer.Option(0.0, help="with --kafka: samples/s limit (0: as fast as possible)"),
    config: Path | None = typer.Option(None, "--config", help="settings TOML file"),
) -> None:
    """Simulate SCENARIO into --out (and optionally Kafka); print counts and the generation rate."""
    sc = build(scenario, seed, scale=scale, smi_share=smi_share, malformed_share=malformed_share)
    producer = None
    if kafka:
        from pipeline.simulator.kafka_out import KafkaOut

        producer = KafkaOut(load_settings(config), sc, rate=rate or None)
    manifest, secs = write(sc, out, columnar=columnar, sink=producer.telemetry if producer else None)
    if producer is not None:
        producer.finish()
    c = manifest["counts"]
    typer.echo(f"{scenario} seed={seed}: {c['lines']} lines ({c['samples']} samples, {c['duplicates']} duplicates, "
               f"{c['late']} late, {c['malformed']} malformed, {c['gaps']} gaps), {manifest['workloads']} workloads "
               f"-> {out}")
    typer.echo(f"generated in {secs:.2f} s: {c['lines'] / max(secs, 1e-9):,.0f} samples/s")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
