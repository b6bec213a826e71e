"""One batch of the faust detect app's agents as plain code: Kafka messages in, what to store and send out.

The agents (pipeline/detect/faust_app.py) only turn faust events into `Msg`, call these, and carry the results
(store writes, sends, acks). Nothing here touches Kafka or the store, so each step is testable with plain data
(tests/test_detect_batch.py):
- `by_partition`: a batch split per input partition, each in arrival order;
- `feed_partition`: one partition's messages into its DetectStage (restored from the tables at first use), bad
  messages become dead letters, never lost; `flush_partition`: what an idle partition held, applied (its
  stage restored first if this process has not met it);
- `QuietSources`: which telemetry partitions a detect partition has not heard from for a while (processing time),
  so its stage stops waiting for them to settle windows (checked in each batch, after its messages);
- `owner_payloads`: the stage's owner messages stamped with where their account stood (event time, docs/faust.md);
- `receive_owner_messages` / `decode_detections`: the owners and cases agents' batches;
- `dead_letter`: the letter for a message that does not parse.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from detectors.owner_aggregate import stamped
from pipeline.detect.stage import DetectOutput, DetectStage
from pipeline.detect.tables import OwnersTables, StageTables
from pipeline.settings import TopicSettings
from pipeline.store import DeadLetter
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.errors import InvalidMessage
from schemas.owner import OwnerMessage
from schemas.serde import decode
from schemas.windows import WindowAggregate


@dataclass(frozen=True)
class Msg:
    """A consumed message as the batch code needs it (value None: a tombstone)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    #: its Kafka timestamp in seconds (CreateTime, or LogAppendTime when the topic says so); None: unknown
    timestamp: float | None = None


@dataclass
class PartitionBatch:
    """What one partition's messages of a batch produced, in the order the transport must carry it: the dead letters,
    CIP records and windows to the store, then (after the stage's state is queued to the changelogs) `out`."""

    stage: DetectStage
    out: DetectOutput = field(default_factory=DetectOutput)
    #: account -> its latest window end already sent to the owners, before this batch (owner_payloads)
    reached: dict[str, float] = field(default_factory=dict)
    windows: list[WindowAggregate] = field(default_factory=list)
    cips: list[CipRecord] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)


def dead_letter(exc: InvalidMessage, m: Msg, at: float) -> DeadLetter:
    return DeadLetter(reason=exc.reason or "schema_violation", detail=str(exc)[:1000], topic=m.topic,
                      partition=m.partition, offset=m.offset, raw=m.value or b"", at=at)


#: The reason of the letter that notes a CIP record or allocation applied at its arrival (`at_arrival`).
CLOCK_AHEAD_APPLIED = "clock_ahead_applied"


def at_arrival(rec: CipRecord | AllocationEvent, m: Msg, skew_s: float, at: float,
               letters: list[DeadLetter]) -> CipRecord | AllocationEvent:
    """`rec`, dated at its message's arrival when its own time is more than `skew_s` ahead of it: a bad clock at the
    source (a record cannot be from after it was sent). Held until the windows reached its claimed time, it would
    leave its customer unknown meanwhile and date what it decides late by the skew (a foreign update's cases: their
    knowledge, their due date). Its content is used, at the latest time it can truly be from, and a letter
    `clock_ahead_applied` keeps the message as sent and says what was done. Without a timestamp: as it is."""
    name = "updated_at" if isinstance(rec, CipRecord) else "ts"
    t = getattr(rec, name)
    if m.timestamp is None or not t > m.timestamp + skew_s:
        return rec
    letters.append(DeadLetter.of(
        CLOCK_AHEAD_APPLIED, f"{name} {t} is {t - m.timestamp:.0f} s ahead of its message's timestamp "
        f"{m.timestamp} (bound {skew_s:.0f} s): applied with {name} = {m.timestamp}", m.topic, m.partition,
        m.offset, m.value or b"").model_copy(update={"at": at}))
    return rec.model_copy(update={name: m.timestamp})


def by_partition(msgs: Iterable[Msg]) -> dict[int, list[Msg]]:
    out: dict[int, list[Msg]] = {}
    for m in msgs:
        out.setdefault(m.partition, []).append(m)
    return out


@dataclass
class QuietSources:
    """Which telemetry partitions each detect partition has stopped hearing from, on the worker's monotonic clock.

    A window's partials come from every telemetry partition carrying its nodes; the stage settles it once the slowest
    partition it waits for has passed it (DetectStage). A partition whose windows stop reaching a detect partition
    (its accounts' jobs there ended, its ingest ended) must stop being waited for, or nothing settles. Event time
    cannot say which it is: a partition whose ingest is restarting, catching up, or behind a broker failover is
    minutes of event time behind when the stream is replayed fast (the chaos run: ~60x), yet alive, and its partials
    are still coming. So a partition counts as quiet after `quiet_s` seconds without a window from it here
    (`detect.source_quiet_s`). A partition first met in this process (a restart, a rebalance) counts as heard from
    then: a restored stage waits, it never releases early."""

    quiet_s: float
    #: detect partition -> telemetry partition -> monotonic time of its last window here (or of first meeting it)
    heard: dict[int, dict[int, float]] = field(default_factory=dict)

    def heard_from(self, p: int, sources: Iterable[int], now: float) -> None:
        """Windows from `sources` reached detect partition p at `now`."""
        h = self.heard.setdefault(p, {})
        for k in sources:
            h[k] = now

    def meet(self, p: int, known: Iterable[int], now: float) -> None:
        """The telemetry partitions of `known` (the stage's progress) first met here count as heard from `now`: a
        stage restored with progress from partitions this process has not heard from yet waits for them."""
        h = self.heard.setdefault(p, {})
        for k in known:
            h.setdefault(k, now)

    def quiet(self, p: int, known: Iterable[int], now: float) -> set[int]:
        """The telemetry partitions of `known` not heard from for quiet_s (a query: one never met is not quiet)."""
        h = self.heard.get(p, {})
        return {k for k in known if k in h and now - h[k] >= self.quiet_s}


