"""pipeline/detect/fetch_guard.py on a stand-in for faust's consumer (only the three methods the guards wrap; the
real consumer under kill -9 is tests/test_chaos_smoke.py, which asserts no gap was seen): a partition resumed before
a seek fetches only after it, and a gap on a topic that has none is never counted as acknowledged."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
from faust.types.tuples import Message

from pipeline.detect.fetch_guard import (
    GAP_WARNING,
    commit_after_state,
    defer_resume_until_seek,
    refuse_gaps,
    track_inputs,
    withhold_acks_on_failure,
)
from pipeline.detect.input_ledger import InputLedger


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


@dataclass
class Consumer:
    active: set[TP] = field(default_factory=set)
    log: list[str] = field(default_factory=list)
    gaps: list[tuple[TP, int, int]] = field(default_factory=list)

    def resume_partitions(self, tps: Any) -> None:
        self.active.update(tps)

    def _is_changelog_tp(self, tp: TP) -> bool:
        return tp.topic.endswith("-changelog")

    async def perform_seek(self) -> None:
        self.log.append(f"seek while fetching {sorted(tp.partition for tp in self.active)}")
        await asyncio.sleep(0)  # the seek awaits the broker: a fetcher would run meanwhile

    async def _add_gap(self, tp: TP, a: int, b: int) -> None:
        self.gaps.append((tp, a, b))


def test_partitions_resumed_before_the_seek_fetch_only_after_it() -> None:
    c = Consumer()
    defer_resume_until_seek(c)
    c.resume_partitions({TP("w", 0), TP("w", 1)})  # faust's recovery: resume, then seek to the committed offsets
    assert c.active == set()
    asyncio.run(c.perform_seek())
    assert c.log == ["seek while fetching []"] and c.active == {TP("w", 0), TP("w", 1)}
    asyncio.run(c.perform_seek())  # a seek with nothing deferred (faust seeks while its flow is stopped) is unchanged
    assert c.log[-1] == "seek while fetching [0, 1]"


def test_changelog_partitions_resume_at_once() -> None:
    """The recovery resumes changelog partitions to read them, with no seek after: deferring them would stall it."""
    c = Consumer()
    defer_resume_until_seek(c)
    c.resume_partitions({TP("app-engine-changelog", 0), TP("w", 0)})
    assert c.active == {TP("app-engine-changelog", 0)}


def test_a_seek_that_fails_still_resumes() -> None:
    c = Consumer()

    async def failing() -> None:
        raise TimeoutError("seek")

    c.perform_seek = failing  # type: ignore[method-assign]
    defer_resume_until_seek(c)
    c.resume_partitions({TP("w", 0)})
    with pytest.raises(TimeoutError):
        asyncio.run(c.perform_seek())
    assert c.active == {TP("w", 0)}  # faust retries or crashes; the partition is never left paused by the guard


def test_gaps_are_logged_and_refused_on_topics_without_gaps(caplog: pytest.LogCaptureFixture) -> None:
    c = Consumer()
    refuse_gaps(c, {"windows"}.__contains__)
    with caplog.at_level(logging.WARNING, logger="pipeline.detect.fetch_guard"):
        asyncio.run(c._add_gap(TP("windows", 3), 362, 486))
        asyncio.run(c._add_gap(TP("cip", 1), 10, 14))  # a compacted topic: real gaps, faust's handling kept
    assert c.gaps == [(TP("cip", 1), 10, 14)]
    text = [r.getMessage() for r in caplog.records]
    assert len(text) == 2 and all(GAP_WARNING in t for t in text)
    assert "refused" in text[0] and "362..486" in text[0] and "refused" not in text[1]


@dataclass
class Buffer:
    """faust's ProducerBuffer as the guard sees it: flush() sends what it can and gives up (here one at a time)."""

    pending: list[str]
    sent: list[str]
    should_stop: bool = False

    @property
    def size(self) -> int:
        return len(self.pending)

    async def flush(self) -> None:
        if self.pending:
            self.sent.append(self.pending.pop(0))


