"""pipeline/detect/input_ledger.py on faust's own message objects: messages are taken in order from where reading
starts, one delivered past unread input is held back (never counted by faust's ack) and its partition sought back
(again, until reading reaches it), and a commit never passes the next offset the agents expect. The real consumer
under kill -9 is tests/test_chaos_smoke.py, which asserts every partial on the windows topic reached the store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from faust.types.tuples import TP, Message

from pipeline.detect.input_ledger import REREAD_WARNING, RESEEK_AFTER_S, RESEEK_FETCHED_AFTER_S, InputLedger

W0, W1, CIP = TP("windows", 0), TP("windows", 1), TP("cip", 0)


@dataclass
class Event:
    message: Any


def events(tp: TP, *offsets: int) -> list[Event]:
    return [Event(Message(tp.topic, tp.partition, o, 0.0, 0, None, b"k", b"v", None, tp=tp)) for o in offsets]


def offsets(evs: list[Event]) -> list[tuple[int, int]]:
    return [(e.message.partition, e.message.offset) for e in evs]


def ledger() -> InputLedger:
    return InputLedger(lambda topic: topic == "windows")


def acked_by_faust(evs: list[Event]) -> list[int]:
    """What faust's ack (Message.ack) would still count for these events."""
    return [e.message.offset for e in evs if e.message.ack(None)]


def test_messages_in_order_are_taken_and_the_commit_follows_them() -> None:
    led = ledger()
    led.start({W0: 10, W1: 0})
    take, rewind = led.admit(events(W0, 10, 11, 12) + events(W1, 0, 1), 0.0)
    assert offsets(take) == [(0, 10), (0, 11), (0, 12), (1, 0), (1, 1)] and rewind == {}
    assert led.cap({W0: 13, W1: 2}) == {W0: 10, W1: 0}  # taken, their batch not done yet
    led.done(take)
    assert led.cap({W0: 13, W1: 2}) == {W0: 13, W1: 2}
    assert led.cap({W0: 20, W1: 9}) == {W0: 13, W1: 2}  # never past what was taken


def test_a_partition_delivered_past_unread_input_is_held_and_read_again() -> None:
    led = ledger()
    led.start({W1: 0})  # nothing committed: reading starts at the log start
    first = events(W1, 12, 13) + events(W0, 5)  # what faust delivered first after a restart: 0..11 never came
    led.start({W0: 5})
    take, rewind = led.admit(first, 0.0)
    assert offsets(take) == [(0, 5)] and rewind == {W1: 0}
    led.done(take)
    assert acked_by_faust(first) == [5]  # the held ones are never counted: no commit can pass them
    assert led.cap({W1: 14, W0: 6}) == {W1: 0, W0: 6}
    # more of the stale delivery: held, no second seek for the same hole
    stale = events(W1, 14)
    assert led.admit(stale, 0.0) == ([], {}) and acked_by_faust(stale) == []
    # the seek back delivers from 0, in order: taken, and the commit may follow again
    again = events(W1, *range(0, 15))
    take, rewind = led.admit(again, 0.0)
    assert offsets(take) == [(1, o) for o in range(15)] and rewind == {}
    led.done(take)
    assert led.cap({W1: 15}) == {W1: 15}


def test_a_second_hole_after_the_first_is_sought_back_too() -> None:
    led = ledger()
    led.start({W0: 0})
    assert led.admit(events(W0, 3), 0.0)[1] == {W0: 0}
    assert offsets(led.admit(events(W0, 0, 1, 2, 3), 0.0)[0]) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert led.admit(events(W0, 7), 0.0)[1] == {W0: 4}


def test_messages_read_again_below_the_next_offset_are_taken() -> None:
    led = ledger()
    led.start({W0: 0})
    led.admit(events(W0, 0, 1, 2), 0.0)
    take, rewind = led.admit(events(W0, 1, 2, 3), 0.0)  # a seek to an older commit: read again, harmless
    assert offsets(take) == [(0, 1), (0, 2), (0, 3)] and rewind == {} and led.next[W0] == 4


def test_topics_with_real_gaps_are_not_tracked() -> None:
    led = ledger()
    led.start({CIP: 0, W0: 0})
    assert CIP not in led.next
    take, rewind = led.admit(events(CIP, 7, 40), 0.0)  # compaction: gaps are real there
    assert offsets(take) == [(0, 7), (0, 40)] and rewind == {}
    led.done(take)
    assert led.cap({CIP: 41}) == {CIP: 41}


