"""The faust detect app's batch code without Kafka (pipeline/detect/batch.py, pipeline/detect/runtime.py): what one
batch of windows / CIP records / allocations / owner messages / detections turns into, and the runtime's decisions
(partition marks, idle partitions, the deadline monitor's event time)."""

from __future__ import annotations

from typing import Any

import orjson

from detectors.owner_aggregate import QUIET, partition_mark
from pipeline.detect.batch import (
    CLOCK_AHEAD_APPLIED,
    Msg,
    QuietSources,
    by_partition,
    decode_detections,
    feed_partition,
    flush_partition,
    owner_payloads,
    receive_owner_messages,
)
from pipeline.detect.runtime import DetectRuntime, idle_partitions, mark_due, tick_watermark
from pipeline.detect.stage import DetectStage
from pipeline.detect.tables import MemoryTable, OwnersTables, StageTables, dumps
from pipeline.settings import Settings, TopicSettings
from schemas.serde import encode
from schemas.windows import WindowAggregate
from tests.detector_builders import T0, W, alloc, cip, demo, owner
from tests.test_detect_settle import handed, partial

TOPICS = TopicSettings()


_Table = MemoryTable  # pipeline/detect/tables.py


def _window(i: int, account: str = "acct-b", part: int = 0) -> WindowAggregate:
    start = T0 + i * W
    return WindowAggregate(window_id=f"w-{i}-{part}", workload_id="wl-b", account_id=account, partition=part,
                           window_start=start, window_end=start + W, sample_count=6, device_count=4, node_count=1,
                           devices=[f"GPU-{d}" for d in range(4)], nodes=["n-0"], device_seconds=240.0, flop=1e15,
                           flop_low=1e15, flop_high=1e15, basis="tensor_active")


def _msgs(*items: tuple[str, bytes | None], partition: int = 0) -> list[Msg]:
    return [Msg(topic, partition, off, value) for off, (topic, value) in enumerate(items)]


def _tables(engine: _Table | None = None, partials: _Table | None = None) -> StageTables:
    return StageTables(engine or _Table(), partials or _Table(), Settings(model_path="rule"), demo(), None)


def test_by_partition_keeps_arrival_order_per_partition() -> None:
    msgs = [Msg("t", p, o, b"") for o, p in enumerate([1, 0, 1, 2, 0])]
    assert {p: [m.offset for m in ms] for p, ms in by_partition(msgs).items()} == {1: [0, 2], 0: [1, 4], 2: [3]}


def test_bad_messages_become_dead_letters_and_the_rest_is_fed() -> None:
    tabs = _tables()
    rec = cip("acct-b", owners=[owner("own-x")])
    msgs = _msgs((TOPICS.windows, encode(_window(0))), (TOPICS.windows, b"{not json"), (TOPICS.cip, encode(rec)),
                 (TOPICS.cip, None), (TOPICS.allocations, b'{"kind": "nonsense"}'),
                 *((TOPICS.windows, encode(_window(i))) for i in (1, 2, 3)))
    b = feed_partition(tabs, 0, msgs, TOPICS, at=123.0)
    assert [(x.topic, x.offset, x.raw, x.at) for x in b.letters] == [
        (TOPICS.windows, 1, b"{not json", 123.0), (TOPICS.cip, 3, b"", 123.0),
        (TOPICS.allocations, 4, b'{"kind": "nonsense"}', 123.0)]
    assert all(x.reason for x in b.letters)
    assert [w.window_id for w in b.windows] == ["w-0-0", "w-1-0", "w-2-0", "w-3-0"]  # to the store, every partial
    assert b.cips == [rec]  # to the store on arrival
    assert b.out.cips == [rec]  # applied: the clock (window ends) passed its time
    assert b.stage.watermark == T0 + 4 * W and b.stage is tabs.stages[0]
    kinds = [m.root.model_dump()["kind"] for m in b.out.owner_messages]
    assert "member" in kinds  # the CIP names a foreign owner: the owners agent learns the membership
    payloads = owner_payloads(b, 0, lateness_s=3600.0)
    assert [p["kind"] for p in payloads] == kinds and all(p["partition"] == 0 for p in payloads)
    assert all(p["wm"] >= b.stage.watermark - 3600.0 for p in payloads)