def test_a_commit_waits_until_the_table_writes_are_sent() -> None:
    sent: list[str] = []
    producer = type("P", (), {})()
    producer.buffer = Buffer(["engine 0", "partials 0", "engine 1"], sent)

    async def flush() -> None:
        sent.append("flush")

    producer.flush = flush
    c = Consumer()
    commits: list[dict[str, int]] = []

    async def commit(offsets: dict[str, int]) -> bool:
        commits.append(dict(offsets, after=len(sent)))
        return True

    c._commit = commit  # type: ignore[attr-defined]
    commit_after_state(c, lambda: producer)
    assert asyncio.run(c._commit({"windows-0": 42}))  # type: ignore[attr-defined]
    assert sent == ["engine 0", "partials 0", "engine 1", "flush"] and commits == [{"windows-0": 42, "after": 4}]


@dataclass
class Event:
    message: Any


class Acks:
    """faust's consumer side of `Message.ack`: the offsets it would count as acknowledged (and commit past)."""

    def __init__(self) -> None:
        self.offsets: list[int] = []

    def ack(self, message: Any) -> None:
        self.offsets.append(message.offset)


def _batch(n: int) -> list[Event]:
    return [Event(Message("windows", 0, off, 0.0, 0, None, b"k", b"v", None)) for off in range(n)]


@pytest.mark.parametrize("cut", [RuntimeError("store call is wrong"), asyncio.CancelledError()])
def test_a_batch_cut_short_is_never_acknowledged(cut: BaseException) -> None:
    """take_events acks the batch in a finally, after the agent's body left: a failed body leaves nothing to count
    (real faust Message objects, whose ack is what take_events calls)."""
    events, acks, ledger = _batch(3), Acks(), _ledger()
    with pytest.raises(type(cut)), withhold_acks_on_failure(events, ledger):
        ledger.admit(events, 0.0)
        raise cut
    for ev in events:  # what take_events' finally then does
        if ev.message.ack(acks):
            acks.ack(ev.message)
    assert acks.offsets == []
    # messages behind the batch acknowledged on the way out: faust would commit past the batch; the cap holds at it
    assert ledger.cap({events[0].message.tp: 15}) == {events[0].message.tp: 0}


def test_a_batch_that_completes_is_acknowledged() -> None:
    events, acks, ledger = _batch(3), Acks(), _ledger()
    with withhold_acks_on_failure(events, ledger):
        ledger.admit(events, 0.0)
    for ev in events:
        if ev.message.ack(acks):
            acks.ack(ev.message)
    assert acks.offsets == [0, 1, 2]
    assert ledger.cap({events[0].message.tp: 3}) == {events[0].message.tp: 3}


def _ledger() -> InputLedger:
    """Tracking nothing as contiguous: only the batches' outstanding offsets cap the commit."""
    return InputLedger(lambda topic: False)


def test_no_commit_once_a_table_write_has_failed() -> None:
    """faust only logs a changelog write that failed; a commit after it would cover state that is not in the
    changelog (lost on a restart while its input is not read again). The write is recorded, the worker is told to
    stop once, and the commit refuses."""
    from types import SimpleNamespace

    from pipeline.detect.changelog_writes import ChangelogWrites

    stops: list[BaseException] = []
    writes = ChangelogWrites(stops.append)
    loop = asyncio.new_event_loop()
    try:
        futs = [loop.create_future() for _ in range(3)]
        table = SimpleNamespace(name="engine", send_changelog=lambda p, k, v: futs.pop(0))
        writes.watch(table)
        sent = [table.send_changelog(0, b"0|a|acct", b"{}") for _ in range(3)]
        sent[0].set_result(None)
        sent[1].set_exception(ConnectionError("broker gone"))
        sent[2].set_exception(ValueError("too large"))
        loop.run_until_complete(asyncio.sleep(0))  # the done callbacks run
    finally:
        loop.close()
    assert isinstance(writes.failed, ConnectionError) and writes.refused == 2
    assert stops == [writes.failed]  # told to stop once, with the first failure

    producer = type("P", (), {})()
    producer.buffer = Buffer([], [])

    async def flush() -> None:
        pass

    producer.flush = flush
    c, commits = Consumer(), []

    async def commit(offsets: dict[str, int]) -> bool:
        commits.append(offsets)
        return True

    c._commit = commit  # type: ignore[attr-defined]
    commit_after_state(c, lambda: producer, lambda: writes.failed)
    with pytest.raises(RuntimeError, match="table write failed"):
        asyncio.run(c._commit({"windows-0": 42}))  # type: ignore[attr-defined]
    assert commits == []


