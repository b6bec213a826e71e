"""Which offsets of each input partition the agents have taken, on topics without gaps: the commit never passes one
they have not taken, and a message delivered past one they have not read is not processed but read again in order.

faust tracks this itself (acked offsets, gap detection), and the quick chaos run still lost window partials after
the fixes of fetch_guard.py: offsets 4-11 and 12-50 of windows[1] (the partition whose accounts start last), each
after a kill soon after its first messages, no gap logged. A path in faust's code that fits: its guards test
truthiness, so a partition without a committed offset, or committed at 0, has no read offset, whatever is delivered
first is taken as the start, and the first commit covers every offset below it. Rather than trust that bookkeeping,
the ledger knows where reading must start (the committed offset, or the log start where there is none: `start`), takes
each batch's messages in order (`admit`), holds back every message of a partition after a hole and asks for a
seek back to it, and caps each commit at the next offset it expects (`cap`).

Only topics this project's idempotent producers write are tracked (the `contiguous` predicate, as fetch_guard's
`refuse_gaps`): the CIP and allocations topics are the provider's, where compaction or transactions make real gaps.
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


@dataclass
class InputLedger:
    contiguous: Callable[[str], bool]
    #: partition (faust TP) -> the next offset the agents must take
    next: dict[Any, int] = field(default_factory=dict)
    #: partition -> the offset a seek back was asked for (one per hole, until reading reaches it again)
    rewinding: dict[Any, int] = field(default_factory=dict)

    def start(self, starts: Mapping[Any, int]) -> None:
        """Where reading starts again after a seek (the committed offset, else the log start), per partition."""
        for tp, offset in starts.items():
            if self.contiguous(tp.topic):
                self.next[tp] = offset
                self.rewinding.pop(tp, None)

    def forget(self, partitions: Sequence[Any]) -> None:
        """No longer track these (where reading starts is unknown): their messages are taken as delivered."""
        for tp in partitions:
            self.next.pop(tp, None)
            self.rewinding.pop(tp, None)

    def admit(self, events: Sequence[Any]) -> tuple[list[Any], dict[Any, int]]:
        """The events to process now, in order, and the partitions to seek back (partition -> offset).

        A message at or below the next expected offset is taken (below: read again after a seek, harmless: every
        input is idempotent); one above it means the offsets in between were never delivered, so it and every later
        message of its partition in this batch are held back: marked acknowledged without telling the consumer
        (faust's ack is then a no-op, nothing is committed for them) and read again after the seek back."""
        take: list[Any] = []
        rewind: dict[Any, int] = {}
        held: set[Any] = set()
        for ev in events:
            tp, offset = ev.message.tp, ev.message.offset
            want = self.next.get(tp)
            if want is None or not self.contiguous(tp.topic):
                take.append(ev)
                continue
            if tp in held or offset > want:
                held.add(tp)
                ev.message.acked = True
                if self.rewinding.get(tp) != want:
                    self.rewinding[tp] = rewind[tp] = want
                    log.warning("%s: %s[%d] offset %d delivered while %d was next; reading it again from %d",
                                REWIND_WARNING, tp.topic, tp.partition, offset, want, want)
                continue
            take.append(ev)
            if offset == want:
                self.next[tp] = want + 1
                self.rewinding.pop(tp, None)
        return take, rewind

    def cap(self, offsets: Mapping[Any, int]) -> dict[Any, int]:
        """Commit offsets no higher than the next offset each tracked partition expects."""
        return {tp: min(o, self.next[tp]) if tp in self.next else o for tp, o in offsets.items()}