def test_a_new_start_replaces_where_reading_begins() -> None:
    led = ledger()
    led.start({W0: 0})
    assert led.admit(events(W0, 5), 0.0)[1] == {W0: 0}
    led.start({W0: 5})  # a rebalance's seek: the committed offset moved meanwhile
    assert offsets(led.admit(events(W0, 5, 6), 0.0)[0]) == [(0, 5), (0, 6)] and led.rewinding == {}


def test_a_forgotten_partition_is_taken_as_delivered() -> None:
    led = ledger()
    led.start({W0: 0})
    led.forget([W0])  # its log start could not be read: faust's own bookkeeping, as before the ledger
    take, rewind = led.admit(events(W0, 9), 0.0)
    led.done(take)
    assert offsets(take) == [(0, 9)] and rewind == {} and led.cap({W0: 10}) == {W0: 10}


def test_a_seek_back_reading_has_not_reached_is_asked_again_until_it_is() -> None:
    """faust's fetcher may deliver what it fetched before the seek, moving its read offset past the offsets sought
    back, which it then drops: a one-shot seek back stalled the partition (no input taken for minutes)."""
    led = ledger()
    led.start({W0: 0})
    assert led.admit(events(W0, 15), 0.0)[1] == {W0: 0}
    assert led.admit(events(W0, 16), 1.0)[1] == {}  # the fetch from before the seek: not asked twice at once
    assert led.overdue(1.0) == {}
    assert led.overdue(RESEEK_AFTER_S) == {W0: 0}  # nothing more came (no newer input): the timer asks again
    assert led.overdue(RESEEK_AFTER_S + 1.0) == {}
    assert led.admit(events(W0, 17), 2 * RESEEK_AFTER_S + 0.5)[1] == {W0: 0}  # still past it: asked again
    take, rewind = led.admit(events(W0, *range(18)), 2 * RESEEK_AFTER_S + 1.0)
    assert offsets(take) == [(0, o) for o in range(18)] and rewind == {}
    assert led.overdue(100.0) == {} and led.rewinding == {}


def test_the_commit_stays_below_what_was_taken_and_not_done_on_every_topic() -> None:
    """faust commits the first run of acknowledged offsets: offsets acknowledged behind a batch that failed (1-14
    of the detections topic, in the stop-mid-batch test) would carry the commit past it. Also on the topics whose
    gaps are real (CIP), which the ledger otherwise leaves to faust."""
    led = ledger()
    led.start({W0: 0, CIP: 0})
    first = events(W0, 0, 1, 2) + events(CIP, 7, 9)
    take, _ = led.admit(first, 0.0)
    led.done(take[:1])  # offset 0 of windows completed; the rest of the batch failed
    assert led.cap({W0: 15, CIP: 40}) == {W0: 1, CIP: 7}
    again = events(W0, 1, 2) + events(CIP, 7, 9)  # read again after the restart (or the next try): done
    led.done(led.admit(again, 1.0)[0])
    assert led.cap({W0: 3, CIP: 10}) == {W0: 3, CIP: 10} and led.outstanding == {W0: set(), CIP: set()}


def test_a_new_start_drops_what_lies_below_it_from_the_outstanding() -> None:
    led = ledger()
    led.start({CIP: 0})
    led.admit(events(CIP, 3, 4), 0.0)
    led.start({CIP: 10})  # another member committed past them meanwhile: never a commit backwards
    assert led.cap({CIP: 12}) == {CIP: 12}


def test_the_read_again_is_taken_behind_stale_messages_of_its_partition_in_the_same_batch() -> None:
    """After a seek back, the agent's queue still holds the partition's messages delivered before it, and the re-read
    follows them. Holding every later message of the partition in a batch once one was held swallowed the re-read
    at each seek (the quick chaos run, Dec 6: windows[1] took no input for 16-40 s after restarts)."""
    led = ledger()
    led.start({W1: 0, W0: 5})
    assert led.admit(events(W1, 12), 0.0)[1] == {W1: 0}
    batch = events(W1, 13, 14) + events(W0, 5) + events(W1, 0, 1, 2)
    take, rewind = led.admit(batch, 0.5)
    assert offsets(take) == [(0, 5), (1, 0), (1, 1), (1, 2)] and rewind == {}
    assert led.next[W1] == 3 and led.rewinding == {}
    led.done(take)
    assert acked_by_faust(batch) == [5, 0, 1, 2]  # the stale ones still count nothing
    assert led.cap({W1: 15, W0: 6}) == {W1: 3, W0: 6}