@dataclass
class Fetching:
    """faust's fetch side: `getmany` yields what was fetched, `_drain_messages` drops below `_read_offset`."""
    fetched: list[tuple[TP, int]]
    _read_offset: dict[TP, int | None] = field(default_factory=dict)
    perform_seek: Any = None
    _commit: Any = None

    async def getmany(self, timeout: float) -> Any:
        for tp, offset in self.fetched:
            yield tp, Message(tp.topic, tp.partition, offset, 0.0, 0, None, b"k", b"v", None, tp=tp)

    async def drain(self) -> list[int]:
        """faust's `_drain_messages` rule: a message below the partition's read offset is dropped as already read."""
        out = []
        async for tp, m in self.getmany(timeout=1.0):
            r = self._read_offset.get(tp)
            if r is None or m.offset >= r:
                out.append(m.offset)
                self._read_offset[tp] = m.offset
        return out


def test_the_offset_sought_back_is_delivered_whatever_read_offset_stale_messages_left() -> None:
    """A fetch in flight during the seek back delivers stale messages after it (faust's read offset moves to 9);
    faust would then drop the re-read from 0 as already read. The fetch path clears the read offset for it."""
    w1 = TP("windows", 1)
    led = InputLedger(lambda topic: topic == "windows")
    led.start({w1: 0})
    led.admit([Event(Message("windows", 1, 5, 0.0, 0, None, b"k", b"v", None, tp=w1))], 0.0)
    assert led.rewinding == {w1: 0}
    consumer = Fetching([(w1, 8), (w1, 9), (w1, 0), (w1, 1), (w1, 2)], {w1: None})
    bare = asyncio.run(Fetching(list(consumer.fetched), {w1: None}).drain())
    assert bare == [8, 9]  # without the guard the re-read is lost
    track_inputs(consumer, led)
    assert asyncio.run(consumer.drain()) == [8, 9, 0, 1, 2]
    assert led.seeks[w1].refetched and led.overdue(10.0) == {}


def test_faust_state_names_whether_faust_fetches_a_partition() -> None:
    from types import SimpleNamespace

    from pipeline.detect.fetch_guard import faust_state

    w0, w1 = TP("windows", 0), TP("windows", 1)
    consumer = SimpleNamespace(_active_partitions={w1}, _paused_partitions=set(), _buffered_partitions={w0},
                               flow_active=True, _read_offset={w0: 17}, assignment=lambda: {w0, w1})
    app = SimpleNamespace(consumer=consumer, flow_control=SimpleNamespace(is_active=lambda: True))
    assert faust_state(app, w0) == ("active=False paused=False buffered=True flow_active=True flow_control=True "
                                    "read_offset=17 assigned=True; kafka: none")
    bare = SimpleNamespace(consumer=SimpleNamespace(assignment=set), flow_control=SimpleNamespace(is_active=bool))
    assert faust_state(bare, w0).startswith("active=None paused=None buffered=None flow_active=None")


