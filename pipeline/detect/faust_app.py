"""The detect and cases stages on Kafka as a faust-streaming app: a transport around DetectStage and CaseService.

`make_app(settings)` builds the app; nothing happens at import. Delivery is at-least-once (docs/faust.md):
- `detect` reads windows, CIP and allocations (co-partitioned, keyed by account) in batches and feeds each
  partition's DetectStage (the same core the in-process runner feeds); it carries the stage's DetectOutput:
  detections to `topics.detections`, owner messages (schemas/owner.py, stamped with their account's event time)
  to the owners repartition topic, CIP records as applied to the case identity refresh / revisions. After each
  batch the touched window partials (table `partials`) and the engine's changed per-account entries plus the
  held records (table `engine`) go to their changelogs before the batch is acked.
- `owners` applies owner messages in event time (EventTimeOwners, table `owners`), across partitions.
- `cases` applies detections with CaseService (the store is the truth, ids are deterministic) and publishes the
  case feed; at start it republishes case events the feed lacks (feed_audit.py).
- Timers: ticks for owners with held messages (re-derived from the `owners` table after a restart), the release
  of records held on a quiet partition, and the deadline monitor at the event-time watermark.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import faust

from detectors import registry
from detectors.classifier_base import WorkloadClassifier
from detectors.owner_aggregate import (
    ALL_OWNERS,
    OWNER_SKEW_S,
    QUIET,
    EventTimeOwners,
    OwnerAggregator,
    partition_mark,
    stamped,
)
from detectors.snapshot import from_split, split_dirty, split_shared
from pipeline.cases.service import CaseService
from pipeline.classifier_loader import load_classifier
from pipeline.detect.feed_audit import unpublished
from pipeline.detect.security import faust_credentials
from pipeline.detect.stage import DetectOutput, DetectStage
from pipeline.detect.store_retry import stored
from pipeline.detect.topics import owners_topic
from pipeline.settings import Settings
from pipeline.stage_metrics import StageMetrics
from pipeline.store import DeadLetter, Store
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.errors import InvalidMessage
from schemas.owner import OwnerMessage
from schemas.policy import Policy, load_policy
from schemas.serde import decode, encode
from schemas.windows import WindowAggregate

log = logging.getLogger(__name__)
__all__ = ["DetectRuntime", "make_app", "owners_topic"]

BATCH = 500  # events per take (waiting at most settings.detect.batch_within_s); the unit of checkpoint and ack
TICK_EVERY_S = 5.0


def _dumps(d: dict[str, Any]) -> bytes:
    # stdlib json: the state holds ±inf (an unset watermark), which orjson would turn into null.
    return json.dumps(d, separators=(",", ":")).encode()


@dataclass
class DetectRuntime:
    """What the agents share inside one worker process: live engines per partition, the store, the case service."""

    settings: Settings
    policy: Policy
    classifier: WorkloadClassifier | None = None
    stages: dict[int, DetectStage] = field(default_factory=dict)
    owners: EventTimeOwners | None = None
    #: partition -> the watermark last sent to its owners as a mark (marks are throttled to one per window)
    marked: dict[int, float] = field(default_factory=dict)
    #: partition -> owner messages re-derived at restore, sent with the partition's next outputs
    pending: dict[int, list[Any]] = field(default_factory=dict)
    #: partition -> processing time (monotonic) of its last input batch (the release of held records)
    last_input: dict[int, float] = field(default_factory=dict)
    #: Engine table entries as last written (key -> value): a batch writes only the entries that changed.
    written: dict[bytes, bytes] = field(default_factory=dict)
    #: partition -> its engine's shared checkpoint part as last split (`split_dirty` returns it only on change)
    shared: dict[int, dict[str, Any]] = field(default_factory=dict)
    _store: Store | None = None
    _cases: CaseService | None = None
    _held_cache: dict[bytes, tuple[bytes, int | None]] = field(default_factory=dict)
    #: what the agents did, for the worker's /metrics (pipeline/stage_metrics.py); counters only, no I/O
    metrics: StageMetrics = field(default_factory=StageMetrics)

    @property
    def store(self) -> Store:
        if self._store is None:  # opened in the worker, never at import or app build
            self._store = Store.connect(self.settings.clickhouse_dsn, self.settings.database)
        return self._store

    @property
    def cases(self) -> CaseService:
        if self._cases is None:
            self._cases = CaseService(self.store, self.policy)
        return self._cases

    def watermark(self, recovered: dict[int, float] | None = None) -> float:
        """Event time every local partition has reached (the slowest one). `recovered`: partition -> watermark of
        the checkpoints in the engine table, for partitions whose stage this process has not built yet (after a
        restart with nothing new to read, the deadline timer still runs at the recovered watermark)."""
        marks = {p: s.watermark for p, s in self.stages.items()}
        for p, wm in (recovered or {}).items():
            marks.setdefault(p, wm)
        return min(marks.values()) if marks else float("-inf")

    def held_owners(self, table: Any, part: int) -> list[str]:
        """Owners of owners partition `part` whose state (the `owners` table, recovered after a restart) holds
        pending messages: a partition mark must reach them even when nothing else does (after a kill -9 that is
        all that releases them). Values are parsed once per change (cached by value)."""
        seen: dict[bytes, tuple[bytes, int | None]] = {}
        for k, v in list(table.data.items()):
            if k.startswith(ALL_OWNERS.encode()):
                continue
            hit = self._held_cache.get(k)
            if hit is None or hit[0] is not v:
                clock = (json.loads(v) or {}).get("clock") or {}
                hit = (v, clock.get("k") if clock.get("pending") else None)
            seen[k] = hit
        self._held_cache = seen
        return sorted(k.decode() for k, (_, kp) in seen.items() if kp == part)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def make_app(settings: Settings, *, app_id: str = "trainwatch-detect", partitions: int = 1,
             classifier: WorkloadClassifier | None = None) -> tuple[faust.App, DetectRuntime]:
    """Build the faust app and its runtime. `partitions` = the (shared) partition count of the input topics."""
    kafka = settings.kafka
    app = faust.App(
        app_id,
        broker=[f"kafka://{b.strip()}" for b in kafka.bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(kafka),  # None = PLAINTEXT
        store="memory://",
        datadir=str(settings.data_dir / f"{app_id}-data"),  # not the working directory
        processing_guarantee="at_least_once",
        web_enabled=False,
        autodiscover=False,
        topic_partitions=partitions,
        # --- topics and group membership (settings; see pipeline/topics.py) ---
        # Changelogs the app declares get settings' replication (3 on the local cluster), not 1.
        topic_replication_factor=settings.topic_config.replication_factor,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # A killed worker's partitions move after the session timeout: faust's 60 s default stalls a restart.
        # With a group instance id (static membership) a restarted worker takes them back at once.
        broker_session_timeout=settings.kafka.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.kafka.session_timeout_s / 3),
        consumer_group_instance_id=(f"{settings.kafka.group_instance_id}-detect"
                                    if settings.kafka.group_instance_id else None),
        # --- end topics and group membership ---
        stream_wait_empty=False,
        table_standby_replicas=0,
    )
    policy = load_policy(settings.policy)
    if classifier is None:
        classifier = load_classifier(settings.model_path, policy)
    rt = DetectRuntime(settings, policy, classifier)
    topics = settings.topics
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    inputs = app.topic(topics.windows, topics.cip, topics.allocations, **raw)
    detections = app.topic(topics.detections, **raw)
    # Owner contributions, repartitioned by beneficial owner: one owner's accounts may sit on any input partition.
    owner_topic = app.topic(owners_topic(app_id), partitions=partitions, internal=True, **raw)
    feed = app.topic(topics.cases, **raw)
    engine_table = app.Table("engine", partitions=partitions, key_type=bytes, value_type=bytes)
    partials = app.Table("partials", partitions=partitions, key_type=bytes, value_type=bytes)
    owners_table = app.Table("owners", partitions=partitions, key_type=bytes, value_type=bytes)
    owner_det = next((d for d in registry.build() if d.id == "owner_aggregate"), None)
    rt.owners = EventTimeOwners(OwnerAggregator(rt.policy, settings.window_s, owner_det), sources=partitions,
                                skew_s=OWNER_SKEW_S)
    within_s = settings.detect.batch_within_s

    def stage_for(p: int) -> DetectStage:
        st = rt.stages.get(p)
        if st is None:  # first use in this process: from the recovered entries, or empty
            st = DetectStage(rt.policy, rt.classifier, settings.window_s, settings.ingest.allowed_lateness_s,
                             owners="external")  # owners are summed by the `owners` agent, across partitions
            prefix = f"{p}|".encode()
            mine = {k: v for k, v in engine_table.data.items() if k.startswith(prefix)}
            shared = mine.pop(prefix + b"shared", None)
            if shared is not None:
                sh = json.loads(shared)
                parts = {k[len(prefix) + 2:].decode(): json.loads(v) for k, v in mine.items()}
                st.engine = from_split(sh, parts, rt.policy, rt.classifier)
                st.engine.external_owners = True
                st.watermark = sh["stage_watermark"]
                st.load_held(sh.get("held", []))  # CIP records / allocations ahead of the windows, offsets committed
                rt.written.update(mine)
                rt.written[prefix + b"shared"] = shared
            # Re-derive what this state implies for the owners: a publish lost between checkpoint and send (a
            # retraction above all: its CIP replays as a no-op) goes out again; the rest replaces or is a no-op.
            st.engine.owner_outbox += st.engine.owner_snapshot()
            rt.stages[p] = st
            rt.pending[p] = st._routed([]).owner_messages
        return st

    def load_partials(p: int, st: DetectStage, w: WindowAggregate) -> bytes:
        """The merger keeps the partials of the windows it has met; the others come from the `partials` table."""
        key = f"{p}|{w.workload_id}|{w.window_start!r}".encode()
        mkey = (w.workload_id, w.window_start)
        if mkey not in st.merger._parts and (packed := partials.data.get(key)) is not None:
            st.merger._parts[mkey] = {i: WindowAggregate.model_validate(x) for i, x in json.loads(packed).items()}
        return key

    async def dead_letter(exc: InvalidMessage, ev: Any) -> None:
        m = ev.message
        # ev.value None: a tombstone
        letter = DeadLetter(reason=exc.reason or "schema_violation", detail=str(exc)[:1000], topic=m.topic,
                            partition=m.partition, offset=m.offset, raw=ev.value or b"", at=time.time())
        await stored("dead letter", lambda: rt.store.insert_dead_letters([letter]))

    def write_partials(p: int, st: DetectStage, touched: dict[bytes, tuple[str, float]]) -> None:
        # Partials older than the allowed lateness can no longer change a window: drop them (tombstones).
        horizon = st.watermark - settings.ingest.allowed_lateness_s - settings.window_s
        prefix = f"{p}|".encode()
        gone = [k for k in partials.data if k.startswith(prefix) and float(k.rsplit(b"|", 1)[1]) < horizon]
        for key in gone:
            partials.data.pop(key, None)
            partials.send_changelog(p, key, None)
        for key, mkey in touched.items():
            parts = st.merger._parts.get(mkey)
            if parts is not None and key not in gone:
                val = json.dumps({i: x.model_dump(mode="json") for i, x in parts.items()},
                                 separators=(",", ":")).encode()
                partials.data[key] = val
                partials.send_changelog(p, key, val)

    def checkpoint(p: int, st: DetectStage) -> None:
        """The engine's state as table entries `p|shared` and `p|a|<account>`: only the accounts the engine marked
        since the last checkpoint are serialised (`split_dirty`), and written where their bytes changed; accounts
        gone from the state are tombstoned (no entry grows with the partition's account count)."""
        prefix = f"{p}|".encode()
        shared, parts, deleted = split_dirty(st.engine)
        if shared is not None or p not in rt.shared:
            rt.shared[p] = shared if shared is not None else split_shared(st.engine)
        entries = {prefix + b"shared": _dumps({**rt.shared[p], "stage_watermark": st.watermark,
                                               "held": st.held_to_list()})}
        entries |= {prefix + b"a|" + aid.encode(): _dumps(part) for aid, part in parts.items()}
        gone = [k for k in (prefix + b"a|" + aid.encode() for aid in deleted)
                if k in rt.written or k in engine_table.data]
        for k in gone:
            rt.written.pop(k, None)
            engine_table.data.pop(k, None)
            engine_table.send_changelog(p, k, None)
        for k, v in entries.items():
            if rt.written.get(k) != v:
                rt.written[k] = engine_table.data[k] = v
                engine_table.send_changelog(p, k, v)

    async def send_mark(p: int, wm: float, caught_up: bool) -> None:
        """Partition p's watermark to every owners partition, after the owner messages it covers (EventTimeOwners).
        Throttled: once per window of progress, when caught up, or when it goes quiet (QUIET)."""
        last = rt.marked.get(p, float("-inf"))
        if wm == float("-inf") or wm == last or (last < wm < last + settings.window_s and not caught_up):
            return
        rt.marked[p] = wm
        for k in range(partitions):
            await owner_topic.send(key=ALL_OWNERS.encode(), value=_dumps(partition_mark(p, wm)), partition=k)

    async def carry(p: int, st: DetectStage, out: DetectOutput, reached: dict[str, float], caught_up: bool) -> None:
        """The core's outputs of one partition's batch to their transports (after the checkpoint is queued)."""
        msgs = [m.root.model_dump() for m in rt.pending.pop(p, [])]
        msgs += [m.root.model_dump() for m in out.owner_messages]
        floor = st.watermark - settings.ingest.allowed_lateness_s
        owner_msgs = stamped(msgs, p, reached, floor)
        rt.metrics.observe_detections(out.detections)
        rt.metrics.observe_event_time("detect", st.watermark if st.watermark > float("-inf") else None)
        for d in out.detections:
            await detections.send(key=d.account_id.encode(), value=encode(d))
        for c in owner_msgs:  # in order: per owner, the owners agent applies them as the engine made them
            await owner_topic.send(key=c["owner_id"].encode(), value=_dumps(c))
        await send_mark(p, st.watermark, caught_up)
        for cip in out.cips:  # as applied in event time: identity refresh and revisions of the account's cases
            for m in await stored("identity update", lambda c=cip: rt.cases.update_identity(c, time.time())):
                await feed.send(key=m.key, value=encode(m))

    def recovered_watermarks() -> dict[int, float]:
        out: dict[int, float] = {}
        for k, v in list(engine_table.data.items()):
            if k.endswith(b"|shared"):
                out[int(k.split(b"|", 1)[0])] = json.loads(v)["stage_watermark"]
        return out

    @app.agent(inputs, concurrency=1)
    async def detect(stream: Any) -> None:
        async for events in stream.take_events(BATCH, within=within_s):
            by_part: dict[int, list[Any]] = {}
            for ev in events:
                by_part.setdefault(ev.message.partition, []).append(ev)
            for p, evs in by_part.items():
                st = stage_for(p)
                rt.last_input[p] = time.monotonic()
                touched: dict[bytes, tuple[str, float]] = {}
                windows: list[WindowAggregate] = []
                reached = st.engine.account_progress()  # each account's time as already sent
                out = DetectOutput()
                for ev in evs:
                    topic = ev.message.topic
                    try:
                        if topic == topics.windows:
                            w = decode(WindowAggregate, ev.value)
                            windows.append(w)
                            touched[load_partials(p, st, w)] = (w.workload_id, w.window_start)
                            out.extend(st.on_window(w))
                        elif topic == topics.cip:
                            cip = decode(CipRecord, ev.value)
                            await stored("CIP record", lambda c=cip: rt.store.upsert_cip([c]))
                            out.extend(st.on_cip(cip))
                        else:
                            out.extend(st.on_allocation(decode(AllocationEvent, ev.value)))
                    except InvalidMessage as exc:
                        await dead_letter(exc, ev)
                out.extend(st.on_time())  # idle run/account state expires (event time)
                if windows:
                    await stored("windows", lambda ws=windows: rt.store.insert_windows(ws))
                write_partials(p, st, touched)
                checkpoint(p, st)
                await carry(p, st, out, reached, len(events) < BATCH)
            # take_events acks the batch after this body: the checkpoint above is already queued before it.

    started = time.monotonic()

    @app.timer(max(1.0, settings.detect.owner_idle_s / 4))
    async def quiet_partitions() -> None:
        """A partition without input for `detect.owner_idle_s` (the end of a finite input, or no data at all): the
        CIP records and allocations held ahead of its windows are applied, and it is marked QUIET to the owners."""
        mine = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topics.windows}
        for p in sorted(mine):
            if time.monotonic() - rt.last_input.get(p, started) < settings.detect.owner_idle_s:
                continue
            st = rt.stages.get(p)
            if st is not None and st.held:
                reached = st.engine.account_progress()
                out = st.flush()
                checkpoint(p, st)
                await carry(p, st, out, reached, True)
            await send_mark(p, QUIET, True)

    @app.agent(owner_topic, concurrency=1)
    async def owners(stream: Any) -> None:
        agg = rt.owners
        assert agg is not None
        async for events in stream.take_events(BATCH, within=within_s):
            agg.clear()  # this batch's owners, from the table (recovered from its changelog)
            touched: dict[str, int] = {}
            marked: set[int] = set()
            out: list[Detection] = []

            def load(oid: str, k: int, touched: dict[str, int] = touched) -> None:
                if oid not in touched:
                    packed = owners_table.data.get(oid.encode())
                    if packed is not None:
                        agg.load_owner(oid, json.loads(packed))
                touched[oid] = k

            for ev in events:
                k = ev.message.partition
                try:
                    c = OwnerMessage.model_validate(json.loads(ev.value)).root.model_dump()
                    if str(k) not in agg.parts and (pk := owners_table.data.get(f"{ALL_OWNERS}|{k}".encode())):
                        agg.load_parts(k, json.loads(pk))
                    if c["owner_id"] == ALL_OWNERS:  # a partition mark: every owner of k with held messages
                        for oid in rt.held_owners(owners_table, k):
                            load(oid, k)
                        marked.add(k)
                    else:
                        load(c["owner_id"], k)
                    out += agg.receive(c, k)
                except (ValueError, KeyError, TypeError) as exc:  # not an owner message: keep it, carry on
                    await dead_letter(InvalidMessage(f"owner message: {exc!r}", reason="schema_violation"), ev)
                    continue
            for k in marked:
                key = f"{ALL_OWNERS}|{k}".encode()
                owners_table.data[key] = _dumps(agg.parts_to_dict(k))
                owners_table.send_changelog(k, key, owners_table.data[key])
            for oid, k in touched.items():
                d = agg.owner_to_dict(oid)
                val = _dumps(d) if d is not None else None
                if val is None:
                    owners_table.data.pop(oid.encode(), None)
                else:
                    owners_table.data[oid.encode()] = val
                owners_table.send_changelog(k, oid.encode(), val)
            for d in out:
                await detections.send(key=d.account_id.encode(), value=encode(d))

    @app.agent(detections, concurrency=1)
    async def cases(stream: Any) -> None:
        for m in await stored("feed audit", lambda: unpublished(rt.settings, rt.store, rt.policy)):
            await feed.send(key=m.key, value=encode(m))
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
        wm = rt.watermark(recovered_watermarks())
        if wm == float("-inf"):
            return
        for m in await stored("deadline tick", lambda: rt.cases.tick(wm, time.time())):
            await feed.send(key=m.key, value=encode(m))

    return app, rt


def input_topics(settings: Settings) -> Iterable[str]:
    t = settings.topics
    return (t.windows, t.cip, t.allocations)
