"""Guards on faust's consumer so that a restart never skips input it has not read, nor state it has not written.

Found in the quick chaos run (Dec 5; 2 of 4 runs lost window partials or moved a case, on either write order):
when a worker starts (or a rebalance ends), faust's table recovery *resumes* the input partitions and only then
*seeks* them to their committed offsets (`faust.tables.recovery`, `_on_recovery_completed`: `resume_partitions`
then `await perform_seek()`). The flow is already active at a first start, so while the seek awaits the broker the
fetcher reads on from the position it has and delivers messages; the seek then sets faust's read offset back to the
committed one, and the next message delivered (fetched before the seek, far ahead) looks to faust's gap detection
(`Consumer._drain_messages` / `_add_gap`) like offsets missing from the log. faust counts a gap as acknowledged, so
the next commit moves past messages that were never given to an agent. Logged with offsets, one restart: gaps of
125, 125 and 126 offsets on three windows partitions; a kill -9 before they were read again lost them for good
(window partials missing from the store, engine state without them, a case dated late).

- `defer_resume_until_seek`: stream partitions resumed while a seek to the committed offsets is due start fetching
  only once it is done (faust 0.11's recovery follows each resume of stream partitions with `perform_seek`; it
  resumes changelog partitions to read them without one, so those are resumed at once).
- `refuse_gaps`: on topics that cannot have gaps (written by this project's idempotent producers: not compacted,
  not transactional) a gap is never counted as acknowledged: if one is seen anyway, the commit waits at it (the
  messages are read again after a restart) rather than skipping them. Every gap faust sees is logged.
- `withhold_acks_on_failure`: faust's `take_events` acknowledges a batch's events in a `finally`, also when the
  agent leaves its loop by an exception or a cancellation (a graceful stop, `app.crash`); the commit on the way out
  then moves past a batch half done (tests/test_detect_stop_mid_batch.py lost 437 of 2803 partials on one SIGTERM
  while a batch waited for the store). A batch that fails is marked so that faust's ack of it counts nothing: the
  commit stops below it and a restart reads it again.
- `track_inputs`: the agents' own record of which offsets they took (pipeline/detect/input_ledger.py) learns where
  reading starts at each seek and caps each commit; the fetch path tells it when an offset it sought back to is
  fetched again, and faust's read offset for that partition is cleared then: messages of a fetch in flight during
  the seek move it past the offset sought back, and faust would drop the re-read as already read.
- `redeliver_dropped`: faust takes a fetch's records from aiokafka (whose position moves past them) and then drops
  those it does not hand to an agent: all of them when the flow is stopped, the rest when the flow stops or the
  consumer generation changes part-way, a partition's when it is not active, a message whose delivery a flow stop
  cancels (`Consumer.getmany`, `_drain_messages`). Nothing later shows the hole on a partition that gets no newer
  message, and a partition with no committed offset is not sought at the next seek either (aiokafka
  `seek_to_committed` skips it): a real worker restarted after a refused changelog write never read its CIP and
  allocation partitions again, 2 times in 4 (tests/test_faust_changelog_refused.py). The first record of a fetch
  not delivered is where that partition is sought back to, unless a rebalance's seek to the commit came between.
- `seek_uncommitted_to_start`: that seek to the commit, after a rebalance, is how faust reads again what it cleared
  from its stream buffers; a partition with no committed offset it leaves where it is. Such a partition is sought
  to its log start, as at a first assignment.
- `commit_after_state`: an offset commit waits until faust's producer buffer is empty. Table writes (the
  changelogs: engine state, partials, owners) go through that buffer (`send_soon`), and faust's own flush before a
  commit gives up after 0.1 s without a send (`ProducerBuffer.flush_atmost`), which a broker outage or a full
  producer makes likely ("producer buffer full" in the chaos logs): the commit could then land with the batch's
  state still in memory, and a kill -9 lose it while its input is not read again. Nor is an offset committed
  once a table write has failed (faust only logs one; pipeline/detect/changelog_writes.py): the state behind it is
  not all in the changelogs, and the worker stops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipeline.detect.changelog_writes import ChangelogWrites
from pipeline.detect.input_ledger import InputLedger
from pipeline.detect.startup import phase

log = logging.getLogger(__name__)
startup_log = logging.getLogger("trainwatch.startup")  # INFO shown at the CLI's default level (startup.py)
SLOW_COMMIT_S = 2.0  # an offset commit longer than this is logged with where its time went
STARTUP_COMMITS = 12  # the first commits of a process are logged with what the ledger held back (restart tracing)

#: the warning each gap logs (benchmarks/chaos.py counts it in the worker's log)
GAP_WARNING = "faust offset gap"
#: the warning each fetch faust left partly undelivered logs (`redeliver_dropped`)
DROP_WARNING = "fetched, not delivered"


def defer_resume_until_seek(consumer: Any) -> None:
    """Partitions resumed before a `perform_seek` are resumed after it, so nothing is fetched from a position the
    seek is about to move (see the module doc). A seek with nothing deferred is unchanged."""
    resume: Callable[[Iterable[Any]], None] = consumer.resume_partitions
    seek: Callable[[], Awaitable[Any]] = consumer.perform_seek
    deferred: set[Any] = set()

    def resume_partitions(tps: Iterable[Any]) -> None:
        tps = set(tps)
        # changelog partitions are resumed by the recovery itself, to read them (no seek follows): at once
        logs = {tp for tp in tps if consumer._is_changelog_tp(tp)}
        if logs:
            resume(logs)
        deferred.update(tps - logs)

    async def perform_seek() -> Any:
        try:
            return await seek()
        finally:
            if deferred:
                tps = set(deferred)
                deferred.clear()
                resume(tps)

    consumer.resume_partitions, consumer.perform_seek = resume_partitions, perform_seek


def refuse_gaps(consumer: Any, contiguous: Callable[[str], bool]) -> None:
    """Log every offset gap faust sees; on topics where `contiguous(topic)` holds, do not count it acknowledged."""
    add_gap: Callable[[Any, int, int], Awaitable[None]] = consumer._add_gap

    async def _add_gap(tp: Any, offset_from: int, offset_to: int) -> None:
        refused = contiguous(tp.topic)
        log.warning("%s on %s[%d]: offsets %d..%d not delivered%s", GAP_WARNING, tp.topic, tp.partition,
                    offset_from, offset_to, " (refused: this topic has no gaps; the commit waits)" if refused else "")
        if not refused:
            await add_gap(tp, offset_from, offset_to)

    consumer._add_gap = _add_gap


@contextmanager
def withhold_acks_on_failure(events: Sequence[Any], ledger: InputLedger) -> Iterator[None]:
    """Around one `take_events` batch: if it raises (or is cancelled), its events' later ack by faust is a no-op and
    the ledger keeps them outstanding (the commit stays below them); if it completes, the ledger lets them go.

    `Message.ack` does nothing for a message already marked acked, so marking them here, before the generator's
    `finally` runs, keeps their offsets out of the consumer's acked list. That alone did not hold the commit: faust
    commits the first run of acknowledged offsets, and messages behind the batch may still be acknowledged on the way
    out (input_ledger.py); the ledger's cap does."""
    try:
        yield
    except BaseException:
        for ev in events:
            ev.message.acked = True
        raise
    ledger.done(events)