def test_a_record_dated_after_its_message_was_sent_is_applied_at_its_arrival() -> None:
    """A CIP record or allocation whose own time is a day past its message's Kafka timestamp (a bad clock at the
    source) would be held until the windows reach that day: its customer unknown meanwhile, and what it decides
    dated a day late. It is applied at the message's timestamp, content as sent, with a letter that keeps the
    message and says so; one within the bound (5 min), or without a timestamp, keeps its own time (held here: the
    windows have not reached it)."""
    tabs = _tables()
    sent_at, day = T0 + W, 86_400.0
    skewed = cip("acct-b", owners=[owner("own-x")], updated_at=sent_at + day)
    grown = alloc("acct-b", "job_started", sent_at + day, workload="wl-b")
    near = cip("acct-c", updated_at=sent_at + 200.0)
    untimed = cip("acct-d", updated_at=sent_at + day)
    msgs = [*_msgs(*((TOPICS.windows, encode(_window(i))) for i in range(4))),
            Msg(TOPICS.cip, 0, 4, encode(skewed), sent_at), Msg(TOPICS.allocations, 0, 5, encode(grown), sent_at),
            Msg(TOPICS.cip, 0, 6, encode(near), sent_at), Msg(TOPICS.cip, 0, 7, encode(untimed))]
    b = feed_partition(tabs, 0, msgs, TOPICS, at=9.0, max_clock_skew_s=300.0)
    assert [(x.reason, x.offset, x.raw, x.at) for x in b.letters] == [
        (CLOCK_AHEAD_APPLIED, 4, encode(skewed), 9.0), (CLOCK_AHEAD_APPLIED, 5, encode(grown), 9.0)]
    assert "86400 s ahead" in b.letters[0].detail and f"updated_at = {sent_at}" in b.letters[0].detail
    fixed = skewed.model_copy(update={"updated_at": sent_at})
    assert b.cips == [fixed, near, untimed]  # to the store as applied
    assert b.out.cips == [fixed]  # applied now (behind the windows' clock), not a day later
    assert b.stage.engine.cips["acct-b"] == fixed
    held = b.stage.held
    assert near in held and untimed in held and skewed not in held and fixed not in held
    assert not any(getattr(x, "event_id", None) == grown.event_id for x in held)  # the allocation too


def test_a_restored_stage_resends_what_its_state_implies_for_the_owners() -> None:
    """A membership published before a kill -9 may never have been sent (a crash between the changelog and the
    send): the first batch after the restore re-sends it, even with nothing new to read."""
    tabs = _tables()
    msgs = _msgs((TOPICS.cip, encode(cip("acct-b", owners=[owner("own-x")]))),
                 *((TOPICS.windows, encode(_window(i))) for i in range(4)))
    b = feed_partition(tabs, 0, msgs, TOPICS, at=0.0)
    tabs.save(0, b.stage)
    again = feed_partition(tabs, 0, [], TOPICS, at=0.0)  # the same process: nothing to re-send
    assert again.out.owner_messages == []
    restored = _tables(_Table(tabs.engine.data), _Table(tabs.partials.data))
    after = feed_partition(restored, 0, [], TOPICS, at=0.0)
    sent = [(m.root.model_dump()["kind"], m.root.model_dump()["owner_id"]) for m in after.out.owner_messages]
    assert ("member", "own-x") in sent
    assert after.stage.watermark == b.stage.watermark


