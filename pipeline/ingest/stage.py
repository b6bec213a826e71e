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

import numpy as np

from pipeline.ingest.aggregate import Batch, WindowAggregator, WindowConfig
from pipeline.ingest.columns import RowBuilder
from pipeline.ingest.decoders import Decoder, LabelMap, make_decoder
from pipeline.ingest.dlq import DeadLetter
from pipeline.ingest.inventory import Inventory
from pipeline.ingest.validate import validate_rows
from schemas.serde import dumps
from schemas.telemetry import METRIC_FIELDS
from schemas.windows import WindowAggregate


@dataclass(slots=True)
class SourceMessage:
    offset: int
    value: bytes | None  # None: a tombstone (dead-lettered)
    key: bytes | None = None


_SEQ = itertools.count()


class _Held:
    """A row waiting for the rest of its fragments."""

    __slots__ = ("agg_max_ts", "first", "ids", "interval", "last", "metrics", "seq", "ts")

    def __init__(self, b: Batch, i: int, offset: int, agg_max_ts: float) -> None:
        self.ts, self.interval, self.metrics = float(b.ts[i]), float(b.interval[i]), b.metrics[i].copy()
        self.ids = (b.device[i], b.node[i], b.accelerator[i], b.workload[i], b.account[i], b.job[i], b.run_label[i],
                    b.precision[i])
        self.first = self.last = offset
        self.agg_max_ts = agg_max_ts
        self.seq = next(_SEQ)


#: `_Pending.dev_latest` is pruned when it doubles past its last pruned size (and this floor): amortised O(1)
PRUNE_FLOOR = 1024


@dataclass(slots=True)
class _Pending:
    rows: dict[tuple[str, float], _Held] = field(default_factory=dict)
    dev_latest: dict[str, float] = field(default_factory=dict)
    max_ts: float = -math.inf
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


def _batch_row(b: Batch, j: int) -> dict:
    out: dict = {"ts": float(b.ts[j]), "device": b.device[j], "node": b.node[j], "workload_id": b.workload[j]}
    for k, v in (("accelerator", b.accelerator[j]), ("account_id", b.account[j]), ("job_id", b.job[j]),
                 ("run_label", b.run_label[j]), ("precision", b.precision[j])):
        if v is not None:
            out[k] = v
    if not np.isnan(b.interval[j]):
        out["interval_s"] = float(b.interval[j])
    out.update({m: float(b.metrics[j, k]) for k, m in enumerate(METRIC_FIELDS) if not np.isnan(b.metrics[j, k])})
    return out


