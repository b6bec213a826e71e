"""Shared by the bench_* modules: a `__main__` that prints figures and, with --json, one JSON line for the harness;
and the Kafka steps the ingest benchmark and the fuzz run both take (produce a topic, settings for the stage)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from schemas.serde import dumps

if TYPE_CHECKING:
    from pipeline.settings import Settings


def bench_main(run: Callable[..., dict], argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON line (used by benchmarks.run)")
    args = ap.parse_args(argv)
    result = run(quick=args.quick)
    if args.json:
        sys.stdout.write("\n" + dumps(result).decode() + "\n")
    else:
        for k, v in result["figures"].items():
            print(f"{k} = {v}")
        for note in result.get("notes", []):
            print(f"- {note}")


def produce_all(bootstrap: str, topic: str, values: Iterable[bytes | None], key: bytes = b"k",
                **conf: str | int) -> None:
    """Produce every value in order (waiting out a full local queue) and flush; fails unless all were delivered.
    Idempotent, so a retried request cannot reorder the partition: the checks read letters back by offset (a
    5 MB message once landed at offset 0, ahead of the 300 produced before it, and every offset moved by one)."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True, **conf})
    for v in values:
        while True:
            try:
                p.produce(topic, v, key)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(60) == 0


def stage_settings(bootstrap: str, telemetry: str, windows: str, dlq: str, batch_size: int) -> Settings:
    """Settings for a KafkaIngestStage over the given topics (the ingest benchmark and the fuzz run's broker part)."""
    from pipeline.settings import IngestSettings, KafkaSettings, Settings, TopicSettings

    return Settings(kafka=KafkaSettings(bootstrap_servers=bootstrap),
                    topics=TopicSettings(telemetry=telemetry, windows=windows, dlq=dlq),
                    ingest=IngestSettings(batch_size=batch_size))
