"""The ingest core without Kafka: raw messages of one partition -> dead letters now, window aggregates when ready.

decode (per topic format) -> inventory fills missing accounts -> vectorised validation -> windowing. The Kafka
adapter (kafka_stage.py), the in-process runner, the tests and the benchmark all drive this same class.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

import numpy as np

from pipeline.ingest.aggregate import Batch, PartitionState, Progress, WindowAggregator, WindowConfig, push_top2
from pipeline.ingest.columns import ID_COLUMNS, RowBuilder, sample_dict
from pipeline.ingest.decoders import Decoder, LabelMap, make_decoder
from pipeline.ingest.dlq import DLQ_MAX_VALUE_BYTES, DeadLetter
from pipeline.ingest.inventory import Inventory
from pipeline.ingest.validate import validate_rows
from schemas.serde import dumps
from schemas.telemetry import MAX_ID_CHARS
from schemas.windows import WindowAggregate


@dataclass(slots=True)
class SourceMessage:
    offset: int
    value: bytes | None  # None: a tombstone (dead-lettered)
    key: bytes | None = None


_SEQ = itertools.count()
#: Default bound on one telemetry message (bytes): Kafka's own default max.message.bytes is ~1 MB.
MAX_MESSAGE_BYTES = 1_048_576


#: A held row's string ids, one per id column of `Batch`
_Ids = NamedTuple("_Ids", [(name, str | None) for name in ID_COLUMNS])  # type: ignore[misc]


class _Held:
    """A row waiting for the rest of its fragments."""

    __slots__ = ("agg_max_ts", "first", "ids", "interval", "last", "metrics", "seq", "ts")

    def __init__(self, b: Batch, i: int, offset: int, agg_max_ts: Progress) -> None:
        self.ts, self.interval, self.metrics = float(b.ts[i]), float(b.interval[i]), b.metrics[i].copy()
        self.ids = _Ids._make(getattr(b, name)[i] for name in ID_COLUMNS)
        self.first = self.last = offset
        self.agg_max_ts = agg_max_ts
        self.seq = next(_SEQ)


#: `_Pending.dev_latest` is pruned when it doubles past its last pruned size (and this floor): amortised O(1)
PRUNE_FLOOR = 1024


@dataclass(slots=True)
class _Pending:
    rows: dict[tuple[str, float], _Held] = field(default_factory=dict)
    dev_latest: dict[str, float] = field(default_factory=dict)
    #: the newest time two devices have reached (one device's alone while there is one): one bad clock cannot
    #: release every held fragment at once nor move the watermark
    max_ts: float = -math.inf
    top: tuple[float, str | None, float] = (-math.inf, None, -math.inf)  # newest time, its device, second newest
    prune_at: int = 0  # size after the last prune, doubled

    def prune(self, hold_s: float) -> None:
        """Forget the newest reading of devices with nothing held and nothing newer than `hold_s` behind the
        partition's newest: a fragment of theirs is released at once by the age rule anyway, so only the memory
        goes (device churn would otherwise grow this without end)."""
        if len(self.dev_latest) <= max(self.prune_at, PRUNE_FLOOR):
            return
        cutoff = self.max_ts - hold_s
        held = {dev for dev, _ in self.rows}
        self.dev_latest = {d: t for d, t in self.dev_latest.items() if t >= cutoff or d in held}
        self.prune_at = 2 * len(self.dev_latest)


class IngestCore:
    def __init__(self, cfg: WindowConfig | None = None, decoder: Decoder | str = "native",
                 inventory: Inventory | None = None, labels: LabelMap | None = None, hold_s: float = 10.0, *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, dlq_max_value_bytes: int = DLQ_MAX_VALUE_BYTES) -> None:
        self.agg = WindowAggregator(cfg)
        self.decoder = make_decoder(decoder, labels) if isinstance(decoder, str) else decoder
        self.inventory = inventory or Inventory()
        self.counters: Counter[str] = Counter()
        self.merges_rows = bool(getattr(self.decoder, "merges_rows", False))
        self.hold_s = hold_s
        #: a message larger than this is dead-lettered `oversized` without being parsed (a poison pill otherwise:
        #: memory and time to parse, windows too large to produce)
        self.max_message_bytes = max_message_bytes
        #: letters carry at most this much of their value (size and hash of the whole in headers)
        self.dlq_max_value_bytes = dlq_max_value_bytes
        self._pending: dict[tuple[str, int], _Pending] = {}
        #: letters decided by `drain` (held fragments released at the end: too late, or ahead)
        self.drain_letters: list[DeadLetter] = []

    def process(self, topic: str, partition: int, msgs: list[SourceMessage], now: float,
                arrival: list[float] | None = None) -> list[DeadLetter]:
        """Take one partition's messages (in offset order); `now` is the reference clock for the future-skew check;
        `arrival`: each message's arrival time (its Kafka timestamp; NaN where unknown), for the clock check."""
        return self.process_raw(topic, partition, [m.value for m in msgs], [m.offset for m in msgs], now,
                                key_of=lambda i: msgs[i].key, arrival=arrival)

    def process_raw(self, topic: str, partition: int, values: list[bytes | None], offsets: list[int], now: float,
                    key_of: Callable[[int], bytes | None] | None = None, arrival: list[float] | None = None,
                    headers_of: Callable[[int], list | None] | None = None) -> list[DeadLetter]:
        """`process` over parallel lists (the hot path: no object per message); keys and headers are fetched only
        for letters. Every message ends in a window (its rows), a letter, or a counter (`duplicates`,
        `messages_without_rows`)."""
        if not values:
            return []
        dead: list[DeadLetter] = []

        def letter(mi: int, reason: str, detail: str, row: int | None = None, payload: dict | None = None,
                   part: str | None = None) -> None:
            value = (values[mi] or b"") if payload is None else dumps(payload)  # a tombstone's letter: empty
            key = key_of(mi) if key_of else None
            src = headers_of(mi) if headers_of else None
            dead.append(DeadLetter.of(reason, detail, topic, partition, offsets[mi], value, key, row, src,
                                      part=part).truncate(self.dlq_max_value_bytes))
            self.counters[f"dlq.{reason}"] += 1

        # Oversized messages are lettered unread; the rest is decoded as if they were not there.
        keep_msgs: list[int] | None = None
        limit = self.max_message_bytes
        longest = max((len(v) for v in values if v), default=0) if None in values else max(map(len, values))
        big = [i for i, v in enumerate(values) if v is not None and len(v) > limit] if longest > limit else []
        if big:
            for i in big:
                letter(i, "oversized", f"message of {len(values[i] or b'')} bytes exceeds max_message_bytes={limit}")
            bigset = set(big)
            keep_msgs = [i for i in range(len(values)) if i not in bigset]
        dec_values = values if keep_msgs is None else [values[i] for i in keep_msgs]
        rb = RowBuilder()
        errors: list = []
        self.decoder.decode(dec_values, rb, errors)
        rows = rb.build()
        if keep_msgs is not None:  # back to indices into `values`
            km = np.asarray(keep_msgs, dtype=np.int64)
            if len(rows):
                rows.msg = km[rows.msg]
            for e in errors:
                e.msg = keep_msgs[e.msg]
        for e in errors:
            letter(e.msg, e.reason, e.detail, e.row_index, e.row)
        n = len(rows)
        self.counters["messages"] += len(values)
        self.counters["samples_in"] += n
        # Messages that gave no row and no letter (an OTLP request of unknown metrics only, fragments merged into an
        # earlier message's row): counted, never silently gone.
        if n < len(values) or self.merges_rows:
            has = np.zeros(len(values), dtype=bool)
            if n:
                has[rows.msg] = True
            lettered = {d.offset for d in dead}
            quiet = sum(1 for i in np.flatnonzero(~has).tolist() if offsets[i] not in lettered)
            if quiet:
                self.counters["messages_without_rows"] += quiet
        if n:

            @cache
            def rows_per_msg() -> np.ndarray:  # only when a letter needs it: rare
                return np.bincount(rows.msg, minlength=len(values))

            self.inventory.fill_accounts(rows.workload, rows.device, rows.node, rows.account)
            arr = None
            checked = False
            if arrival is not None:
                arr = np.asarray(arrival, dtype=np.float64)[rows.msg]
                checked = not np.isnan(arr).any()
            ok, problems = validate_rows(rows, now, arr, self.agg.cfg.max_clock_skew_s,
                                         min(longest, limit) if not big else limit)
            if rb.bad_rows:
                ok[rb.bad_rows] = False
                problems += [(i, "wrong_type", "metric value is not a number") for i in rb.bad_rows]
            if problems:
                row_in_msg = np.arange(n) - np.searchsorted(rows.msg, rows.msg)
                for i, reason, detail in problems:
                    mi = int(rows.msg[i])
                    if rows_per_msg()[mi] == 1:  # the whole message is this row: keep its original bytes
                        letter(mi, reason, detail)
                    else:
                        letter(mi, reason, detail, int(row_in_msg[i]), rows.row_dict(i))
            idx = np.flatnonzero(ok)
            if len(idx):
                r = rows.take(idx)
                offs = np.asarray(offsets, dtype=np.int64)
                row_offsets = offs[r.msg]
                batch = Batch(ts=r.ts, interval=r.interval, metrics=r.metrics, offset=row_offsets,
                              **{name: getattr(r, name) for name in ID_COLUMNS},
                              ids_per_message=r.ids_per_message, arrival_checked=checked)
                whole = None
                if self.merges_rows:
                    batch = self._merge(topic, partition, batch, drain=False)
                    if batch is not None:
                        batch.arrival_checked = checked
                else:  # a too-late row that is its whole message is dead-lettered as the message itself

                    def whole(offset: int) -> tuple[int, bytes] | None:
                        mi = int(np.searchsorted(offs, offset))
                        return (mi, values[mi] or b"") if rows_per_msg()[mi] == 1 else None
                self._add(topic, partition, batch, dead, whole, key_of, headers_of)
                if self.merges_rows:  # held fragments are at most hold_s behind the newest: let the watermark move
                    self.agg.observe(topic, partition, self._pending[(topic, partition)].max_ts - self.hold_s)
        self.agg.advance(topic, partition, int(offsets[-1]) + 1)
        return dead

    def add_rows(self, topic: str, partition: int, batch: Batch) -> list[DeadLetter]:
        """Rows already decoded and valid (a caller with no wire format: the simulator's blocks for training) into the
        windows, as `process` adds them after decoding; returns the letters the windowing decides (too late, clock
        ahead). Offsets in `batch.offset` continue the partition's."""
        dead: list[DeadLetter] = []
        if len(batch.ts):
            self._add(topic, partition, batch, dead)
            self.agg.advance(topic, partition, int(batch.offset.max()) + 1)
        return dead

    def _add(self, topic: str, partition: int, batch: Batch | None, dead: list[DeadLetter],
             whole: Callable[[int], tuple[int, bytes] | None] | None = None,
             key_of: Callable[[int], bytes | None] | None = None,
             headers_of: Callable[[int], list | None] | None = None) -> None:
        """`whole(offset)`: (message index, value) of the message at `offset` if the row is all of it, else None
        (the letter then carries the row as a native sample)."""
        if batch is None or not len(batch.ts):
            return
        res = self.agg.add(topic, partition, batch)
        self.counters["duplicates"] += res.duplicates
        self.counters["samples_ok"] += (len(batch.ts) - res.duplicates - len(res.too_late) - len(res.ahead)
                                        - len(res.long_id))
        skew = self.agg.cfg.max_clock_skew_s
        for reason, rows_ in (("too_late", res.too_late), ("clock_ahead", res.ahead), ("out_of_range", res.long_id)):
            for j in rows_.tolist():
                offset = int(batch.offset[j])
                raw = whole(offset) if whole else None
                if reason == "too_late":
                    detail = "window closed longer ago than allowed_lateness_s"
                elif reason == "out_of_range":
                    detail = f"device id longer than {MAX_ID_CHARS} characters"
                else:
                    detail = (f"timestamp {float(batch.ts[j])} is more than {skew:.0f} s ahead of the partition's "
                              f"confirmed event time (max_clock_skew_s)")
                if raw is not None:
                    mi, value = raw
                    key = key_of(mi) if key_of else None
                    src = headers_of(mi) if headers_of else None
                    dead.append(DeadLetter.of(reason, detail, topic, partition, offset, value, key, None, src)
                                .truncate(self.dlq_max_value_bytes))
                else:
                    part = f"{batch.device[j]}@{float(batch.ts[j])}"
                    row = dumps(sample_dict(batch, j, ID_COLUMNS))
                    dead.append(DeadLetter.of(reason, detail, topic, partition, offset, row, part=part)
                                .truncate(self.dlq_max_value_bytes))
                self.counters[f"dlq.{reason}"] += 1

    def _merge(self, topic: str, partition: int, b: Batch | None, drain: bool) -> Batch | None:
        """Merge fragments of one (device, ts) that arrive in separate messages; release a row once the device has
        a newer reading, or the partition's newest reading is `hold_s` ahead of it, or at drain."""
        pend = self._pending.setdefault((topic, partition), _Pending())
        if b is not None:
            agg_max = self.agg.progress(topic, partition)
            t1, d1, t2 = pend.top
            for i in range(len(b.ts)):
                ts, dev = float(b.ts[i]), b.device[i]
                h = pend.rows.get((dev, ts))
                if h is None:
                    pend.rows[(dev, ts)] = _Held(b, i, int(b.offset[i]), agg_max)
                else:
                    h.metrics = np.where(np.isnan(h.metrics), b.metrics[i], h.metrics)
                    h.last = int(b.offset[i])
                if ts > pend.dev_latest.get(dev, -math.inf):
                    pend.dev_latest[dev] = ts
                t1, d1, t2 = push_top2(t1, d1, t2, dev, ts)
            pend.top = (t1, d1, t2)
            pend.max_ts = max(pend.max_ts, t2 if t2 > -math.inf else t1)
        skew = self.agg.cfg.max_clock_skew_s
        # released: the device has a newer reading, or the partition is hold_s past it, or it is a bad clock's
        # (the aggregator letters it clock_ahead), or the input ends
        out = [k for k in pend.rows
               if drain or pend.dev_latest[k[0]] > k[1] or pend.max_ts - k[1] > self.hold_s
               or k[1] - pend.max_ts > skew]
        held = [pend.rows.pop(k) for k in out]
        pend.prune(self.hold_s)
        if not held:
            return None
        held.sort(key=lambda h: (h.first, h.seq))
        return Batch(ts=np.array([h.ts for h in held]), interval=np.array([h.interval for h in held]),
                     metrics=np.array([h.metrics for h in held]), offset=np.array([h.first for h in held]),
                     last_offset=np.array([h.last for h in held]),
                     **{name: [getattr(h.ids, name) for h in held] for name in _Ids._fields})

    # --- partition ownership (the Kafka adapter's rebalance callbacks) ------------------------------------------
    def assign(self, topic: str, partition: int, progress: Progress | float | None = None) -> None:
        """Take a partition replayed from a commit point with the event-time state recorded there (None: none)."""
        self._pending.pop((topic, partition), None)
        self.agg.restore(topic, partition, progress if progress is not None else Progress())

    def revoke(self, topic: str, partition: int) -> None:
        """Forget a partition: its open windows and held fragments are rebuilt by whoever replays it from our last
        commit (which the held fragments kept behind them)."""
        self.agg.drop(topic, partition)
        self._pending.pop((topic, partition), None)

    def states(self) -> list[PartitionState]:
        """Each partition's state now (open windows, event time, devices tracked, fragments held)."""
        out = []
        for st in self.agg.states():
            pend = self._pending.get((st.topic, st.partition))
            out.append(st if pend is None else st._replace(held_fragments=len(pend.rows),
                                                           fragment_devices=len(pend.dev_latest)))
        return out

    def commit_points(self) -> dict[tuple[str, int], tuple[int, Progress]]:
        """The aggregator's safe offsets, held back further by fragments still waiting to be merged."""
        pts = self.agg.commit_points()
        for key, pend in self._pending.items():
            if pend.rows and key in pts:
                h = min(pend.rows.values(), key=lambda h: h.first)
                if h.first < pts[key][0]:
                    pts[key] = (h.first, h.agg_max_ts)
        return pts

    def ready(self) -> list[WindowAggregate]:
        out = self.agg.ready()
        self.counters["windows"] += len(out)
        return out

    def drain(self) -> list[WindowAggregate]:
        """Emit everything (end of a finite input). Held fragments released here can still be letters (too late,
        clock ahead): they are added to `drain_letters`; `finish()` returns both."""
        dead = self.drain_letters
        for (topic, partition) in list(self._pending):
            self._add(topic, partition, self._merge(topic, partition, None, drain=True), dead)
        out = self.agg.drain()
        self.counters["windows"] += len(out)
        return out

    def finish(self) -> tuple[list[WindowAggregate], list[DeadLetter]]:
        """End of a finite input: every window still open, and the letters decided while draining (taken: a second
        call returns only new ones)."""
        windows = self.drain()
        letters, self.drain_letters = self.drain_letters, []
        return windows, letters