def _stage(tabs: StageTables, p: int) -> tuple[DetectStage, bool]:
    """Partition p's stage; one restored just now first re-sends what its state implies for the owners (a publish
    lost in a crash: contributions replace, retractions are idempotent)."""
    st, new = tabs.stage(p)
    if new:
        st.engine.owner_outbox += st.engine.owner_snapshot()
    return st, new


def feed_partition(tabs: StageTables, p: int, msgs: list[Msg], topics: TopicSettings, at: float,
                   sources: QuietSources | None = None, now: float = 0.0,
                   max_clock_skew_s: float = 300.0) -> PartitionBatch:
    """Partition p's messages (windows, CIP records, allocations, any order) into its stage, then (with `sources`,
    `now` on its clock) the telemetry partitions heard from are noted and the quiet ones no longer waited for, then
    idle state expires (event time). A stage restored just now first re-sends its owner snapshot (`_stage`). A CIP
    record or allocation dated more than `max_clock_skew_s` after its message's timestamp is applied at the latter
    (`at_arrival`)."""
    st, _ = _stage(tabs, p)
    b = PartitionBatch(st, reached=st.engine.account_progress())
    st.begin_batch()  # an account's corrections in this batch re-decide once (DetectStage.begin_batch)
    for m in msgs:
        try:
            if m.topic == topics.windows:
                w = decode(WindowAggregate, m.value)
                b.windows.append(w)
                tabs.before_window(p, st, w)
                b.out.extend(st.on_window(w))
            elif m.topic == topics.cip:
                cip = at_arrival(decode(CipRecord, m.value), m, max_clock_skew_s, at, b.letters)
                b.cips.append(cip)
                b.out.extend(st.on_cip(cip))
            else:
                ev = at_arrival(decode(AllocationEvent, m.value), m, max_clock_skew_s, at, b.letters)
                b.out.extend(st.on_allocation(ev))
        except InvalidMessage as exc:
            b.letters.append(dead_letter(exc, m, at))
    b.out.extend(st.end_batch())
    if sources is not None:
        sources.heard_from(p, {w.partition for w in b.windows}, now)
        sources.meet(p, st.progress, now)
        b.out.extend(st.set_quiet(sources.quiet(p, st.progress, now)))
    b.out.extend(st.on_time())
    return b



def flush_partition(tabs: StageTables, p: int) -> PartitionBatch | None:
    """An idle partition's held CIP records / allocations and settling windows, applied (DetectStage.flush). A stage
    this process has not met yet is restored from the tables first (a worker restarted after its input stopped:
    without this its settling windows and held records would wait for input that never comes), re-sending its
    owner snapshot as `feed_partition` does. None: nothing to do (no state, or nothing held)."""
    if not tabs.has_state(p):
        return None
    st, new = _stage(tabs, p)
    if not new and not st.held:
        return None
    b = PartitionBatch(st, reached=st.engine.account_progress())
    b.out = st.flush()
    b.out.extend(st.on_time())  # idle state expired, and the queued owner messages taken out (DetectStage._routed)
    return b


def owner_payloads(b: PartitionBatch, p: int, lateness_s: float) -> list[dict[str, Any]]:
    """The batch's owner messages as sent to the owners topic: each stamped with its account's place (`wm`)."""
    msgs = [m.root.model_dump() for m in b.out.owner_messages]
    return stamped(msgs, p, b.reached, b.stage.watermark - lateness_s)


def receive_owner_messages(tabs: OwnersTables, msgs: list[Msg], at: float) -> tuple[list[Detection], list[DeadLetter]]:
    """An owners-agent batch into the tables' EventTimeOwners: the owner-level detections, and dead letters for what
    is not an owner message. The caller saves the tables."""
    tabs.begin()
    out: list[Detection] = []
    letters: list[DeadLetter] = []
    for m in msgs:
        try:
            out += tabs.receive(OwnerMessage.model_validate(json.loads(m.value or b"")).root.model_dump(), m.partition)
        except (ValueError, KeyError, TypeError) as exc:  # not an owner message: kept as a letter, carry on
            letters.append(dead_letter(InvalidMessage(f"owner message: {exc!r}", reason="schema_violation"), m, at))
    return out, letters


def decode_detections(msgs: list[Msg], at: float) -> tuple[list[Detection], list[DeadLetter]]:
    dets: list[Detection] = []
    letters: list[DeadLetter] = []
    for m in msgs:
        try:
            dets.append(decode(Detection, m.value))
        except InvalidMessage as exc:
            letters.append(dead_letter(exc, m, at))
    return dets, letters
