"""Which offsets of each input partition the agents have taken, on topics without gaps: the commit never passes one they
have not taken, and a message delivered past one they have not read is not processed but read again in order.

faust tracks this itself (acked offsets, gap detection), and the quick chaos run still lost window partials after the
fixes of fetch_guard.py: offsets 4-11 and 12-50 of windows[1] (the partition whose accounts start last), each after a
kill soon after its first messages, no gap logged. A path in faust's code that fits: its guards test truthiness, so a
partition without a committed offset, or committed at 0, has no read offset, whatever is delivered first is taken as
the start, and the first commit covers every offset below it. Rather than trust that bookkeeping, the ledger knows
where reading must start (the committed offset, or the log start where there is none: `start`), takes each batch's
messages in order (`admit`), holds back a partition's messages past the next offset it expects and asks for a seek
back to that offset, and caps each commit at the next offset it expects (`cap`). Messages of the partition still
queued from before the seek keep coming, held, while the re-read follows them; the offset sought back is taken
whenever it comes, also in a batch behind held ones (holding it with them stalled the partition: its re-read swallowed
behind its own stale messages at each seek, while each new seek queued another copy behind more of them; the quick
chaos run, Dec 6: windows[1] took no input for 4-40 s after restarts, some restarts wholly). faust drops a message
below its read offset, and stale messages of an in-flight fetch move that past the offsets sought back: the consumer's
fetch path reports each fetch of the offset sought back (`fetched`; fetch_guard.py then clears faust's read offset so
the re-read is delivered). A seek back whose offset has not been fetched again within `RESEEK_AFTER_S` is asked again
(`overdue`: the seek failed, or was undone), and one fetched again but not taken within `RESEEK_FETCHED_AFTER_S` too
(lost on its way to the agents).

Only topics this project's idempotent producers write are tracked (the `contiguous` predicate, as fetch_guard's
`refuse_gaps`): the CIP and allocations topics are the provider's, where compaction or transactions make real gaps.

On every topic, a commit also stays below the lowest offset taken but not done (`outstanding`, cleared by `done`
when the agent's batch has completed). faust commits the first run of consecutive acknowledged offsets, whatever
lies below it (`Consumer._new_offset`), and a stop can acknowledge messages behind a batch that failed (they wait in
the stream's buffer; once take_events closes they pass through with acks enabled again): with the failed batch's
own acks withheld, the commit still moved past it. Seen in tests/test_detect_stop_mid_batch.py, 1 run in 3: the
detections topic committed at 15 of 15 while offsets 1-14 had never been stored, and the cases they opened were
lost for good.
Pure bookkeeping on faust's message objects (tests/test_input_ledger.py); faust_app and fetch_guard wire it in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: the warning each seek back logs (benchmarks/chaos.py counts it in the worker's log)
REWIND_WARNING = "input ledger: delivered past unread input"
#: the warning each seek back's end logs, with the seconds it took (benchmarks/chaos.py reports the longest)
REREAD_WARNING = "input ledger: read again from"
#: how long a seek back may take to show before it is asked again (seconds)
RESEEK_AFTER_S = 2.0
#: the warning a tracked partition behind its log end logs when nothing of it has been fetched for STALL_AFTER_S
#: (benchmarks/chaos.py counts it); it is then sought back to its next offset (`seek_stalled`). Seen in quick chaos
#: runs (Dec 7): three windows partitions not fetched for the 90 s after a restart, 772 messages behind; and
#: detections[1], 6 behind, not fetched for 224 s while faust counted it active (its position past unread input)
STALL_WARNING = "input ledger: partition behind its log end, nothing fetched"
#: seconds without a fetch of a partition behind its log end before STALL_WARNING
STALL_AFTER_S = 30.0
#: the same once its offset was fetched again: the re-read waits behind what was queued before the seek (19 s once,
#: a broker outage blocking the agent meanwhile); asked again only in case it was lost on its way to the agents
RESEEK_FETCHED_AFTER_S = 30.0


@dataclass
class SeekBack:
    """One partition's seek back, from when it is first asked until reading reaches `offset` again."""

    offset: int
    #: when (monotonic seconds) it was first asked: the partition takes no input until it is read again
    since: float
    #: when it was last asked
    asked_at: float
    #: its offset has been fetched again (on its way to the agents behind what was queued: not asked again soon)
    refetched: bool = False


