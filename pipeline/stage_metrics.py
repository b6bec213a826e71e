"""Prometheus metrics of the detect and cases stages, in the style of pipeline/ingest/metrics.py: plain counters
on the hot path, turned into metric families only when Prometheus scrapes.

- `StageMetrics`: what a stage observed (detections per detector and outcome, case changes per action, the newest
  event time per stage, hence its event-time lag behind the wall clock). A stage calls `observe_*` after each
  batch; nothing here blocks or allocates per message. `trainwatch_detections_total` counts *emissions*: a
  detection the engine re-decides is re-emitted under its id and counted again (its rate is the detect stage's
  work). How many distinct findings there are, each at its latest version, is the store's `detections_by_detector`
  (one row per detection id).
- `CaseStoreCollector`: the case book as it stands in the store (cases per status, pending cases due within 3
  days and overdue), read from ClickHouse at scrape time, so every process that serves it (the console's
  /metrics, a stage's metrics port) reports the same numbers.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from pipeline.store import Store

DAY = 86_400.0
SOON_DAYS = 3.0
PENDING = ("open", "needs_review", "acknowledged")
STATUSES = ("open", "needs_review", "acknowledged", "reported", "dismissed", "monitored")


class StageMetrics:
    """Counters a detect / cases stage updates after each batch (thread-safe: faust and the runner both call)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.detections: Counter[tuple[str, str]] = Counter()
        self.case_events: Counter[str] = Counter()
        self.event_time: dict[str, float] = {}
        self.batches: Counter[str] = Counter()
        self.stalled: dict[tuple[str, int], float] = {}
        self.redelivered: Counter[str] = Counter()

    def observe_redelivered(self, topic: str, messages: int) -> None:
        """Messages of `topic` faust fetched and did not hand to an agent, sought back to be fetched again
        (fetch_guard.redeliver_dropped)."""
        with self._lock:
            self.redelivered[topic] += messages

    def observe_stalled(self, stalled: Iterable[tuple[str, int, float]]) -> None:
        """The input partitions (topic, partition, seconds since their last fetch) behind their log end of which
        nothing is fetched (input_ledger.InputLedger.stalled), as of the last check: the gauge shows only these."""
        with self._lock:
            self.stalled = {(t, p): s for t, p, s in stalled}

    def observe_detections(self, detections: Iterable[Any]) -> None:
        """Detections (schemas.detection.Detection) emitted by the detect stage, each emission (re-emissions too)."""
        with self._lock:
            self.batches["detect"] += 1
            for d in detections:
                self.detections[(d.detector_id, d.outcome)] += 1

    def observe_case_events(self, events: Iterable[Any]) -> None:
        """Case events (schemas.case.CaseEvent) written by the cases stage."""
        with self._lock:
            self.batches["cases"] += 1
            for e in events:
                self.case_events[e.action] += 1

    def observe_event_time(self, stage: str, t: float | None) -> None:
        """The newest event time `stage` has processed (its watermark)."""
        if t is None:
            return
        with self._lock:
            if t > self.event_time.get(stage, float("-inf")):
                self.event_time[stage] = t

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            dets, events = dict(self.detections), dict(self.case_events)
            times, batches, stalled = dict(self.event_time), dict(self.batches), dict(self.stalled)
            redelivered = dict(self.redelivered)
        now = self.clock()
        fam = CounterMetricFamily("trainwatch_detections", "Detection emissions, per detector and outcome (a "
                                  "re-decided detection re-emitted under its id counts again; distinct findings: "
                                  "the store's detections_by_detector)", labels=["detector", "outcome"])
        for (det, outcome), n in sorted(dets.items()):
            fam.add_metric([det, outcome], n)
        yield fam
        fam = CounterMetricFamily("trainwatch_case_events", "Case events written, per action", labels=["action"])
        for action, n in sorted(events.items()):
            fam.add_metric([action], n)
        yield fam
        fam = CounterMetricFamily("trainwatch_stage_batches", "Batches processed, per stage", labels=["stage"])
        for stage, n in sorted(batches.items()):
            fam.add_metric([stage], n)
        yield fam
        et = GaugeMetricFamily("trainwatch_stage_event_time_seconds", "Newest event time processed (epoch s)",
                               labels=["stage"])
        lag = GaugeMetricFamily("trainwatch_stage_event_time_lag_seconds",
                                "Wall clock minus the newest event time processed", labels=["stage"])
        for stage, t in sorted(times.items()):
            et.add_metric([stage], t)
            lag.add_metric([stage], max(0.0, now - t))
        yield et
        yield lag
        fam = GaugeMetricFamily("trainwatch_input_stalled_seconds", "Seconds since anything was fetched of an input "
                                "partition behind its log end (only such partitions; none: reading keeps up)",
                                labels=["topic", "partition"])
        for (topic, partition), idle in sorted(stalled.items()):
            fam.add_metric([topic, str(partition)], idle)
        yield fam
        fam = CounterMetricFamily("trainwatch_input_redelivered_messages", "Input messages faust fetched and did not "
                                  "hand to an agent, sought back and fetched again (a restart's first fetch, a flow "
                                  "stop)", labels=["topic"])
        for topic, n in sorted(redelivered.items()):
            fam.add_metric([topic], n)
        yield fam


class CaseStoreCollector:
    """Case gauges read from the store at scrape time. `clock` gives the time days are counted from."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        rows = self.store.query(
            "SELECT status, count() AS n, "
            "countIf(due_at IS NOT NULL AND due_at < {now:Float64}) AS overdue, "
            "countIf(due_at IS NOT NULL AND due_at >= {now:Float64} AND due_at <= {soon:Float64}) AS soon "
            "FROM cases FINAL GROUP BY status",
            {"now": now, "soon": now + SOON_DAYS * DAY},
        )
        by = {r["status"]: r for r in rows}
        fam = GaugeMetricFamily("trainwatch_cases", "Cases per status (latest version)", labels=["status"])
        for s in sorted(set(STATUSES) | by.keys()):
            fam.add_metric([s], by.get(s, {}).get("n", 0))
        yield fam
        yield GaugeMetricFamily("trainwatch_cases_overdue", "Pending cases past their due date",
                                value=sum(by.get(s, {}).get("overdue", 0) for s in PENDING))
        yield GaugeMetricFamily("trainwatch_cases_due_within_3d", "Pending cases due within 3 days",
                                value=sum(by.get(s, {}).get("soon", 0) for s in PENDING))


def registry_for(store: Store | None = None, stage: StageMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    if store is not None:
        reg.register(CaseStoreCollector(store, clock))
    if stage is not None:
        reg.register(stage)
    return reg


def case_metrics_text(store: Store, now: float) -> bytes:
    """The case gauges in Prometheus text format (the console's /metrics)."""
    return generate_latest(registry_for(store, clock=lambda: now))


def serve(port: int, addr: str = "127.0.0.1", store: Store | None = None, stage: StageMetrics | None = None) -> Any:
    """Start a /metrics endpoint for a stage process (daemon thread); returns (server, thread)."""
    return start_http_server(port, addr, registry=registry_for(store, stage))