async def hand_over(p: Any) -> int:
    """An agent's table writes handed from faust's producer buffer to the producer before it goes on; the number
    handed over. The buffer sends one message per turn of the event loop, so behind an agent busy with a restart's
    backlog the writes pile up (1,449 in a chaos run) and the next commit, which waits for them
    (`commit_after_state`), took 13 s. Only a speed-up: it gives up as soon as 0.1 s passes without a send (a broker
    down, a producer stopping at shutdown), so an agent is never held here; the commit still waits for all of it."""
    buf = p.buffer
    before = buf.size
    while buf.size and not buf.should_stop and buf.state == "running":
        if not await buf.flush_atmost(None):  # it returns after 0.1 s without a send
            break
    return max(0, before - buf.size)


def commit_after_state(consumer: Any, producer: Callable[[], Any],
                       failed: Callable[[], BaseException | None] = lambda: None) -> None:
    """Each offset commit first empties the producer buffer (table writes) and flushes the producer; none is made
    once a table write has failed (`failed`: a write the flush completed with an error is not in the changelog)."""
    commit: Callable[[Any], Awaitable[bool]] = consumer._commit

    async def _commit(offsets: Any) -> bool:
        t0, p = time.monotonic(), producer()
        waiting = p.buffer.size
        # flush() returns after 0.1 s without a send: again until empty (while the buffer still sends: a producer
        # stopping at shutdown commits as faust would)
        while p.buffer.size and not p.buffer.should_stop:
            await p.buffer.flush()
        t1 = time.monotonic()
        await p.flush()
        t2 = time.monotonic()
        if (exc := failed()) is not None:
            raise RuntimeError(f"offset commit refused: a table write failed ({exc!r}); the state behind these "
                               "offsets is not all in the changelogs")
        ok = await commit(offsets)
        if (took := time.monotonic() - t0) > SLOW_COMMIT_S:
            log.warning("offset commit took %.1f s: %d table writes sent in %.1f s, producer flush %.1f s, "
                        "commit %.1f s", took, waiting, t1 - t0, t2 - t1, time.monotonic() - t2)
        phase("first-commit")
        return ok

    consumer._commit = _commit