def test_an_idle_partition_restored_after_a_restart_applies_what_it_held() -> None:
    """A worker restarted after its input stopped never gets a batch for the partition: the idle flush restores
    the stage from the tables and applies what it held (here a CIP record ahead of the windows), as the stage that
    never stopped would; a partition without state, or with nothing held, gives nothing to do."""
    tabs = _tables()
    ahead = cip("acct-b", owners=[owner("own-x")], updated_at=T0 + 10 * W)
    msgs = _msgs(*((TOPICS.windows, encode(_window(i))) for i in range(4)), (TOPICS.cip, encode(ahead)))
    b = feed_partition(tabs, 0, msgs, TOPICS, at=0.0)
    assert b.out.cips == [] and b.stage.held  # ahead of the windows' clock: held
    tabs.save(0, b.stage)
    restored = _tables(_Table(tabs.engine.data), _Table(tabs.partials.data))
    assert flush_partition(restored, 1) is None  # no state for partition 1
    out = flush_partition(restored, 0)
    assert out is not None and out.out.cips == [ahead] and not out.stage.held
    sent = {(m.root.model_dump()["kind"], m.root.model_dump()["owner_id"]) for m in out.out.owner_messages}
    assert ("member", "own-x") in sent  # applied, and the state's owner messages re-sent on the restore
    never_stopped = flush_partition(tabs, 0)
    assert never_stopped is not None and never_stopped.out.cips == [ahead]
    assert flush_partition(restored, 0) is None  # met now, nothing held


def test_owner_and_detection_batches_keep_bad_messages_as_letters() -> None:
    tabs = OwnersTables(_Table(), _owners())
    good = dumps(partition_mark(0, T0))
    out, letters = receive_owner_messages(tabs, _msgs(("o", good), ("o", b"[1, 2]"), ("o", b"\xff")), at=5.0)
    assert out == [] and [(x.offset, x.reason) for x in letters] == [(1, "schema_violation"), (2, "schema_violation")]
    assert b"*|0" not in tabs.table.data  # the source partitions' marks: saved by the caller, after the batch
    tabs.save()
    assert b"*|0" in tabs.table.data
    dets, letters = decode_detections(_msgs(("d", b"{}"), ("d", None)), at=1.0)
    assert dets == [] and [x.offset for x in letters] == [0, 1]


def _owners() -> Any:
    from detectors import registry
    from detectors.owner_aggregate import EventTimeOwners, OwnerAggregator, owner_level

    return EventTimeOwners(OwnerAggregator(demo(), W, owner_level(registry.build())), sources=1, idle_s=120.0)


def test_partition_marks_once_per_window_of_progress_or_when_caught_up() -> None:
    assert not mark_due(None, float("-inf"), True, W)  # nothing applied yet: no mark
    assert mark_due(None, T0, False, W)  # the first
    assert not mark_due(T0, T0 + W / 2, False, W)  # less than a window on, still reading a backlog
    assert mark_due(T0, T0 + W / 2, True, W)  # caught up: the owners should not wait
    assert mark_due(T0, T0 + W, False, W)
    assert not mark_due(T0, T0, True, W)  # unchanged
    assert mark_due(T0, QUIET, True, W) and mark_due(QUIET, T0 + W, False, W)  # quiet, and back
    rt = DetectRuntime(Settings(model_path="rule"), demo())
    assert rt.mark(3, T0, False) and not rt.mark(3, T0 + 1, False) and rt.marked == {3: T0}


def test_idle_partitions_and_the_deadline_watermark() -> None:
    assert idle_partitions({2, 0, 1}, {0: 100.0, 1: 10.0}, started=50.0, idle_s=60.0, now=120.0) == [1, 2]
    assert idle_partitions({0}, {}, started=100.0, idle_s=60.0, now=120.0) == []  # counts from the start
    assert tick_watermark({}, {}) == float("-inf")
    assert tick_watermark({0: 50.0, 1: 70.0}, {1: 90.0, 2: 80.0}) == 50.0  # partition 0 not met yet: its checkpoint
    assert tick_watermark({0: 50.0}, {0: 95.0}) == 95.0