def test_kafka_state_names_what_aiokafka_holds_of_a_partition() -> None:
    """The stall line says whether aiokafka would fetch the partition: its position, a pause or a pending reset
    there, and a buffered result (a partition with one is not fetched again until it is drained)."""
    from types import SimpleNamespace

    from aiokafka.consumer.fetcher import OffsetResetStrategy
    from aiokafka.consumer.subscription_state import Assignment
    from aiokafka.structs import TopicPartition

    from pipeline.detect.fetch_guard import kafka_state

    w0, w1, w9 = TopicPartition("windows", 0), TopicPartition("windows", 1), TopicPartition("windows", 9)

    async def state() -> tuple[str, str, str]:
        assignment = Assignment({w0, w1})
        assignment.state_value(w0).reset_to(42)
        assignment.state_value(w1).pause()
        assignment.state_value(w1).await_reset(OffsetResetStrategy.EARLIEST)
        fetcher = SimpleNamespace(_records={w0: object()}, _in_flight={1})
        kafka = SimpleNamespace(_fetcher=fetcher, _subscription=SimpleNamespace(
            subscription=SimpleNamespace(assignment=assignment)))
        app = SimpleNamespace(consumer=SimpleNamespace(_thread=SimpleNamespace(_consumer=kafka)))
        return kafka_state(app, w0), kafka_state(app, w1), kafka_state(app, w9)

    s0, s1, s9 = asyncio.run(state())
    assert s0 == "position=42 paused=False awaiting_reset=False records=object in_flight=1"
    assert s1 == "position=None paused=True awaiting_reset=True records=NoneType in_flight=1"
    assert s9.startswith("unassigned")


def test_refetch_reactivates_only_a_dropped_partition_nothing_pauses() -> None:
    from types import SimpleNamespace

    from pipeline.detect.fetch_guard import faust_buffered_any, refetch

    w0, w1, w2, w3 = (TP("windows", p) for p in range(4))
    flow = SimpleNamespace(active=True)
    consumer = SimpleNamespace(_active_partitions={w1}, _paused_partitions={w2}, _buffered_partitions={w0},
                               flow_active=True, assignment=lambda: {w0, w1, w2})
    app = SimpleNamespace(consumer=consumer, flow_control=SimpleNamespace(is_active=lambda: flow.active))
    assert not refetch(app, w1)  # fetched already
    assert not refetch(app, w2)  # paused (a recovery): left to faust
    assert not refetch(app, w3)  # not assigned here
    assert not refetch(app, w0)  # buffered: faust's backpressure, lifted when its stream buffer drains
    assert faust_buffered_any(app)  # its fetch loop waits on that stream: the stall watch stands aside
    consumer._buffered_partitions.clear()
    assert not faust_buffered_any(app)
    flow.active = False
    assert not refetch(app, w0)  # flow suspended (a rebalance): left to faust
    flow.active = True
    assert refetch(app, w0) and w0 in consumer._active_partitions


@dataclass
class Dropping:
    """faust's fetch path as far as `redeliver_dropped` sees it: `getmany` takes a fetch's records (aiokafka's position
    is past them then) and yields those of each partition up to `upto`, dropping the rest as a flow stop does."""
    records: dict[TP, list[int]]
    upto: dict[TP, int]
    assigned: set[TP]
    flow_active: bool = False
    should_stop: bool = False
    _active_partitions: set[TP] = field(default_factory=set)
    delivered: list[tuple[str, int, int]] = field(default_factory=list)
    seeks: list[tuple[str, int, int]] = field(default_factory=list)

    async def _wait_next_records(self, timeout: float) -> Any:
        from types import SimpleNamespace
        return {tp: [SimpleNamespace(offset=o) for o in offs] for tp, offs in self.records.items()}, None

    async def getmany(self, timeout: float) -> Any:
        records, _ = await self._wait_next_records(timeout)
        for tp, recs in records.items():
            for r in recs:
                if r.offset <= self.upto.get(tp, -1):
                    yield tp, Message(tp.topic, tp.partition, r.offset, 0.0, 0, None, b"k", b"v", None, tp=tp)

    async def callback(self, message: Message) -> None:
        self.delivered.append((message.topic, message.partition, message.offset))

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp.topic, tp.partition, offset))

    async def perform_seek(self) -> None:
        self.seeks.append(("to the commit", -1, -1))

    def assignment(self) -> set[TP]:
        return self.assigned

    def _is_changelog_tp(self, tp: TP) -> bool:
        return tp.topic.endswith("-changelog")

    async def drain(self) -> None:
        """faust's `_drain_messages`: each message fetched is handed over through the callback."""
        async for _tp, message in self.getmany(timeout=1.0):
            await self.callback(message)


