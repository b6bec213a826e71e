"""The detect and cases stages on Kafka as a faust-streaming app: a transport around DetectStage and CaseService.

`make_app(settings)` builds the app; nothing happens at import. At-least-once (docs/faust.md):
- `detect` feeds each input partition's DetectStage (windows, CIP records, allocations) and carries its
  DetectOutput: detections to `topics.detections`, owner messages to the owners repartition topic (then the
  partition's mark), the CIP records as applied to the cases' identity refresh / revisions. The batch's state goes
  to the `engine` / `partials` changelogs (pipeline/detect/tables.py) before the batch is acked.
- `owners` applies owner messages in event time (EventTimeOwners, table `owners`) across partitions.
- `cases` applies detections with CaseService and publishes the feed (at start: case events the feed lacks).
- Timers: quiet partitions (held records released, marked QUIET to the owners), the deadline monitor.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import faust

from detectors import registry
from detectors.classifier_base import WorkloadClassifier
from detectors.owner_aggregate import (
    ALL_OWNERS,
    QUIET,
    EventTimeOwners,
    OwnerAggregator,
    owner_level,
    partition_mark,
    stamped,
)
from pipeline.cases.service import CaseService
from pipeline.classifier_loader import BackgroundClassifier, load_classifier
from pipeline.detect.feed_audit import unpublished
from pipeline.detect.security import faust_credentials
from pipeline.detect.stage import DetectOutput, DetectStage
from pipeline.detect.startup import phase
from pipeline.detect.store_retry import stored
from pipeline.detect.tables import OwnersTables, StageTables, dumps
from pipeline.detect.topics import owners_topic
from pipeline.settings import Settings
from pipeline.stage_metrics import StageMetrics
from pipeline.store import DeadLetter, Store
from pipeline.topics import CHANGELOG_CONFIG, TABLES
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.errors import ArtifactError, InvalidMessage
from schemas.owner import OwnerMessage
from schemas.policy import Policy, load_policy
from schemas.serde import decode, encode
from schemas.windows import WindowAggregate

__all__ = ["DetectRuntime", "make_app", "owners_topic"]

BATCH = 500  # events per take (waiting at most settings.detect.batch_within_s); the unit of checkpoint and ack
TICK_EVERY_S = 5.0


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

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def make_app(settings: Settings, *, app_id: str = "trainwatch-detect", partitions: int = 1,
             classifier: WorkloadClassifier | None = None) -> tuple[faust.App, DetectRuntime]:
    """Build the faust app and its runtime. `partitions` = the (shared) partition count of the input topics."""
    kafka = settings.kafka
    app = faust.App(
        app_id, broker=[f"kafka://{b.strip()}" for b in kafka.bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(kafka), store="memory://",
        datadir=str(settings.data_dir / f"{app_id}-data"), processing_guarantee="at_least_once",
        web_enabled=False, autodiscover=False, topic_partitions=partitions,
        topic_replication_factor=settings.topic_config.replication_factor, topic_allow_declare=True,
        consumer_auto_offset_reset="earliest", broker_commit_interval=1.0, stream_wait_empty=False,
        table_standby_replicas=0,
        # A killed worker's partitions move after the session timeout; with a group instance id (static
        # membership) a restarted worker takes them back at once.
        broker_session_timeout=kafka.session_timeout_s, broker_heartbeat_interval=min(3.0, kafka.session_timeout_s / 3),
        consumer_group_instance_id=f"{kafka.group_instance_id}-detect" if kafka.group_instance_id else None,
    )
    policy = load_policy(settings.policy)
    # With TRAINWATCH_BACKGROUND_CLASSIFIER=1 the artifact loads while the worker joins (measured slower here, so
    # off by default); the detect agent then waits for it before its first batch (pipeline/classifier_loader.py).
    rt = DetectRuntime(settings, policy, classifier or load_classifier(settings.model_path, policy, background=True))
    phase("classifier")
    topics, raw = settings.topics, {"key_serializer": "raw", "value_serializer": "raw"}
    inputs = app.topic(topics.windows, topics.cip, topics.allocations, **raw)
    detections, feed = app.topic(topics.detections, **raw), app.topic(topics.cases, **raw)
    # Owner messages, repartitioned by beneficial owner: one owner's accounts may sit on any input partition.
    owner_topic = app.topic(owners_topic(app_id), partitions=partitions, internal=True, **raw)
    # Compacting changelogs (pipeline/topics.py) where faust creates them itself: a restart replays state, not history.
    table = {n: app.Table(n, partitions=partitions, key_type=bytes, value_type=bytes,
                          extra_topic_configs=CHANGELOG_CONFIG) for n in TABLES}
    rt.tables = tabs = StageTables(table["engine"], table["partials"], settings, policy, rt.classifier)
    rt.owners = EventTimeOwners(OwnerAggregator(policy, settings.window_s, owner_level(registry.build())),
                                sources=partitions,
                                idle_s=settings.detect.owner_idle_s)
    owner_tabs = OwnersTables(table["owners"], rt.owners)
    within_s, started = settings.detect.batch_within_s, time.monotonic()
    app.on_partitions_assigned.connect(lambda *_a, **_k: phase("assigned"))  # type: ignore[arg-type]
    app.on_rebalance_complete.connect(lambda *_a, **_k: phase("recovered"))  # type: ignore[arg-type]

    async def dead_letter(exc: InvalidMessage, ev: Any) -> None:
        m = ev.message  # ev.value None: a tombstone
        letter = DeadLetter(reason=exc.reason or "schema_violation", detail=str(exc)[:1000], topic=m.topic,
                            partition=m.partition, offset=m.offset, raw=ev.value or b"", at=time.time())
        await stored("dead letter", lambda: rt.store.insert_dead_letters([letter]))

    async def mark(p: int, wm: float, caught_up: bool) -> None:
        """Partition p's mark to every owners partition, after the messages it covers: once per window of
        progress, when caught up, or when it goes quiet (QUIET)."""
        last = rt.marked.get(p, float("-inf"))
        if wm > float("-inf") and wm != last and (caught_up or not last < wm < last + settings.window_s):
            rt.marked[p] = wm
            for k in range(partitions):
                await owner_topic.send(key=ALL_OWNERS.encode(), value=dumps(partition_mark(p, wm)), partition=k)

    async def carry(p: int, st: DetectStage, out: DetectOutput, reached: dict[str, float], wm: float,
                    caught_up: bool) -> None:
        """A partition's outputs to their transports, after its state is queued to the changelogs."""
        rt.metrics.observe_detections(out.detections)
        rt.metrics.observe_event_time("detect", st.watermark if st.watermark > float("-inf") else None)
        for d in out.detections:
            await detections.send(key=d.account_id.encode(), value=encode(d))
        msgs = [m.root.model_dump() for m in out.owner_messages]
        for c in stamped(msgs, p, reached, st.watermark - settings.ingest.allowed_lateness_s):
            await owner_topic.send(key=c["owner_id"].encode(), value=dumps(c))
        await mark(p, wm, caught_up)
        for cip in out.cips:  # as applied in event time: identity refresh and revisions of the account's cases
            for m in await stored("identity update", lambda c=cip: rt.cases.update_identity(c, time.time())):
                await feed.send(key=m.key, value=encode(m))

    async def feed_one(p: int, st: DetectStage, ev: Any, windows: list[WindowAggregate]) -> DetectOutput:
        topic = ev.message.topic
        if topic == topics.windows:
            w = decode(WindowAggregate, ev.value)
            windows.append(w)
            tabs.before_window(p, st, w)
            return st.on_window(w)
        if topic == topics.cip:
            cip = decode(CipRecord, ev.value)
            await stored("CIP record", lambda: rt.store.upsert_cip([cip]))
            return st.on_cip(cip)
        return st.on_allocation(decode(AllocationEvent, ev.value))

    @app.agent(inputs, concurrency=1)
    async def detect(stream: Any) -> None:
        async for events in stream.take_events(BATCH, within=within_s):
            phase("first-batch")
            if isinstance(rt.classifier, BackgroundClassifier) and not rt.classifier.ready:
                try:  # off the event loop, so heartbeats and fetches go on meanwhile
                    await asyncio.get_running_loop().run_in_executor(None, rt.classifier.wait)
                except ArtifactError as exc:  # as fatal as at start: never classify without the model
                    await app.crash(exc)
                    raise
            by_part: dict[int, list[Any]] = {}
            for ev in events:
                by_part.setdefault(ev.message.partition, []).append(ev)
            for p, evs in by_part.items():
                st, new = tabs.stage(p)
                phase("stage-restored")
                if new:  # re-send what the restored state implies for the owners (a publish lost in a crash)
                    st.engine.owner_outbox += st.engine.owner_snapshot()
                rt.last_input[p] = time.monotonic()
                reached = st.engine.account_progress()  # each account's time as already sent
                out, windows = DetectOutput(), []
                for ev in evs:
                    try:
                        out.extend(await feed_one(p, st, ev, windows))
                    except InvalidMessage as exc:
                        await dead_letter(exc, ev)
                out.extend(st.on_time())  # idle run/account state expires (event time)
                phase("first-fed")
                if windows:
                    await stored("windows", lambda ws=windows: rt.store.insert_windows(ws))
                tabs.save(p, st)
                await carry(p, st, out, reached, st.applied_to, len(events) < BATCH)
            phase("first-batch-done")

    @app.timer(max(1.0, settings.detect.owner_idle_s / 4))
    async def quiet_partitions() -> None:
        """A partition without input for `detect.owner_idle_s` (end of a finite input, or no data at all): the
        records held ahead of its windows are applied, and it is marked QUIET to the owners."""
        mine = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topics.windows}
        for p in sorted(mine):
            if time.monotonic() - rt.last_input.get(p, started) < settings.detect.owner_idle_s:
                continue
            st = tabs.stages.get(p)
            if st is not None and st.held:
                reached = st.engine.account_progress()
                out = st.flush()
                tabs.save(p, st)
                await carry(p, st, out, reached, QUIET, True)
            await mark(p, QUIET, True)

    @app.agent(owner_topic, concurrency=1)
    async def owners(stream: Any) -> None:
        async for events in stream.take_events(BATCH, within=within_s):
            owner_tabs.begin()
            out: list[Detection] = []
            for ev in events:
                try:
                    out += owner_tabs.receive(OwnerMessage.model_validate(json.loads(ev.value)).root.model_dump(),
                                              ev.message.partition)
                except (ValueError, KeyError, TypeError) as exc:  # not an owner message: keep it, carry on
                    await dead_letter(InvalidMessage(f"owner message: {exc!r}", reason="schema_violation"), ev)
            owner_tabs.save()
            for d in out:
                await detections.send(key=d.account_id.encode(), value=encode(d))

    @app.agent(detections, concurrency=1)
    async def cases(stream: Any) -> None:
        for m in await stored("feed audit", lambda: unpublished(rt.settings, rt.store, rt.policy)):
            await feed.send(key=m.key, value=encode(m))
        phase("feed-audited")
        async for events in stream.take_events(BATCH, within=within_s):
            dets = []
            for ev in events:
                try:
                    dets.append(decode(Detection, ev.value))
                except InvalidMessage as exc:
                    await dead_letter(exc, ev)
            if not dets:
                continue
            await stored("detections", lambda ds=dets: rt.store.insert_detections(ds))
            msgs = await stored("cases", lambda ds=dets: rt.cases.process(ds, time.time()))
            rt.metrics.observe_case_events(m.change for m in msgs)
            rt.metrics.observe_event_time("cases", max(d.event_time for d in dets))
            for m in msgs:
                await feed.send(key=m.key, value=encode(m))

    @app.timer(TICK_EVERY_S)
    async def deadlines() -> None:
        """The deadline monitor at the event time every local partition has reached (a partition not met yet by
        this process: its recovered checkpoint's watermark)."""
        marks = tabs.recovered_watermarks() | {p: s.applied_to for p, s in tabs.stages.items()}
        wm = min(marks.values()) if marks else float("-inf")
        if wm > float("-inf"):
            for m in await stored("deadline tick", lambda: rt.cases.tick(wm, time.time())):
                await feed.send(key=m.key, value=encode(m))

    phase("app-built")
    return app, rt
