"""The whole pipeline in one process, without Kafka: ingest core -> detect stage -> cases -> ClickHouse store.

Used by `trainwatch replay` and `trainwatch demo`, by tests and by benchmarks. The stages are the same objects the
Kafka adapters drive; only the transport differs. Records come in delivery order (pipeline/sources.py).
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from detectors.classifier_base import WorkloadClassifier
from pipeline.cases.feed import CaseFeedMessage
from pipeline.cases.service import CaseService
from pipeline.classifier_loader import load_classifier
from pipeline.detect.stage import DetectOutput, DetectStage
from pipeline.ingest.aggregate import WindowConfig
from pipeline.ingest.stage import IngestCore, SourceMessage
from pipeline.sources import Record
from pipeline.store import DeadLetter, Store
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.errors import InvalidMessage
from schemas.policy import Policy
from schemas.serde import decode, loads
from schemas.windows import WindowAggregate

Clock = Callable[[], float]


@dataclass
class RunResult:
    counters: Counter = field(default_factory=Counter)
    detections: list[Detection] = field(default_factory=list)
    feed: list[CaseFeedMessage] = field(default_factory=list)
    watermark: float = float("-inf")


def node_partition(value: bytes | None, partitions: int) -> int:
    """The partition a producer keying native JSON telemetry by its node would pick (CRC-32 of the key, as
    librdkafka's default partitioner; anything else: partition 0)."""
    if not value or not value.startswith(b"{"):
        return 0
    try:
        node = loads(value).get("node")
    except (InvalidMessage, AttributeError):  # malformed (a dead letter), or not an object
        return 0
    return zlib.crc32(str(node).encode()) % partitions


class InProcessPipeline:
    """Feed records with `push`, then `finish`. Writes windows, detections, dead letters, CIP and cases to `store`."""

    def __init__(self, store: Store, policy: Policy, classifier: WorkloadClassifier | None = None, *,
                 window: WindowConfig | None = None, decoder: str = "native", batch_size: int = 5000,
                 clock: Clock = time.time, topics: dict[str, str] | None = None,
                 telemetry_partitions: int = 1) -> None:
        self.window = window or WindowConfig()
        self.store = store
        self.clock = clock
        self.batch_size = batch_size
        #: telemetry spread over this many partitions by node, as a Kafka producer keying by node spreads it
        #: (librdkafka's default partitioner: CRC-32 of the key): each partition has its own watermark, so which rows
        #: arrive late, hence a window's first merge, is the Kafka path's (benchmarks/chaos.py compares with both)
        self.telemetry_partitions = telemetry_partitions
        self.topics = {"telemetry": "gpu.telemetry", "allocations": "compute.allocations", "cip": "accounts.cip"}
        self.topics.update(topics or {})
        self.ingest = IngestCore(self.window, decoder)
        # The packaged classifier unless one is given; a missing or mismatched artifact is an error, not a fallback.
        clf = classifier if classifier is not None else load_classifier(None, policy)
        self.detect = DetectStage(policy, clf, self.window.window_s, self.window.allowed_lateness_s)
        self.cases = CaseService(store, policy)
        self.result = RunResult()
        self._telemetry: list[SourceMessage] = []
        self._cips: dict[str, CipRecord] = {}

    # -- input ------------------------------------------------------------------------------------------------

    def push(self, rec: Record) -> None:
        if rec.stream == "telemetry":
            self._telemetry.append(SourceMessage(rec.offset, rec.value))
            if len(self._telemetry) >= self.batch_size:
                self._flush_telemetry()
            return
        # Control records act at their place in the stream: windows the telemetry before them closed go first.
        self._flush_telemetry()
        if rec.stream == "cip":
            self._on_cip(rec)
        elif rec.stream == "allocations":
            self._on_allocation(rec)
        else:
            raise ValueError(f"unknown stream {rec.stream!r}")

    def run(self, records: Iterable[Record], progress: Callable[[int], None] | None = None) -> RunResult:
        n = 0
        for rec in records:
            self.push(rec)
            n += 1
            if progress is not None and n % 10_000 == 0:
                progress(10_000)
        if progress is not None:
            progress(n % 10_000)
        return self.finish()

    def finish(self) -> RunResult:
        """End of a finite input: close every open window, run time rules and the deadline monitor."""
        self._flush_telemetry()
        windows, dead = self.ingest.finish()  # letters decided while draining (held rows too late or ahead) too
        self._dead_letters(dead)
        self._windows(windows)
        self._carry(self.detect.flush())  # CIP records and allocations after the last window
        self._carry(self.detect.on_time())
        self._tick()
        self.result.counters.update(self.ingest.counters)
        self.result.watermark = self.detect.watermark
        return self.result

    # -- stages ---------------------------------------------------------------------------------------------

    def _flush_telemetry(self) -> None:
        if not self._telemetry:
            return
        msgs, self._telemetry = self._telemetry, []
        parts: dict[int, list[SourceMessage]] = {0: msgs}
        if self.telemetry_partitions > 1:
            parts = {}
            for m in msgs:
                parts.setdefault(node_partition(m.value, self.telemetry_partitions), []).append(m)
        for p in sorted(parts):
            # `now` bounds how far ahead of processing time telemetry may claim to be (a broken clock).
            dead = self.ingest.process(self.topics["telemetry"], p, parts[p], now=self.clock())
            self._dead_letters(dead)
            self._windows(self.ingest.ready())

    def _windows(self, windows: list[WindowAggregate]) -> None:
        if not windows:
            return
        self.store.insert_windows(windows)
        self._carry(self.detect.on_windows(windows))  # one batch: an account's corrections re-decide once

    def _carry(self, out: DetectOutput) -> None:
        """The detect core's outputs to the cases stage: CIP records as applied, then detections, then identity."""
        for cip in out.cips:
            prev = self._cips.get(cip.account_id)
            if prev is None or cip.updated_at >= prev.updated_at:
                self._cips[cip.account_id] = cip
        self._cases(out.detections)
        for cip in out.cips:
            self.result.feed += self.cases.update_identity(cip, self.clock())

    def _cases(self, dets: list[Detection]) -> None:
        if not dets:
            return
        self.store.insert_detections(dets)
        self.result.detections += dets
        self.result.feed += self.cases.process(dets, self.clock(), self._cips)

    def _tick(self) -> None:
        if self.detect.watermark > float("-inf"):
            self.result.feed += self.cases.tick(self.detect.watermark, self.clock())

    def _on_cip(self, rec: Record) -> None:
        try:
            cip = decode(CipRecord, rec.value)
        except InvalidMessage as exc:
            self._dead_letters([DeadLetter(reason=exc.reason or "schema_violation", detail=str(exc),
                                           topic=self.topics["cip"], offset=rec.offset, raw=rec.value)])
            return
        self.store.upsert_cip([cip])
        self._carry(self.detect.on_cip(cip))  # held until the windows reach its event time (DetectStage)

    def _on_allocation(self, rec: Record) -> None:
        try:
            ev = decode(AllocationEvent, rec.value)
        except InvalidMessage as exc:
            self._dead_letters([DeadLetter(reason=exc.reason or "schema_violation", detail=str(exc),
                                           topic=self.topics["allocations"], offset=rec.offset, raw=rec.value)])
            return
        self._carry(self.detect.on_allocation(ev))

    def _dead_letters(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        now = self.clock()
        self.store.insert_dead_letters([d.model_copy(update={"detail": d.detail[:1000], "at": now}) for d in letters])
        self.result.counters.update(f"dlq.{d.reason}" for d in letters if d.topic != self.topics["telemetry"])