def test_the_deadline_watermark_of_a_restored_partition_is_what_its_stage_had_applied() -> None:
    """With one telemetry partition behind, the stage has applied less than its clock less settle_s; a restarted
    worker's deadline tick must not run ahead of that for a partition it has not met yet."""
    tabs = _tables()
    behind = (TOPICS.windows, encode(_window(0, part=1)))
    msgs = _msgs(*((TOPICS.windows, encode(_window(i))) for i in range(4)), behind)
    b = feed_partition(tabs, 0, msgs, TOPICS, at=0.0)
    tabs.save(0, b.stage)
    assert b.stage.applied_to < b.stage.watermark - b.stage.settle_s  # partition 1 holds it back
    restored = _tables(_Table(tabs.engine.data), _Table(tabs.partials.data))
    assert restored.recovered_watermarks() == {0: b.stage.applied_to}


def _stalled_feed(tabs: StageTables, sources: QuietSources | None, now: float, windows: range,
                  part1: range = range(0)) -> list[tuple[int, int]]:
    """One batch: partition 0's partials of `windows` (and partition 1's of `part1`) of a 4+4-device workload; what
    the engine is handed, as (window index, devices)."""
    st, _ = tabs.stage(0)
    seen = handed(st)
    msgs = _msgs(*((TOPICS.windows, encode(partial(T0 + i * W, part))) for i in sorted({*windows, *part1})
                   for part, sent in ((0, windows), (1, part1)) if i in sent))
    feed_partition(tabs, 0, msgs, TOPICS, at=0.0, sources=sources, now=now)
    return [(round((s - T0) / W), d) for s, d in seen]


def test_a_partition_stalled_for_seconds_is_waited_for_however_far_behind_in_event_time() -> None:
    """The chaos run's extra scope case (issue 12): the stream is replayed ~60x real time, so an ingest partition
    restarting or behind a broker failover for 20 s falls 20 windows of event time behind. Left out of settling on
    event-time distance (15 windows, the in-process rule), the stage handed the engine half windows (4 of 8 devices)
    of every window while it was out; on the faust path the partition is waited for until it has been quiet for
    `detect.source_quiet_s` of processing time, and every window is applied whole."""
    before = DetectStage(demo(), None, W, owners="external")  # the event-time rule alone (as on faust before)
    seen = handed(before)
    for i in range(30):
        before.on_window(partial(T0 + i * W, 0))
        if i < 2:
            before.on_window(partial(T0 + i * W, 1))
    assert seen[:3] == [(T0, 8), (T0 + W, 8), (T0 + 2 * W, 4)] and len(seen) == 28  # the cause: half windows

    tabs, sources = _tables(), QuietSources(quiet_s=45.0)
    assert _stalled_feed(tabs, sources, 100.0, range(2), part1=range(2)) == []  # settle_s: nothing yet
    assert _stalled_feed(tabs, sources, 105.0, range(2, 30)) == []  # partition 1 stalls 28 windows, 5 s: held
    assert _stalled_feed(tabs, sources, 120.0, range(30, 31), part1=range(2, 31)) == [(i, 8) for i in range(29)]


def test_a_partition_quiet_for_source_quiet_s_is_left_out() -> None:
    tabs, sources = _tables(), QuietSources(quiet_s=45.0)
    _stalled_feed(tabs, sources, 100.0, range(4), part1=range(4))  # both partitions up to window 4
    assert _stalled_feed(tabs, sources, 140.0, range(4, 10)) == []  # partition 1 quiet 40 s: still waited for
    assert _stalled_feed(tabs, sources, 146.0, range(10, 12)) == [(2, 8), (3, 8)] + [(i, 4) for i in range(4, 10)]
    st, _ = tabs.stage(0)
    assert st.quiet == {1} and st.applied_to == T0 + 10 * W
    # partition 0 stops too: a batch 45 s after its last window (a CIP record, say) finds the stage waiting for nobody
    assert _stalled_feed(tabs, sources, 191.0, range(0)) == []
    assert st.quiet == {0, 1} and st.applied_to == st.watermark - st.settle_s
    _stalled_feed(tabs, sources, 192.0, range(12, 13), part1=range(12, 13))  # a window from 1: waited for again
    assert st.quiet == set()


