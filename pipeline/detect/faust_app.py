"""The detect and cases stages on Kafka as a faust-streaming app: a transport around DetectStage and CaseService.

`make_app(settings)` builds the app; nothing happens at import. At-least-once (docs/faust.md). The agents only turn
faust events into plain messages, call the batch code (pipeline/detect/batch.py) and carry its results:
- `detect` feeds each input partition's DetectStage; the batch's dead letters, CIP records and windows go to the
  store, its outputs (detections, owner messages then the partition's mark, the CIP records as applied to the
  cases' identity refresh / revisions), acknowledged by the brokers (`outputs_acked`), and only then its state to
  the `engine` / `partials` changelogs (pipeline/detect/tables.py); then the batch is acked. Outputs before state:
  a kill -9 between the two re-makes the outputs from the older state (duplicates, idempotent downstream), where
  state first could keep a state that says a detection was made whose message never reached the broker, and the
  re-read window, a replay to that state, would never make it again (a case dated later, or lost).
- `owners` applies owner messages in event time (EventTimeOwners, table `owners`) across partitions.
- `cases` applies detections with CaseService and publishes the feed (at start: case events the feed lacks).
- Timers: quiet partitions (held records released, marked QUIET to the owners), the deadline monitor, the input
  ledger's seeks back asked again, input partitions behind their log end and not fetched (logged, exported). Telemetry
  partitions quiet for `detect.source_quiet_s` are left out of settling in the batches (`batch.QuietSources`), not
  by a timer: a timer's outputs could interleave with a batch's and its mark overtake owner messages it covers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust

from detectors.classifier_base import WorkloadClassifier
from detectors.owner_aggregate import ALL_OWNERS, QUIET, partition_mark
from pipeline.detect import batch
from pipeline.detect.changelog_writes import ChangelogWrites
from pipeline.detect.config import faust_config
from pipeline.detect.fetch_guard import (
    faust_buffered,
    faust_buffered_any,
    faust_state,
    guard_consumer,
    hand_over,
    refetch,
    withhold_acks_on_failure,
)
from pipeline.detect.input_ledger import STALL_AFTER_S, STALL_WARNING, InputLedger
from pipeline.detect.runtime import DetectRuntime, idle_partitions, tick_watermark
from pipeline.detect.startup import phase
from pipeline.detect.tables import OwnersTables, StageTables, dumps
from pipeline.detect.topics import owners_topic
from pipeline.settings import Settings
from pipeline.topics import CHANGELOG_CONFIG, TABLES
from schemas.errors import ArtifactError
from schemas.serde import encode

__all__ = ["DetectRuntime", "make_app", "owners_topic"]

log = logging.getLogger(__name__)

BATCH = 500  # events per take (waiting at most settings.detect.batch_within_s); the unit of checkpoint and ack
# The detect agent's take is smaller: an input costs it 10-30 ms (the classifier's verdict; 2 shared CPUs), so a
# restart's backlog read as 500 took up to 11.6 s before the first checkpoint (state saved, offsets committed), and a
# worker killed again within that time would redo the same batch. With 100: 0.3-5.8 s measured (docs/faust.md); a
# quiet stream's takes are smaller anyway.
DETECT_BATCH = 100
TICK_EVERY_S = 5.0


def _msg(ev: Any) -> batch.Msg:
    m = ev.message  # timestamp: seconds (faust's aiokafka driver divides the record's ms), None when it had none
    ts = m.timestamp if m.timestamp is not None and m.timestamp_type in (0, 1) and m.timestamp > 0 else None
    return batch.Msg(m.topic, m.partition, m.offset, ev.value, ts)


def make_app(settings: Settings, *, app_id: str = "trainwatch-detect", partitions: int = 1,
             classifier: WorkloadClassifier | None = None) -> tuple[faust.App, DetectRuntime]:
    """Build the faust app and its runtime. `partitions` = the (shared) partition count of the input topics."""
    rt = DetectRuntime.build(settings, partitions, classifier)
    app = faust.App(app_id, **faust_config(settings, app_id, partitions))
    topics, raw = settings.topics, {"key_serializer": "raw", "value_serializer": "raw"}
    # Topics only this project's idempotent producers write (no compaction, no transactions): never a real gap.
    own = {topics.windows, topics.detections, owners_topic(app_id)}
    # a restart never commits past unread input, nor processes past it (fetch_guard.py, input_ledger.py)
    ledger = InputLedger(own.__contains__)
    # a table write the changelog refused stops the worker, and no offset is committed over it
    writes = ChangelogWrites(lambda exc: asyncio.get_running_loop().create_task(app.crash(exc)))
    guard_consumer(app, ledger, writes, rt.metrics.observe_redelivered)

    async def admitted(events: list[Any]) -> list[Any]:
        """The batch's events the ledger takes in order; partitions delivered past unread input are sought back."""
        take, rewind = ledger.admit(events, time.monotonic())
        await seek_back(rewind)
        return take

    async def seek_back(rewind: dict[Any, int]) -> None:
        for tp, offset in rewind.items():
            try:
                await app.consumer.seek(tp, offset)
            except Exception as exc:  # e.g. revoked meanwhile: its next owner reads from the (capped) commit
                log.warning("input ledger: seek back of %s[%d] to %d failed: %s", tp.topic, tp.partition, offset, exc)

    @app.timer(1.0)
    async def reseek() -> None:
        """Seeks back that reading has not reached, asked again (input_ledger.py: faust may drop the re-read)."""
        await seek_back(ledger.overdue(time.monotonic()))

    stall_logged: dict[Any, float] = {}

    @app.timer(STALL_AFTER_S / 3)
    async def stalled_inputs() -> None:
        """A tracked partition behind its log end of which nothing is fetched is logged with faust's state of it,
        once a minute while it lasts, and sought back to its next offset (input_ledger.py STALL_WARNING; the stalls
        seen came from fetches faust dropped, which fetch_guard.redeliver_dropped now reads again at once: this is
        the check behind it)."""
        if app.rebalancing or app.in_recovery or not ledger.next:
            return
        if faust_buffered_any(app):
            # backpressure: a full stream buffer (its agent busy, e.g. retrying the store) holds faust's one fetch
            # loop, so no partition is fetched meanwhile; not a stall (the full chaos run's store outage logged 4 of
            # the owners partitions as stalled, each at its next offset)
            rt.metrics.observe_stalled([])
            return
        try:
            ends = await app.consumer.highwaters(*ledger.next)
        except Exception as exc:  # the broker did not answer: nothing to compare with
            log.debug("input ledger: no log ends: %s", exc)
            return
        now = time.monotonic()
        stalled = ledger.stalled(ends, now)
        rt.metrics.observe_stalled((tp.topic, tp.partition, idle) for tp, _n, _e, idle in stalled)
        for tp, nxt, end, idle in stalled:
            if now - stall_logged.get(tp, float("-inf")) >= 60.0:
                stall_logged[tp] = now
                log.warning("%s: %s[%d] %d message(s) behind (next %d, log end %d), none fetched for %.0f s; "
                            "faust: %s", STALL_WARNING, tp.topic, tp.partition, end - nxt, nxt, end, idle,
                            faust_state(app, tp))
                if refetch(app, tp):
                    log.warning("input ledger: %s[%d] was assigned and not paused but out of faust's active set: "
                                "fetched again", tp.topic, tp.partition)
                # sought back as a gap is (a full stream buffer is backpressure, not a fetch position past input)
                if not faust_buffered(app, tp) and (rewind := ledger.seek_stalled(tp, now)):
                    log.warning("input ledger: %s[%d] sought back to %d", tp.topic, tp.partition, nxt)
                    await seek_back(rewind)
    inputs = app.topic(topics.windows, topics.cip, topics.allocations, **raw)
    detections, feed = app.topic(topics.detections, **raw), app.topic(topics.cases, **raw)
    # Owner messages, repartitioned by beneficial owner: one owner's accounts may sit on any input partition.
    owner_topic = app.topic(owners_topic(app_id), partitions=partitions, internal=True, **raw)
    # Compacting changelogs (pipeline/topics.py) where faust creates them itself: a restart replays state, not history.
    # ... and as large a message as the topics `topics create` makes (the producer's request size is set to it)
    changelog = {**CHANGELOG_CONFIG, "max.message.bytes": str(settings.topic_config.max_message_bytes)}
    table = {n: app.Table(n, partitions=partitions, key_type=bytes, value_type=bytes,
                          extra_topic_configs=changelog) for n in TABLES}
    for t in table.values():
        writes.watch(t)
    rt.tables = tabs = StageTables(table["engine"], table["partials"], settings, rt.policy, rt.classifier)
    owner_tabs = OwnersTables(table["owners"], rt.owners)
    within_s, started, lateness_s = settings.detect.batch_within_s, time.monotonic(), settings.ingest.allowed_lateness_s
    sources = batch.QuietSources(settings.detect.source_quiet_s)
    app.on_partitions_assigned.connect(lambda *_a, **_k: phase("assigned"))  # type: ignore[arg-type]
    app.on_rebalance_complete.connect(lambda *_a, **_k: phase("recovered"))  # type: ignore[arg-type]

    async def mark(p: int, wm: float, caught_up: bool) -> None:
        """Partition p's mark to every owners partition, after the messages it covers (runtime.mark_due)."""
        if rt.mark(p, wm, caught_up):
            for k in range(partitions):
                await owner_topic.send(key=ALL_OWNERS.encode(), value=dumps(partition_mark(p, wm)), partition=k)

    async def outputs_acked(sent: list[Any]) -> None:
        """The messages `sent` acknowledged (acks=all): only then may state that records them be written. One that
        failed stops the worker (its batch is read again after the restart) rather than be recorded as sent."""
        await app.producer.flush()
        try:
            await asyncio.gather(*sent)
        except Exception as exc:
            await app.crash(exc)
            raise

    async def carry(p: int, b: batch.PartitionBatch, wm: float, caught_up: bool) -> list[Any]:
        """A partition's outputs to their transports (their delivery futures); its state is saved after they are
        acked (module docstring)."""
        rt.metrics.observe_detections(b.out.detections)
        rt.metrics.observe_event_time("detect", b.stage.watermark if b.stage.watermark > float("-inf") else None)
        sent = [await detections.send(key=d.account_id.encode(), value=encode(d)) for d in b.out.detections]
        sent += [await owner_topic.send(key=c["owner_id"].encode(), value=dumps(c))
                 for c in batch.owner_payloads(b, p, lateness_s)]
        await mark(p, wm, caught_up)
        for m in await rt.identity_updates(b.out.cips):
            sent.append(await feed.send(key=m.key, value=encode(m)))
        return sent

    @app.agent(inputs, concurrency=1)
    async def detect(stream: Any) -> None:
        async for events in stream.take_events(DETECT_BATCH, within=within_s):
            # a batch cut short (an error, a stop) is read again, never acknowledged (fetch_guard.py)
            with withhold_acks_on_failure(events, ledger):
                if not (events := await admitted(events)):
                    continue
                phase("first-batch")
                try:
                    await rt.classifier_loaded()
                except ArtifactError as exc:  # as fatal as at start: never classify without the model
                    await app.crash(exc)
                    raise
                for p, msgs in batch.by_partition(map(_msg, events)).items():
                    rt.last_input[p] = now = time.monotonic()
                    b = batch.feed_partition(tabs, p, msgs, topics, time.time(), sources, now,
                                             settings.ingest.max_clock_skew_s)
                    await rt.store_inputs(b)
                    await outputs_acked(await carry(p, b, b.stage.applied_to, len(events) < DETECT_BATCH))
                    tabs.save(p, b.stage)
                    await hand_over(app.producer)
                phase("first-batch-done")

    @app.timer(max(1.0, settings.detect.owner_idle_s / 4))
    async def quiet_partitions() -> None:
        """A partition without input for `detect.owner_idle_s` (end of a finite input, or no data at all): the
        records held ahead of its windows are applied, and it is marked QUIET to the owners."""
        if app.rebalancing or app.in_recovery:  # a table still replaying its changelog is no state to restore
            return
        mine = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topics.windows}
        for p in idle_partitions(mine, rt.last_input, started, settings.detect.owner_idle_s, time.monotonic()):
            b = batch.flush_partition(tabs, p)
            if b is not None:
                await outputs_acked(await carry(p, b, QUIET, True))
                tabs.save(p, b.stage)
                await hand_over(app.producer)
            await mark(p, QUIET, True)

    @app.agent(owner_topic, concurrency=1)
    async def owners(stream: Any) -> None:
        async for events in stream.take_events(BATCH, within=within_s):
            with withhold_acks_on_failure(events, ledger):
                if not (events := await admitted(events)):
                    continue
                out, letters = batch.receive_owner_messages(owner_tabs, list(map(_msg, events)), time.time())
                await rt.store_letters(letters)
                await outputs_acked([await detections.send(key=d.account_id.encode(), value=encode(d)) for d in out])
                owner_tabs.save()
                await hand_over(app.producer)

    @app.agent(detections, concurrency=1)
    async def cases(stream: Any) -> None:
        rt.preload()  # the case book, loaded while the consumer thread joins the group (the first batch needs it)
        for m in await rt.feed_gaps():
            await feed.send(key=m.key, value=encode(m))
        phase("feed-audited")
        async for events in stream.take_events(BATCH, within=within_s):
            with withhold_acks_on_failure(events, ledger):
                if not (events := await admitted(events)):
                    continue
                dets, letters = batch.decode_detections(list(map(_msg, events)), time.time())
                await rt.store_letters(letters)
                for m in await rt.apply_detections(dets) if dets else []:
                    await feed.send(key=m.key, value=encode(m))

    @app.timer(TICK_EVERY_S)
    async def deadlines() -> None:
        """The deadline monitor at the event time every local partition has reached."""
        wm = tick_watermark(tabs.recovered_watermarks(), {p: s.applied_to for p, s in tabs.stages.items()})
        for m in await rt.deadline_tick(wm):
            await feed.send(key=m.key, value=encode(m))

    phase("app-built")
    return app, rt