def test_records_faust_fetched_and_did_not_deliver_are_fetched_again(caplog: pytest.LogCaptureFixture) -> None:
    """The restart after a refused changelog write (tests/test_faust_changelog_refused.py): a fetch's CIP records all
    dropped (the flow stopped), its windows cut part-way; nothing later would show either hole."""
    from pipeline.detect.fetch_guard import DROP_WARNING, redeliver_dropped

    cip, win, log_tp, gone, done = (TP("cip", 0), TP("windows", 0), TP("app-engine-changelog", 0), TP("allocations", 1),
                                    TP("windows", 1))
    consumer = Dropping(records={cip: [0, 1, 2], win: [40, 41, 42, 43], log_tp: [7, 8], gone: [5], done: [3, 4]},
                        upto={win: 41, done: 4}, assigned={cip, win, log_tp, done})
    bare = Dropping(**{k: getattr(consumer, k) for k in ("records", "upto", "assigned")})
    asyncio.run(bare.drain())
    assert bare.seeks == []  # without the guard the dropped records are never read again
    counted: list[tuple[str, int]] = []
    redeliver_dropped(consumer, lambda topic, n: counted.append((topic, n)))
    with caplog.at_level(logging.WARNING):
        asyncio.run(consumer.drain())
    assert sorted(counted) == [("cip", 3), ("windows", 2)]  # trainwatch_input_redelivered_messages_total
    assert consumer.delivered == [("windows", 0, 40), ("windows", 0, 41), ("windows", 1, 3), ("windows", 1, 4)]
    # CIP from its first record, windows from the first not delivered; not the changelog (faust's recovery seeks
    # it), not a partition no longer assigned (its next owner reads from the commit), not one delivered whole
    assert sorted(consumer.seeks) == [("cip", 0, 0), ("windows", 0, 42)]
    assert sum(DROP_WARNING in r.getMessage() for r in caplog.records) == 2
    consumer.should_stop = True  # a worker stopping reads from the commit when it starts again: no seek
    consumer.seeks.clear()
    asyncio.run(consumer.drain())
    assert consumer.seeks == []


def test_a_fetch_cut_by_a_rebalance_is_left_to_its_seek_to_the_commit() -> None:
    """A rebalance's seek to the commit placed every partition after the fetch (faust cleared its stream buffers,
    the commit is where reading restarts): a seek back to the fetch's first undelivered record would skip them."""
    from pipeline.detect.fetch_guard import redeliver_dropped

    win = TP("windows", 0)
    consumer = Dropping(records={win: [40, 41, 42]}, upto={win: 40}, assigned={win})
    redeliver_dropped(consumer)
    callback = consumer.callback

    async def rebalanced(message: Message) -> None:
        await consumer.perform_seek()  # the rebalance's seek, while the fetch is being handed over
        await callback(message)

    consumer.callback = rebalanced
    asyncio.run(consumer.drain())
    assert consumer.seeks == [("to the commit", -1, -1)]


def test_partitions_with_no_commit_are_sought_to_their_log_start_after_the_seek_to_the_commit() -> None:
    """aiokafka's seek to the committed offsets leaves a partition with none where it is (past what faust fetched and
    cleared in a rebalance); such an input partition is read from its log start, as at a first assignment."""
    from pipeline.detect.fetch_guard import seek_uncommitted_to_start

    cip, win, log_tp = TP("cip", 0), TP("windows", 0), TP("app-engine-changelog", 0)
    consumer = Dropping(records={}, upto={}, assigned={cip, win, log_tp})
    consumer._committed_offset = {win: 120}  # type: ignore[attr-defined]

    async def earliest_offsets(*tps: TP) -> dict[TP, int]:
        return {tp: 7 for tp in tps}

    consumer.earliest_offsets = earliest_offsets  # type: ignore[attr-defined]
    seek_uncommitted_to_start(consumer)
    asyncio.run(consumer.perform_seek())
    assert consumer.seeks == [("to the commit", -1, -1), ("cip", 0, 7)]  # not the committed one, nor a changelog
