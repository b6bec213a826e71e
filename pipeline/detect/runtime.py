"""What the faust detect app's agents and timers share inside one worker process, and the small decisions they make
from it (which partition marks are due, which partitions are idle, the deadline monitor's event time).

The decisions are plain functions over plain values (tests/test_detect_batch.py); the store and the case service are
opened on first use in the worker, never at import or app build.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from detectors import registry
from detectors.classifier_base import WorkloadClassifier
from detectors.owner_aggregate import EventTimeOwners, OwnerAggregator, owner_level
from pipeline.cases.feed import CaseFeedMessage
from pipeline.cases.service import CaseService
from pipeline.classifier_loader import BackgroundClassifier, load_classifier
from pipeline.detect.batch import PartitionBatch
from pipeline.detect.feed_audit import _published_ids, unpublished
from pipeline.detect.startup import phase
from pipeline.detect.store_retry import backoff, stored
from pipeline.detect.tables import StageTables
from pipeline.settings import Settings
from pipeline.stage_metrics import StageMetrics
from pipeline.store import DeadLetter, Store
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.policy import Policy, load_policy

log = logging.getLogger(__name__)


async def published_ids(settings: Settings, max_delay_s: float = 5.0) -> set[str]:
    """The case feed's message ids (feed_audit), read in a thread so the event loop goes on (a restart's group join
    waited ~1 s behind it); retried with capped backoff while the feed cannot be read to its end in time."""
    for delay in backoff(0.2, max_delay_s):
        try:
            return await asyncio.get_running_loop().run_in_executor(None, _published_ids, settings,
                                                                    settings.topics.cases)
        except TimeoutError as exc:
            log.warning("feed audit: %s; retrying", exc)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: backoff() never ends")


def mark_due(last: float | None, wm: float, caught_up: bool, window_s: float) -> bool:
    """Whether a partition's mark `wm` goes to the owners now: once per window of progress, when caught up (the
    owners must not wait a window for the last one), or when it changes to or from QUIET; never -inf."""
    last = float("-inf") if last is None else last
    return wm > float("-inf") and wm != last and (caught_up or not last < wm < last + window_s)


def idle_partitions(mine: Iterable[int], last_input: dict[int, float], started: float, idle_s: float,
                    now: float) -> list[int]:
    """The partitions of `mine` without input for `idle_s` (a partition with none yet counts from `started`)."""
    return [p for p in sorted(mine) if now - last_input.get(p, started) >= idle_s]


def tick_watermark(recovered: dict[int, float], applied: dict[int, float]) -> float:
    """The event time every local partition has reached: its stage's, or for a partition this process has not met
    yet its recovered checkpoint's (-inf: nothing known, no tick)."""
    marks = recovered | applied
    return min(marks.values()) if marks else float("-inf")


@dataclass
class DetectRuntime:
    """What the agents share inside one worker process."""

    settings: Settings
    policy: Policy
    classifier: WorkloadClassifier | None = None
    tables: StageTables | None = None
    owners: EventTimeOwners | None = None
    marked: dict[int, float] = field(default_factory=dict)  # partition -> its last mark sent to the owners
    last_input: dict[int, float] = field(default_factory=dict)  # partition -> monotonic time of its last batch
    metrics: StageMetrics = field(default_factory=StageMetrics)  # the worker's /metrics (counters, no I/O)
    _store: Store | None = None
    _cases: CaseService | None = None

    @property
    def store(self) -> Store:
        if self._store is None:  # opened in the worker, never at import or app build
            self._store = Store.connect(self.settings.clickhouse_dsn, self.settings.database)
            phase("store-open")
        return self._store

    @property
    def cases(self) -> CaseService:
        if self._cases is None:
            self._cases = CaseService(self.store, self.policy)
            phase("cases-loaded")
        return self._cases

    @classmethod
    def build(cls, settings: Settings, partitions: int, classifier: WorkloadClassifier | None = None) -> DetectRuntime:
        """The runtime of a worker over `partitions` input partitions. The artifact loads in a thread from here on,
        while the worker starts, joins and replays its changelogs (pipeline/classifier_loader.py)."""
        policy = load_policy(settings.policy)
        rt = cls(settings, policy, classifier or load_classifier(settings.model_path, policy, background=True))
        rt.owners = EventTimeOwners(OwnerAggregator(policy, settings.window_s, owner_level(registry.build())),
                                    sources=partitions, idle_s=settings.detect.owner_idle_s)
        return rt

    def preload(self) -> CaseService:
        """Open the store and load the case book now (~1 CPU s with a few cases; the first batch needs it)."""
        return self.cases

    def mark(self, p: int, wm: float, caught_up: bool) -> bool:
        """Whether partition p's mark `wm` is to be sent now (then recorded as sent)."""
        if not mark_due(self.marked.get(p), wm, caught_up, self.settings.window_s):
            return False
        self.marked[p] = wm
        return True

    # -- store side of a batch: every call retried while the store is down (store_retry), results for the feed ------

    async def store_letters(self, letters: list[DeadLetter]) -> None:
        if letters:
            await stored("dead letters", lambda: self.store.insert_dead_letters(letters))

    async def store_inputs(self, b: PartitionBatch) -> None:
        """A partition batch's dead letters, CIP records (PII, account owners) and window partials."""
        await self.store_letters(b.letters)
        if b.cips:
            await stored("CIP records", lambda: self.store.upsert_cip(b.cips))
        if b.windows:
            await stored("windows", lambda: self.store.insert_windows(b.windows))

    async def identity_updates(self, cips: list[CipRecord]) -> list[CaseFeedMessage]:
        """CIP records as the stage applied them: identity refresh and revisions of their accounts' cases."""
        out: list[CaseFeedMessage] = []
        for cip in cips:
            out += await stored("identity update", lambda c=cip: self.cases.update_identity(c, time.time()))
        return out

    async def apply_detections(self, dets: list[Detection]) -> list[CaseFeedMessage]:
        """Detections stored, then applied to the cases (store = truth, deterministic ids)."""
        await stored("detections", lambda: self.store.insert_detections(dets))
        msgs = await stored("cases", lambda: self.cases.process(dets, time.time()))
        self.metrics.observe_case_events(m.change for m in msgs)
        self.metrics.observe_event_time("cases", max(d.event_time for d in dets))
        return msgs

    async def feed_gaps(self) -> list[CaseFeedMessage]:
        """Case events in the store that the feed lacks (a kill between the store write and the publish)."""
        have = await published_ids(self.settings)
        return await stored("feed audit", lambda: unpublished(self.settings, self.store, self.policy, have))

    async def deadline_tick(self, wm: float) -> list[CaseFeedMessage]:
        return await stored("deadline tick", lambda: self.cases.tick(wm, time.time())) if wm > float("-inf") else []

    async def classifier_loaded(self) -> None:
        """Wait (off the event loop: heartbeats and fetches go on) for a classifier loading in the background.
        Its ArtifactError is raised here: never classify without the model."""
        if isinstance(self.classifier, BackgroundClassifier) and not self.classifier.ready:
            await asyncio.get_running_loop().run_in_executor(None, self.classifier.wait)
        phase("classifier-ready")

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