def track_inputs(consumer: Any, ledger: InputLedger) -> None:
    """After each seek to the committed offsets, the ledger learns where reading starts (the committed offset; the
    log start where none is committed or it is 0, which faust treats as none); each commit is capped by it."""
    seek: Callable[[], Awaitable[Any]] = consumer.perform_seek
    commit: Callable[[Any], Awaitable[bool]] = consumer._commit

    async def perform_seek() -> Any:
        out = await seek()
        mine = [tp for tp in consumer.assignment() if ledger.contiguous(tp.topic)]
        starts = {tp: o for tp in mine if (o := consumer._committed_offset.get(tp))}
        rest = [tp for tp in mine if tp not in starts]
        if rest:
            try:
                starts.update({tp: int(o) for tp, o in (await consumer.earliest_offsets(*rest)).items()})
            except Exception as exc:  # the broker did not answer: those stay as faust keeps them (untracked)
                log.warning("input ledger: no log start for %d partition(s), not tracked until the next seek: %s",
                            len(rest), exc)
                ledger.forget(rest)
        ledger.start(starts, time.monotonic())
        return out

    logged = 0

    async def _commit(offsets: Any) -> bool:
        nonlocal logged
        capped = ledger.cap(offsets)
        if logged < STARTUP_COMMITS:  # where a restart's first commits went (faust's offsets, and the ledger's cap)
            logged += 1
            held = {f"{tp.topic}[{tp.partition}]": f"{o}->{capped[tp]}" for tp, o in offsets.items() if capped[tp] < o}
            startup_log.info("commit %d: %d partition(s), %d held back by the input ledger %s", logged, len(offsets),
                             len(held), held)
        return await commit(capped)

    getmany: Callable[..., AsyncIterator[tuple[Any, Any]]] = consumer.getmany

    async def fetched(*args: Any, **kwargs: Any) -> AsyncIterator[tuple[Any, Any]]:
        async for tp, message in getmany(*args, **kwargs):
            if ledger.fetched(tp, message.offset, time.monotonic()):
                consumer._read_offset[tp] = None  # deliver it: faust drops what lies below its read offset
            yield tp, message

    consumer.perform_seek, consumer._commit, consumer.getmany = perform_seek, _commit, fetched


