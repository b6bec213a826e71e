"""The ingest stage's Prometheus endpoint: counters, watermarks and lag, read off the stage at scrape time.

Nothing is counted twice: the hot path keeps its plain counters (IngestCore.counters, StageStats) and the
collector turns a snapshot of them into metric families when Prometheus scrapes (`ingest.metrics_port`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from pipeline.ingest.kafka_stage import KafkaIngestStage

_PART = ["topic", "partition"]


class IngestCollector:
    def __init__(self, stage: KafkaIngestStage) -> None:
        self.stage = stage

    def collect(self) -> Iterator[Metric]:
        st = self.stage
        # Snapshots made in C (no Python code runs during the copy): the stage's thread keeps counting meanwhile.
        c = dict(st.core.counters)
        parts = st.core.states()
        lag, committed = dict(st.lag), dict(st.stats.last_commit)

        yield CounterMetricFamily("trainwatch_ingest_messages", "Messages consumed", value=c.get("messages", 0))
        samples = CounterMetricFamily("trainwatch_ingest_samples", "Samples decoded, kept in windows, or repeats",
                                      labels=["outcome"])
        for outcome, key in (("decoded", "samples_in"), ("kept", "samples_ok"), ("duplicate", "duplicates")):
            samples.add_metric([outcome], c.get(key, 0))
        yield samples
        dead = CounterMetricFamily("trainwatch_ingest_dead_letters", "Dead letters by reason", labels=["reason"])
        for key in sorted(k for k in c if k.startswith("dlq.")):
            dead.add_metric([key.removeprefix("dlq.")], c[key])
        yield dead
        yield CounterMetricFamily("trainwatch_ingest_windows", "Window aggregates emitted", value=c.get("windows", 0))
        for name, value, doc in (("batches", st.stats.batches, "Batches processed"),
                                 ("commits", st.stats.commits, "Offset commits (after the outputs were flushed)"),
                                 ("pauses", st.stats.pauses, "Backpressure pauses (producer queue full)")):
            yield CounterMetricFamily(f"trainwatch_ingest_{name}", doc, value=value)
        yield GaugeMetricFamily("trainwatch_ingest_open_windows", "Window units not yet emitted",
                                value=sum(p.open_units for p in parts))
        yield GaugeMetricFamily("trainwatch_ingest_outputs_held",
                                "Outputs whose topic is missing, held and written again (no commit meanwhile)",
                                value=st.stats.outputs_held)
        event_time = GaugeMetricFamily("trainwatch_ingest_event_time_seconds",
                                       "Confirmed event time (the watermark basis), per partition (unix seconds)",
                                       labels=_PART)
        for p in parts:
            if math.isfinite(p.event_time):
                event_time.add_metric([p.topic, str(p.partition)], p.event_time)
        yield event_time
        behind = GaugeMetricFamily("trainwatch_ingest_consumer_lag_messages",
                                   "Messages between the consumer's position and the partition's end", labels=_PART)
        for (topic, part), n in sorted(lag.items()):
            behind.add_metric([topic, str(part)], n)
        yield behind
        offsets = GaugeMetricFamily("trainwatch_ingest_committed_offset", "Last committed offset, per partition",
                                    labels=_PART)
        for key, off in sorted(committed.items()):
            topic, _, part = key.rpartition(":")
            offsets.add_metric([topic, part], off)
        yield offsets


def serve(stage: KafkaIngestStage, port: int, addr: str) -> WSGIServer:
    """Serve /metrics (this stage's families plus process CPU and memory) on a daemon thread; port 0 picks one."""
    registry = CollectorRegistry()
    registry.register(IngestCollector(stage))
    ProcessCollector(registry=registry)
    server, _ = start_http_server(port, addr=addr, registry=registry)
    return server