@dataclass
class InputLedger:
    contiguous: Callable[[str], bool]
    #: partition (faust TP) -> the next offset the agents must take
    next: dict[Any, int] = field(default_factory=dict)
    #: partition -> its seek back, until reading reaches the offset sought again
    seeks: dict[Any, SeekBack] = field(default_factory=dict)
    #: partition (any topic) -> offsets handed to an agent whose batch has not completed
    outstanding: dict[Any, set[int]] = field(default_factory=dict)
    #: tracked partition -> when (monotonic seconds) a message of it was last fetched, or reading last started
    fetched_at: dict[Any, float] = field(default_factory=dict)

    def start(self, starts: Mapping[Any, int], now: float | None = None) -> None:
        """Where reading starts again after a seek (the committed offset, else the log start), per partition."""
        for tp, offset in starts.items():
            if now is not None:
                self.fetched_at[tp] = now
            if tp in self.outstanding:  # read again from here: what lies below is done by whoever committed it
                self.outstanding[tp] = {o for o in self.outstanding[tp] if o >= offset}
            if self.contiguous(tp.topic):
                self.next[tp] = offset
                self._reached(tp)

    def forget(self, partitions: Sequence[Any]) -> None:
        """No longer track these (where reading starts is unknown): their messages are taken as delivered."""
        for tp in partitions:
            self.next.pop(tp, None)
            self.fetched_at.pop(tp, None)
            self._reached(tp)

    def _reached(self, tp: Any) -> None:
        self.seeks.pop(tp, None)

    @property
    def rewinding(self) -> dict[Any, int]:
        """partition -> the offset its seek back asked for"""
        return {tp: s.offset for tp, s in self.seeks.items()}

    def fetched(self, tp: Any, offset: int, now: float | None = None) -> bool:
        """The consumer fetched this message: True when it is the offset a seek back asked for (the caller makes sure
        faust delivers it, whatever read offset stale messages left), which stops that seek being asked again."""
        if now is not None:
            self.fetched_at[tp] = now
        seek = self.seeks.get(tp)
        if seek is None or seek.offset != offset:
            return False
        seek.refetched = True
        return True

    def admit(self, events: Sequence[Any], now: float) -> tuple[list[Any], dict[Any, int]]:
        """The events to process now, in order, and the partitions to seek back (partition -> offset).

        A message at or below the next expected offset is taken (below: read again after a seek, harmless: every
        input is idempotent); one above it means the offsets in between were never delivered, so it is held back:
        marked acknowledged without telling the consumer (faust's ack is then a no-op, nothing is committed for it)
        and read again after the seek back. The batch's later messages of the partition are taken only from the
        expected offset on, so order is kept."""
        take: list[Any] = []
        rewind: dict[Any, int] = {}
        for ev in events:
            tp, offset = ev.message.tp, ev.message.offset
            want = self.next.get(tp)
            tracked = want is not None and self.contiguous(tp.topic)
            if tracked and offset > want:
                ev.message.acked = True
                seek = self.seeks.get(tp)
                if seek is None or seek.offset != want:
                    rewind[tp] = want
                    self.seeks[tp] = SeekBack(want, seek.since if seek else now, now)
                    log.warning("%s: %s[%d] offset %d delivered while %d was next; reading it again from %d",
                                REWIND_WARNING, tp.topic, tp.partition, offset, want, want)
                continue
            take.append(ev)
            self.outstanding.setdefault(tp, set()).add(offset)
            if tracked and offset == want:
                if tp in self.seeks:
                    log.warning("%s %d on %s[%d], %.1f s after the seek back", REREAD_WARNING, want, tp.topic,
                                tp.partition, now - self.seeks[tp].since)
                self.next[tp] = want + 1
                self._reached(tp)
        return take, rewind | self.overdue(now)

    def done(self, events: Sequence[Any]) -> None:
        """These events' batch has completed (its outputs sent, its state saved): their offsets may be committed."""
        for ev in events:
            left = self.outstanding.get(ev.message.tp)
            if left is not None:
                left.discard(ev.message.offset)

    def overdue(self, now: float) -> dict[Any, int]:
        """The seeks back asked `RESEEK_AFTER_S` ago or more whose offset has not been fetched again: to ask again
        (also when nothing is delivered at all, the partition having no newer input: the transport calls this on a
        timer). One fetched again is on its way behind what was queued before the seek: asking again at once would
        only queue another copy of the re-read behind it, so it waits `RESEEK_FETCHED_AFTER_S`."""
        due = {}
        for tp, seek in self.seeks.items():
            if now - seek.asked_at >= (RESEEK_FETCHED_AFTER_S if seek.refetched else RESEEK_AFTER_S):
                due[tp] = seek.offset
                seek.asked_at, seek.refetched = now, False
                log.info("input ledger: %s[%d] not read again from %d yet: seeking back again", tp.topic,
                         tp.partition, seek.offset)
        return due

    def stalled(self, ends: Mapping[Any, int | None], now: float,
                after_s: float = STALL_AFTER_S) -> list[tuple[Any, int, int, float]]:
        """(partition, next offset, log end, seconds since its last fetch) of each tracked partition behind its log
        end (`ends`: the broker's end offsets) of which nothing has been fetched for `after_s`."""
        out = []
        for tp, end in ends.items():
            nxt, last = self.next.get(tp), self.fetched_at.get(tp)
            if nxt is not None and last is not None and end is not None and end > nxt and now - last >= after_s:
                out.append((tp, nxt, end, now - last))
        return out

    def seek_stalled(self, tp: Any, now: float) -> dict[Any, int]:
        """A stalled partition (`stalled`) sought back to its next offset, as a gap is: faust may have moved the
        fetch position past messages it never delivered (a fetch cut at a flow stop or a generation change) with no
        later message to show the gap. {} when a seek back of it is under way already (`overdue` asks again)."""
        if tp in self.seeks or tp not in self.next:
            return {}
        self.seeks[tp] = SeekBack(self.next[tp], now, now)
        return {tp: self.next[tp]}

    def cap(self, offsets: Mapping[Any, int]) -> dict[Any, int]:
        """Commit offsets no higher than the next offset each tracked partition expects, nor than the lowest offset
        of any partition taken and not done."""
        out = {}
        for tp, o in offsets.items():
            if tp in self.next:
                o = min(o, self.next[tp])
            if self.outstanding.get(tp):
                o = min(o, min(self.outstanding[tp]))
            out[tp] = o
        return out