def redeliver_dropped(consumer: Any, counted: Callable[[str, int], None] = lambda topic, n: None) -> None:
    """Each fetch's records that faust did not deliver (see the module doc) are fetched again: once faust's `getmany`
    ends, a partition still assigned is sought back to its first record not delivered. Delivered means faust's
    callback (the hand-over to the agents' streams) completed for it. Changelog partitions are left to faust's
    recovery, which seeks them itself. `counted(topic, n)` is told of each partition's n messages sought back."""
    wait_next: Callable[[float], Awaitable[tuple[Any, Any]]] = consumer._wait_next_records
    getmany: Callable[..., AsyncIterator[tuple[Any, Any]]] = consumer.getmany
    callback: Callable[[Any], Awaitable[Any]] = consumer.callback
    seek: Callable[[], Awaitable[Any]] = consumer.perform_seek
    fetched: dict[Any, list[int]] = {}
    delivered: set[tuple[Any, int]] = set()
    seeks = [0, 0]  # seeks to the commit begun: in all, and when the fetch was taken

    async def perform_seek() -> Any:
        seeks[0] += 1
        return await seek()

    async def _wait_next_records(timeout: float) -> tuple[Any, Any]:
        records, active = await wait_next(timeout)
        fetched.clear()
        delivered.clear()
        seeks[1] = seeks[0]
        for tp, recs in (records or {}).items():
            if recs and not consumer._is_changelog_tp(tp):
                fetched[tp] = [r.offset for r in recs]
        return records, active

    async def on_message(message: Any) -> Any:
        out = await callback(message)
        delivered.add((message.tp, message.offset))
        return out

    async def getmany_(*args: Any, **kwargs: Any) -> AsyncIterator[tuple[Any, Any]]:
        async for item in getmany(*args, **kwargs):
            yield item
        left = {tp: [o for o in offsets if (tp, o) not in delivered] for tp, offsets in fetched.items()}
        fetched.clear()
        if consumer.should_stop:
            return
        if seeks[0] != seeks[1]:  # a rebalance's seek to the commit came between: it placed every partition already
            log.info("%d partition(s) of a fetch not all delivered, left to the seek to the commit since",
                     sum(1 for offsets in left.values() if offsets))
            return
        assigned = consumer.assignment()
        for tp, offsets in left.items():
            if not offsets or tp not in assigned:  # not assigned: its next owner reads from the commit
                continue
            why = ("flow stopped" if not consumer.flow_active else
                   "not active" if tp not in (consumer._active_partitions or ()) else "not delivered")
            log.warning("%s: %s[%d] %d message(s) from %d (%s): sought back", DROP_WARNING, tp.topic, tp.partition,
                        len(offsets), offsets[0], why)
            try:
                await consumer.seek(tp, offsets[0])
            except Exception as exc:  # e.g. revoked meanwhile: its next owner reads from the commit
                log.warning("seek back of %s[%d] to %d failed: %s", tp.topic, tp.partition, offsets[0], exc)
                continue
            counted(tp.topic, len(offsets))

    consumer._wait_next_records, consumer.callback, consumer.getmany = _wait_next_records, on_message, getmany_
    consumer.perform_seek = perform_seek


def seek_uncommitted_to_start(consumer: Any) -> None:
    """After faust's seek to the committed offsets, each input partition with none committed is sought to its log
    start. aiokafka's `seek_to_committed` leaves such a partition where it is, which after a rebalance is past
    whatever faust fetched and then cleared from its stream buffers (faust relies on that seek to read them again):
    a partition never committed is read from its start at every assignment, as at the first."""
    seek: Callable[[], Awaitable[Any]] = consumer.perform_seek

    async def perform_seek() -> Any:
        out = await seek()
        rest = [tp for tp in consumer.assignment()
                if not consumer._is_changelog_tp(tp) and not consumer._committed_offset.get(tp)]
        if rest:
            try:
                starts = await consumer.earliest_offsets(*rest)
            except Exception as exc:  # the broker did not answer: left where they are (redeliver_dropped still holds)
                log.warning("no log start for %d uncommitted partition(s): not sought: %s", len(rest), exc)
                return out
            for tp, offset in starts.items():
                await consumer.seek(tp, int(offset))
        return out

    consumer.perform_seek = perform_seek