def test_after_a_restart_every_partition_counts_as_heard_from_at_the_start() -> None:
    """A partition left out before a restart is waited for again after it (the restarted worker's clock starts
    at its first batch): the restored stage holds windows back, it never releases them early. applied_to and the
    progress come back from the held list (the one place they are kept)."""
    tabs, sources = _tables(), QuietSources(quiet_s=45.0)
    _stalled_feed(tabs, sources, 100.0, range(4), part1=range(4))
    _stalled_feed(tabs, sources, 200.0, range(4, 10))  # partition 1 quiet for 100 s: left out
    st, _ = tabs.stage(0)
    tabs.save(0, st)
    assert st.quiet == {1} and st.applied_to == T0 + 8 * W
    shared = orjson.loads(tabs.engine.data[b"0|shared"])
    assert "applied_to" not in shared  # kept once, in the held list
    restored = _tables(_Table(tabs.engine.data), _Table(tabs.partials.data))
    assert restored.recovered_watermarks() == {0: T0 + 8 * W}
    again = QuietSources(quiet_s=45.0)
    assert _stalled_feed(restored, again, 5.0, range(10, 14)) == []  # partition 1 waited for again
    back, _ = restored.stage(0)
    assert back.progress == st.progress | {0: T0 + 14 * W} and back.applied_to == T0 + 8 * W and back.quiet == set()
    assert _stalled_feed(restored, again, 51.0, range(14, 15))[-1] == (12, 4)  # quiet 46 s since the restart


def test_quiet_is_a_query_and_a_partition_first_met_counts_as_heard_from_then() -> None:
    """`quiet` only reads: the first meeting is noted by `meet` (feed_partition, after the batch's windows)."""
    sources = QuietSources(quiet_s=45.0)
    assert sources.quiet(0, {1, 2}, 100.0) == set() and sources.heard == {}
    sources.heard_from(0, {1}, 100.0)
    sources.meet(0, {1, 2}, 120.0)  # 1 was heard from at 100: its time stays; 2 first met at 120
    assert sources.heard == {0: {1: 100.0, 2: 120.0}}
    assert sources.quiet(0, {1, 2}, 150.0) == {1} and sources.quiet(0, {1, 2}, 165.0) == {1, 2}
    assert sources.heard == {0: {1: 100.0, 2: 120.0}}


def test_windows_waiting_longer_than_the_lateness_to_settle_keep_their_partials() -> None:
    """A telemetry partition stalled for source_quiet_s of processing time is more than the allowed lateness of
    event time in a fast replay (45 s at ~96x is 72 min): the windows waiting for it settled after the merger and
    the partials table had dropped their partials, and were applied as nothing (a quick chaos run: 7 windows of two
    workloads gone from their runs). Windows still settling keep their partials, in memory and in the table."""
    tabs, sources = _tables(), QuietSources(quiet_s=45.0)
    lateness = tabs.settings.ingest.allowed_lateness_s
    n = int(lateness // W) + 10
    _stalled_feed(tabs, sources, 100.0, range(4), part1=range(4))
    assert _stalled_feed(tabs, sources, 140.0, range(4, n)) == []  # partition 1 stalls past the lateness: held
    st, _ = tabs.stage(0)
    assert len(st.settling) == n - 2 and all(st.merger.has(k) for k in st.settling)
    tabs.save(0, st)
    rst, _ = _tables(_Table(tabs.engine.data), _Table(tabs.partials.data)).stage(0)  # the table kept them too
    assert rst.settling == st.settling and all(rst.merger.has(k) for k in rst.settling)
    handed_now = _stalled_feed(tabs, sources, 146.0, range(n, n + 1))  # partition 1 now quiet: they settle
    assert handed_now == [(2, 8), (3, 8)] + [(i, 4) for i in range(4, n - 1)]