class IngestCore:
    def __init__(self, cfg: WindowConfig | None = None, decoder: Decoder | str = "native",
                 inventory: Inventory | None = None, labels: LabelMap | None = None, hold_s: float = 10.0) -> None:
        self.agg = WindowAggregator(cfg)
        self.decoder = make_decoder(decoder, labels) if isinstance(decoder, str) else decoder
        self.inventory = inventory or Inventory()
        self.counters: Counter[str] = Counter()
        self.merges_rows = bool(getattr(self.decoder, "merges_rows", False))
        self.hold_s = hold_s
        self._pending: dict[tuple[str, int], _Pending] = {}

    def process(self, topic: str, partition: int, msgs: list[SourceMessage], now: float) -> list[DeadLetter]:
        """Take one partition's messages (in offset order); `now` is the reference clock for the future-skew check."""
        return self.process_raw(topic, partition, [m.value for m in msgs], [m.offset for m in msgs], now,
                                key_of=lambda i: msgs[i].key)

    def process_raw(self, topic: str, partition: int, values: list[bytes | None], offsets: list[int], now: float,
                    key_of: Callable[[int], bytes | None] | None = None) -> list[DeadLetter]:
        """`process` over parallel lists (the hot path: no object per message); keys are fetched only for letters."""
        if not values:
            return []
        rb = RowBuilder()
        errors: list = []
        self.decoder.decode(values, rb, errors)
        rows = rb.build()
        dead: list[DeadLetter] = []

        def letter(mi: int, reason: str, detail: str, row: int | None = None, payload: dict | None = None) -> None:
            value = (values[mi] or b"") if payload is None else dumps(payload)  # a tombstone's letter: empty
            key = key_of(mi) if key_of else None
            dead.append(DeadLetter(reason, detail, topic, partition, offsets[mi], value, key, row))

        for e in errors:
            letter(e.msg, e.reason, e.detail, e.row_index, e.row)
        n = len(rows)
        self.counters["messages"] += len(values)
        self.counters["samples_in"] += n
        if n:

            @cache
            def rows_per_msg() -> np.ndarray:  # only when a letter needs it: rare
                return np.bincount(rows.msg, minlength=len(values))

            self.inventory.fill_accounts(rows.workload, rows.device, rows.node, rows.account)
            ok, problems = validate_rows(rows, now)
            if rb.bad_rows:
                ok[rb.bad_rows] = False
                problems += [(i, "schema_violation", "metric value is not a number") for i in rb.bad_rows]
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
                batch = Batch(ts=r.ts, interval=r.interval, metrics=r.metrics, offset=row_offsets, device=r.device,
                              node=r.node, accelerator=r.accelerator, workload=r.workload, account=r.account, job=r.job,
                              run_label=r.run_label, precision=r.precision,
                              ids_per_message=r.ids_per_message)
                whole = None
                if self.merges_rows:
                    batch = self._merge(topic, partition, batch, drain=False)
                else:  # a too-late row that is its whole message is dead-lettered as the message itself

                    def whole(offset: int) -> tuple[bytes, bytes | None] | None:
                        mi = int(np.searchsorted(offs, offset))
                        return (values[mi], key_of(mi) if key_of else None) if rows_per_msg()[mi] == 1 else None
                self._add(topic, partition, batch, dead, whole)
                if self.merges_rows:  # held fragments are at most hold_s behind the newest: let the watermark move
                    self.agg.observe(topic, partition, self._pending[(topic, partition)].max_ts - self.hold_s)
        self.agg.advance(topic, partition, int(offsets[-1]) + 1)
        for d in dead:
            if d.reason != "too_late":  # counted where it is decided
                self.counters[f"dlq.{d.reason}"] += 1
        return dead

    def _add(self, topic: str, partition: int, batch: Batch | None, dead: list[DeadLetter],
             whole: Callable[[int], tuple[bytes, bytes | None] | None] | None = None) -> None:
        """`whole(offset)`: the (value, key) of the message at `offset` if the row is all of it, else None (the
        letter then carries the row as a native sample)."""
        if batch is None or not len(batch.ts):
            return
        res = self.agg.add(topic, partition, batch)
        self.counters["duplicates"] += res.duplicates
        self.counters["samples_ok"] += len(batch.ts) - res.duplicates - len(res.too_late)
        for j in res.too_late.tolist():
            offset = int(batch.offset[j])
            raw = whole(offset) if whole else None
            value, key = raw if raw is not None else (dumps(_batch_row(batch, j)), None)
            dead.append(DeadLetter("too_late", "window closed longer ago than allowed_lateness_s", topic, partition,
                                   offset, value, key))
            self.counters["dlq.too_late"] += 1

    def _merge(self, topic: str, partition: int, b: Batch | None, drain: bool) -> Batch | None:
        """Merge fragments of one (device, ts) that arrive in separate messages; release a row once the device has
        a newer reading, or the partition's newest reading is `hold_s` ahead of it, or at drain."""
        pend = self._pending.setdefault((topic, partition), _Pending())
        if b is not None:
            agg_p = self.agg.parts.get((topic, partition))
            agg_max = agg_p.max_ts if agg_p is not None else -math.inf
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
                pend.max_ts = max(pend.max_ts, ts)
        out = [k for k in pend.rows
               if drain or pend.dev_latest[k[0]] > k[1] or pend.max_ts - k[1] > self.hold_s]
        held = [pend.rows.pop(k) for k in out]
        pend.prune(self.hold_s)
        if not held:
            return None
        held.sort(key=lambda h: (h.first, h.seq))
        return Batch(ts=np.array([h.ts for h in held]), interval=np.array([h.interval for h in held]),
                     metrics=np.array([h.metrics for h in held]), offset=np.array([h.first for h in held]),
                     last_offset=np.array([h.last for h in held]), device=[h.ids[0] for h in held],
                     node=[h.ids[1] for h in held], accelerator=[h.ids[2] for h in held],
                     workload=[h.ids[3] for h in held], account=[h.ids[4] for h in held],
                     job=[h.ids[5] for h in held], run_label=[h.ids[6] for h in held],
                     precision=[h.ids[7] for h in held])

    def commit_points(self) -> dict[tuple[str, int], tuple[int, float]]:
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
        """Emit everything (end of a finite input)."""
        dead: list[DeadLetter] = []
        for (topic, partition) in list(self._pending):
            self._add(topic, partition, self._merge(topic, partition, None, drain=True), dead)
        out = self.agg.drain()
        self.counters["windows"] += len(out)
        return out