def faust_state(app: Any, tp: Any) -> str:
    """What faust's consumer holds of a partition (private attributes, read for a log line: whether it fetches it)."""
    c = app.consumer

    def has(name: str) -> Any:
        got = getattr(c, name, None)
        return None if got is None else tp in got

    return (f"active={has('_active_partitions')} paused={has('_paused_partitions')} "
            f"buffered={has('_buffered_partitions')} flow_active={getattr(c, 'flow_active', None)} "
            f"flow_control={app.flow_control.is_active()} read_offset={getattr(c, '_read_offset', {}).get(tp)} "
            f"assigned={tp in c.assignment()}; kafka: {kafka_state(app, tp)}")


def kafka_state(app: Any, tp: Any) -> str:
    """What aiokafka, under faust, holds of a partition (private attributes, for the same log line): its fetch
    position, whether it is paused or awaiting an offset reset there, and what its fetcher keeps buffered for it (a
    partition with a buffered result is not fetched again until that is drained)."""
    kafka = getattr(getattr(app.consumer, "_thread", None), "_consumer", None)
    fetcher, subs = getattr(kafka, "_fetcher", None), getattr(kafka, "_subscription", None)
    assignment = getattr(getattr(subs, "subscription", None), "assignment", None)
    if fetcher is None or assignment is None:
        return "none"
    try:
        state = assignment.state_value(tp)
    except Exception:  # a log line: whatever aiokafka's internals hold, say the partition is not there
        state = None
    if state is None:
        return f"unassigned records={type(fetcher._records.get(tp)).__name__}"
    position = state.position if state.has_valid_position else None
    return (f"position={position} paused={state.paused} awaiting_reset={state.awaiting_reset} "
            f"records={type(fetcher._records.get(tp)).__name__} in_flight={len(fetcher._in_flight)}")


def faust_buffered(app: Any, tp: Any) -> bool:
    """Whether faust holds the partition back because its stream buffer is full (the agent is busy)."""
    return tp in getattr(app.consumer, "_buffered_partitions", ())


def faust_buffered_any(app: Any) -> bool:
    """Whether faust holds any partition back for a full stream buffer: its fetch loop then waits on that stream, so
    no partition is fetched until the agent drains it."""
    return bool(getattr(app.consumer, "_buffered_partitions", None))


def refetch(app: Any, tp: Any) -> bool:
    """Make faust fetch an assigned partition again that it has dropped from its active set with no reason it keeps:
    not paused (a recovery), not buffered (a full stream buffer: backpressure while the agent is busy, e.g. retrying
    the store, lifted by its pressure-drop callback), the flow active. True when it was dropped so."""
    c = app.consumer
    active, paused = getattr(c, "_active_partitions", None), getattr(c, "_paused_partitions", None)
    if active is None or paused is None or tp in active or tp in paused or tp not in c.assignment() \
            or faust_buffered(app, tp) or not getattr(c, "flow_active", False) \
            or not app.flow_control.is_active():
        return False
    active.add(tp)
    return True


def guard_consumer(app: Any, ledger: InputLedger, writes: ChangelogWrites,
                   redelivered: Callable[[str, int], None] = lambda topic, n: None) -> None:
    """The guards on the app's consumer, installed as faust creates it (before any assignment). The ledger's seek
    hook goes on first, so that it knows where reading starts before the deferred partitions resume."""
    new_consumer = app._new_consumer

    def _new_consumer() -> Any:
        c = new_consumer()
        seek_uncommitted_to_start(c)
        track_inputs(c, ledger)
        redeliver_dropped(c, redelivered)
        defer_resume_until_seek(c)
        refuse_gaps(c, ledger.contiguous)
        commit_after_state(c, lambda: app.producer, lambda: writes.failed)
        return c

    app._new_consumer = _new_consumer