def test_a_seek_back_fetched_again_is_not_asked_again_while_its_queue_drains() -> None:
    """The consumer reports the fetch of the offset sought back (fetch_guard.py): from then on the re-read is on its
    way, and asking again would queue another copy of it behind everything queued meanwhile."""
    led = ledger()
    led.start({W0: 0})
    assert led.admit(events(W0, 15), 0.0)[1] == {W0: 0}
    assert not led.fetched(W0, 16) and not led.fetched(W1, 0)  # not the offset sought back
    assert led.fetched(W0, 0)
    assert led.overdue(10 * RESEEK_AFTER_S) == {}
    assert offsets(led.admit(events(W0, 16, 0, 1), 11 * RESEEK_AFTER_S)[0]) == [(0, 0), (0, 1)]
    assert led.rewinding == {} and led.seeks == {}
    # a new hole is a new seek back, asked again until its own offset is fetched
    assert led.admit(events(W0, 9), 12 * RESEEK_AFTER_S)[1] == {W0: 2}
    assert led.overdue(13 * RESEEK_AFTER_S) == {W0: 2}
    assert not led.fetched(W0, 0) and led.fetched(W0, 2) and led.overdue(14 * RESEEK_AFTER_S) == {}
    # fetched again but never reaching the agents (lost on its way): asked again, much later
    t = 13 * RESEEK_AFTER_S
    assert led.overdue(t + RESEEK_FETCHED_AFTER_S) == {W0: 2} and not led.seeks[W0].refetched


def test_the_end_of_a_seek_back_is_logged_with_how_long_the_partition_waited(caplog: Any) -> None:
    """benchmarks/chaos.py reports the longest (`input_reread_s`): the time a partition took no input."""
    led = ledger()
    led.start({W0: 0})
    with caplog.at_level("WARNING", logger="pipeline.detect.input_ledger"):
        led.admit(events(W0, 4), 10.0)
        led.admit(events(W0, 5), 11.0)  # still stale: the seek back's start stays at 10.0
        assert led.overdue(12.5) == {W0: 0}  # asked again: still measured from the first ask
        led.admit(events(W0, 0, 1), 17.3)
    ends = [r.getMessage() for r in caplog.records if REREAD_WARNING in r.getMessage()]
    assert ends == [f"{REREAD_WARNING} 0 on windows[0], 7.3 s after the seek back"] and led.seeks == {}


def test_a_partition_behind_its_log_end_with_nothing_fetched_is_reported() -> None:
    led = ledger()
    led.start({W0: 10, W1: 0, CIP: 0}, now=0.0)  # CIP is not tracked (a topic that may have gaps)
    led.fetched(W0, 10, now=5.0)
    led.admit(events(W0, 10, 11), 5.0)
    ends = {W0: 40, W1: 7, CIP: 99}
    assert led.stalled(ends, 20.0) == []  # nothing has waited 30 s yet
    assert led.stalled(ends, 31.0) == [(W1, 0, 7, 31.0)]  # W1 never fetched since reading started there
    assert led.stalled(ends, 40.0, after_s=30.0) == [(W0, 12, 40, 35.0), (W1, 0, 7, 40.0)]
    assert led.stalled({W0: 12, W1: 0}, 100.0) == []  # at its log end: caught up, not stalled
    led.fetched(W1, 0, now=95.0)
    assert led.stalled(ends, 100.0) == [(W0, 12, 40, 95.0)]
    led.forget([W0])
    assert led.stalled(ends, 200.0) == [(W1, 0, 7, 105.0)]


def test_a_stalled_partition_is_sought_back_to_its_next_offset_and_read_again(caplog) -> None:
    led = ledger()
    led.start({W0: 0}, now=0.0)
    assert led.stalled({W0: 6}, 31.0) == [(W0, 0, 6, 31.0)]  # e.g. faust's position moved past 0..5 unread
    assert led.seek_stalled(W0, 31.0) == {W0: 0} and led.rewinding == {W0: 0}
    assert led.seek_stalled(W0, 41.0) == {}  # under way: the ledger asks again itself
    assert led.overdue(32.0) == {} and led.overdue(33.5) == {W0: 0}  # not fetched within 2 s: asked again
    assert led.fetched(W0, 0, now=34.0)  # the offset sought back came: faust's read offset is cleared for it
    with caplog.at_level("WARNING"):
        take, rewind = led.admit(events(W0, 0, 1, 2), 34.5)
    assert offsets(take) == [(0, 0), (0, 1), (0, 2)] and rewind == {} and led.seeks == {}
    assert any(f"{REREAD_WARNING} 0 on windows[0], 3.5 s after the seek back" in r.message for r in caplog.records)
    assert led.seek_stalled(TP("windows", 7), 50.0) == {}  # not tracked: nothing to seek to
