"""The pure windowing core: valid rows of one Kafka partition -> partial window aggregates per workload.

Event-time tumbling windows of `window_s`, aligned to epoch multiples. Per partition the watermark is the
partition's *confirmed* event time minus `watermark_lag_s`: the newest time that two sources have reached (the
second largest of the nodes' newest event times; of the devices' while the partition has seen one node only), so
one bad clock cannot move it. A row further ahead of that than `max_clock_skew_s` is returned as clock-ahead (DLQ).
Every row is assigned, from the watermark *before* it, to a unit (workload, window w, revision r):

- r = 0 while window w is still open (watermark < its end); the unit is emitted when the watermark passes the end.
- late rows (window already closed) go to r = (index of the window epoch the watermark is in) - w >= 1, a
  CORRECTION that carries only the late rows' additive contribution; it is emitted when the watermark passes the
  end of that epoch. Summing every revision of a window gives the totals of an all-in-order run.
- rows whose window ended more than `allowed_lateness_s` before the watermark are returned as too late (DLQ).

Because the assignment depends only on the partition's message order and the watermark, a replay from a safe
offset with the watermark recorded there rebuilds identical units, hence identical window ids (see
`commit_points`). Duplicated (device, ts) rows count once (dedup state per window, kept until it expires).

This module decides which rows go to which unit and when a unit is emitted; what a unit adds up (utilisation
fractions, FLOP, moments, synchrony profiles) and how its `sums` are written is window_stats.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from pipeline.ingest.columns import ID_COLUMNS, follows
from pipeline.ingest.window_stats import Unit, profiles, row_stats, unit_sums_layout
from schemas.ids import content_id
from schemas.telemetry import MAX_ID_CHARS
from schemas.window_sums import MAX_PROFILE_BUCKETS
from schemas.windows import WindowAggregate

if TYPE_CHECKING:
    from pipeline.settings import Settings

_NO_EPOCH = -(2**40)
#: dedup key = device id << 42 | event time in ms: 2**42 ms reaches the year 2109 (41 bits ended in 2039), and
#: 63 - 42 = 21 bits leave room for 2M devices per partition within the dedup horizon (see compact)
_TS_BITS = 42
_TS_MASK = (1 << _TS_BITS) - 1
_MAX_DEVICES = 1 << (63 - _TS_BITS)
#: Devices silent past the dedup horizon are forgotten (ids renumbered) when a check every COMPACT_EVERY batches
#: finds at least COMPACT_SHARE of at least COMPACT_MIN devices reclaimable: churn (replaced nodes, MIG or
#: pod-scoped ids) must not grow the per-device state without end.
COMPACT_EVERY, COMPACT_MIN, COMPACT_SHARE = 256, 1024, 0.25


@dataclass(frozen=True, slots=True)
class WindowConfig:
    window_s: float = 60.0
    watermark_lag_s: float = 30.0
    allowed_lateness_s: float = 3600.0
    #: sub-buckets per window for the synchrony profiles (12 x 5 s at the default window)
    profile_buckets: int = 12
    #: interval of a sample without interval_s: gap to the device's previous sample (else to its next one in the
    #: batch), capped here; with neither the interval is unknown: 0 s in the point, this long in the FLOP high
    max_interval_s: float = 60.0
    #: a row further ahead of the partition's confirmed event time than this is dead-lettered `clock_ahead`
    max_clock_skew_s: float = 300.0
    #: an emitted unit keeps the commit point at or before its first row for this long (of watermark) after it
    #: closed, so a restart re-reads it and its dedup keys: a duplicate arriving up to this much (plus the watermark
    #: lag) after its original is still dropped after a restart, not counted again (see `commit_points`)
    dedup_replay_s: float = 150.0

    def __post_init__(self) -> None:
        if not 0 < self.profile_buckets <= MAX_PROFILE_BUCKETS:  # the window sums' layout reads no more
            raise ValueError(f"profile_buckets must be 1..{MAX_PROFILE_BUCKETS}, not {self.profile_buckets}")

    @classmethod
    def from_settings(cls, settings: Settings) -> WindowConfig:
        """The windowing the settings ask for (window length, watermark lag, lateness, clock skew): the one place
        the Kafka stage and the replay both build it."""
        s = settings.ingest
        return cls(window_s=settings.window_s, watermark_lag_s=s.watermark_lag_s,
                   allowed_lateness_s=s.allowed_lateness_s, max_clock_skew_s=s.max_clock_skew_s)


@dataclass(slots=True)
class Batch:
    """Valid rows of one partition in arrival order; `offset` is each row's Kafka offset."""

    ts: np.ndarray
    interval: np.ndarray
    metrics: np.ndarray
    offset: np.ndarray
    device: list[str]
    node: list[str]
    accelerator: list[str | None]
    workload: list[str]
    account: list[str | None]
    job: list[str | None]
    run_label: list[str | None]
    precision: list[str | None]
    #: for rows merged from several messages (OTLP / prometheus fragments): the last fragment's offset
    last_offset: np.ndarray | None = None
    #: ids other than device are constant within a message (rows of one message share one offset)
    ids_per_message: bool = False
    #: every row passed the clock check against its message's arrival time (Kafka timestamp): then a source
    #: alone on its partition may move the watermark; without an arrival clock it never does (nothing vouches)
    arrival_checked: bool = False


follows(Batch, ID_COLUMNS)


@dataclass(slots=True)
class AddResult:
    too_late: np.ndarray  # row indices into the batch
    duplicates: int
    #: rows further ahead of the partition's confirmed event time than max_clock_skew_s (row indices)
    ahead: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: rows of devices whose id is longer than MAX_ID_CHARS (checked when a device is new; columnar input)
    long_id: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


#: ids kept in a Progress snapshot are cut to this (commit metadata is small: 4 KiB by default on the broker)
_NAME_MAX = 200


@dataclass(frozen=True, slots=True)
class Progress:
    """A partition's event-time state at one point of its stream, enough to continue exactly from there: the
    watermark basis (`max_ts`, monotone) and the top two newest event times per device and per node."""

    max_ts: float = -math.inf
    dev: tuple[float, str | None, float] = (-math.inf, None, -math.inf)  # (top time, its device, second time)
    node: tuple[float, str | None, float] = (-math.inf, None, -math.inf)
    first_node: str | None = None
    multi_node: bool = False

    def to_json(self) -> dict:
        def f(x: float) -> float | None:
            return x if math.isfinite(x) else None

        def cut(n: str | None) -> str | None:
            return n if n is None or len(n) <= _NAME_MAX else None

        return {"max_ts": f(self.max_ts), "dev": [f(self.dev[0]), cut(self.dev[1]), f(self.dev[2])],
                "node": [f(self.node[0]), cut(self.node[1]), f(self.node[2])], "first_node": cut(self.first_node),
                "multi_node": self.multi_node}

    @classmethod
    def from_json(cls, d: dict) -> Progress:
        """Raises ValueError on anything else than `to_json`'s output (or its older form, `max_ts` alone)."""
        def t(x: object) -> float:
            if x is None:
                return -math.inf
            if type(x) not in (int, float) or not math.isfinite(x):  # type: ignore[arg-type]
                raise ValueError(f"not a time: {x!r}")
            return float(x)  # type: ignore[arg-type]

        def top(v: object) -> tuple[float, str | None, float]:
            if v is None:
                return (-math.inf, None, -math.inf)
            if not (isinstance(v, list) and len(v) == 3 and (v[1] is None or isinstance(v[1], str))):
                raise ValueError(f"not a top-two record: {v!r}")
            return (t(v[0]), v[1], t(v[2]))

        if not isinstance(d, dict) or "max_ts" not in d:
            raise ValueError("no max_ts")
        first = d.get("first_node")
        if first is not None and not isinstance(first, str):
            raise ValueError("first_node is not a string")
        mts = t(d["max_ts"])
        if "dev" not in d:  # older metadata: the watermark basis alone; both trackers start from it
            return cls(mts, (mts, None, mts), (mts, None, mts), None, False)
        return cls(mts, top(d.get("dev")), top(d.get("node")), first, bool(d.get("multi_node")))


def _top2(ts: np.ndarray, ids: np.ndarray, t1: float, g1: int, t2: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top two of the sources' newest event times, after each row (vectorised; a source = a device or a node).

    State before the batch: top time `t1` of source `g1`, and `t2` the largest newest time of any other source.
    Returns per row (top time, top source, second time) after the row. The second time never decreases (it is the
    second largest of non-decreasing values); it only grows when a row of a source other than the top one arrives,
    or when a new source takes the top (the old top's time becomes the second)."""
    n = len(ts)
    cm = np.maximum.accumulate(np.concatenate(([t1], ts)))
    prev_top = cm[:-1]
    newtop = ts > prev_top
    last = np.maximum.accumulate(np.where(newtop, np.arange(n), -1))
    top_src = np.where(last >= 0, ids[np.maximum(last, 0)], g1)
    prev_src = np.concatenate(([g1], top_src[:-1]))
    a = np.where(ids != top_src, ts, -math.inf)
    change = newtop & (ids != prev_src)
    a[change] = prev_top[change]
    second = np.maximum.accumulate(np.concatenate(([t2], a)))[1:]
    return cm[1:], top_src, second


def push_top2(t1: float, s1: object, t2: float, src: object, t: float) -> tuple[float, object, float]:
    """`_top2` for one row: the top time `t1` of source `s1` and the second `t2`, after a row of `src` at `t`."""
    if src == s1:
        return max(t1, t), s1, t2
    if t > t1:
        return t, src, t1
    return t1, s1, max(t2, t)


class PartitionState(NamedTuple):
    """One partition's state as seen from outside: for metrics, status and tests."""

    topic: str
    partition: int
    event_time: float  # the confirmed event time (watermark basis); -inf before any row
    open_units: int  # window units not yet emitted
    oldest_open_offset: int | None  # the first offset of the oldest open unit (None: nothing open)
    devices: int  # devices the dedup state tracks (shrinks as quiet devices are forgotten)
    held_fragments: int = 0  # rows waiting for the rest of their fragments (set by IngestCore)
    fragment_devices: int = 0  # devices the fragment merger tracks (set by IngestCore)
    open_samples: int = 0  # samples in the open window units (what a restart would re-read)


@dataclass(slots=True)
class _Partition:
    #: the watermark basis: the partition's confirmed event time (never decreases; see the module docstring)
    max_ts: float = -math.inf
    next_offset: int | None = None
    units: dict[tuple[str, int, int], Unit] = field(default_factory=dict)
    #: emitted units: (first offset, last offset, progress before the first, end of the epoch it closed at,
    #: (workload, window))
    closed: list[tuple[int, int, Progress, float, tuple[str, int]]] = field(default_factory=list)
    #: (workload, window) -> the last offset of a duplicate row dropped for it: the duplicate belongs to the
    #: window's units (a restart between them would read it without its original), see `commit_points`
    dup_last: dict[tuple[str, int], int] = field(default_factory=dict)
    #: top two newest event times per device (time, device id, second time) and per node (time, node id, second)
    dev_top: tuple[float, int, float] = (-math.inf, -1, -math.inf)
    node_top: tuple[float, int, float] = (-math.inf, -1, -math.inf)
    first_node: int = -1  # the partition's first node id (-1: none yet) ...
    multi_node: bool = False  # ... and whether another node has been seen since (then nodes confirm each other)
    node_ids: dict[str, int] = field(default_factory=dict)
    #: rows ahead of the confirmed time, per node (device) id: their newest time, until others agree or it passes
    pending_node: dict[int, float] = field(default_factory=dict)
    pending_dev: dict[int, float] = field(default_factory=dict)
    #: whether the node (device) tracker's top was set with nothing to check it against (a partition's first rows)
    unvouched: tuple[bool, bool] = (False, False)
    #: per device id: its node's id (the node of its first row)
    dev_node: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    seen: dict[int, list[np.ndarray]] = field(default_factory=dict)  # window -> dedup keys, one array per batch
    #: device name -> small integer id, per partition (a device lives on one partition: the arrays below stay
    #: as long as the partition's own fleet, not the whole stage's)
    dev_ids: dict[str, int] = field(default_factory=dict)
    #: per device id: the largest dedup key recorded (a later row above it cannot be a duplicate) ...
    dev_key: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: ... and the event time of its last-arrived row (NaN: none yet), for intervals
    dev_last: np.ndarray = field(default_factory=lambda: np.zeros(0))
    adds: int = 0  # batches added (paces the device compaction check)

    def fit(self, n_devices: int) -> None:
        """Grow the per-device arrays to the partition's device count."""
        have = len(self.dev_key)
        if n_devices >= _MAX_DEVICES:  # ids would spill into the keys' sign bit: refuse loudly, never corrupt
            raise OverflowError(f"{n_devices} devices on one partition; at most {_MAX_DEVICES - 1} fit the dedup keys")
        if n_devices > have:
            new = max(n_devices, 2 * have)
            self.dev_key = np.concatenate((self.dev_key, np.arange(have, new, dtype=np.int64) << _TS_BITS))
            self.dev_last = np.concatenate((self.dev_last, np.full(new - have, np.nan)))
            self.dev_node = np.concatenate((self.dev_node, np.full(new - have, -1, dtype=np.int64)))

    def progress(self) -> Progress:
        """The event-time state now, with names instead of ids (ids are renumbered by compact)."""
        dnames, nnames = list(self.dev_ids), list(self.node_ids)

        def name(names: list[str], g: int) -> str | None:
            return names[g] if 0 <= g < len(names) else None

        d, nd = self.dev_top, self.node_top
        return Progress(self.max_ts, (d[0], name(dnames, d[1]), d[2]), (nd[0], name(nnames, nd[1]), nd[2]),
                        name(nnames, self.first_node), self.multi_node)

    @classmethod
    def restored(cls, pr: Progress) -> _Partition:
        p = cls(max_ts=pr.max_ts, multi_node=pr.multi_node)

        def node_id(name: str | None) -> int:
            return -1 if name is None else p.node_ids.setdefault(name, len(p.node_ids))

        p.first_node = node_id(pr.first_node)
        p.node_top = (pr.node[0], node_id(pr.node[1]), pr.node[2])
        g = -1
        if pr.dev[1] is not None:
            g = p.dev_ids[pr.dev[1]] = 0
            p.fit(1)
        p.dev_top = (pr.dev[0], g, pr.dev[2])
        return p

    def compact(self, horizon_s: float, share: float) -> int:
        """Forget devices whose newest row is older than `horizon_s` (no dedup key of theirs is left, no open unit
        holds them) if at least `share` of the devices are such; the rest are renumbered densely, in order, in every
        structure that holds an id. Returns the number forgotten. A forgotten device that comes back starts
        afresh (its first row without interval_s takes the default interval)."""
        n = len(self.dev_ids)
        keep = (self.dev_key[:n] & _TS_MASK) >= horizon_s * 1000.0
        for u in self.units.values():
            keep[list(u.dev_index)] = True
        old = np.flatnonzero(keep)
        if n - len(old) < share * n:
            return 0
        remap = np.full(n, -1, dtype=np.int64)
        remap[old] = np.arange(len(old))  # increasing: sorted key arrays stay sorted
        names = list(self.dev_ids)  # ids were handed out in insertion order
        self.dev_ids = {names[g]: i for i, g in enumerate(old.tolist())}
        self.dev_key = (np.arange(len(old), dtype=np.int64) << _TS_BITS) | (self.dev_key[old] & _TS_MASK)
        self.dev_last = self.dev_last[old]
        self.pending_dev.clear()  # ids change; a candidate forgotten here is only asked to agree again
        self.pending_node.clear()
        # nodes: keep those of the kept devices (and the trackers' own), renumbered in order
        nodes = self.dev_node[old]
        nnames = list(self.node_ids)
        keep_n = set(nodes.tolist()) | {self.first_node, self.node_top[1]}
        nmap = {g: i for i, g in enumerate(sorted(x for x in keep_n if x >= 0))}
        self.node_ids = {nnames[g]: i for g, i in nmap.items()}
        self.dev_node = np.array([nmap.get(x, -1) for x in nodes.tolist()], dtype=np.int64)
        self.first_node = nmap.get(self.first_node, -1)
        self.node_top = (self.node_top[0], nmap.get(self.node_top[1], -1), self.node_top[2])
        t1, g1, t2 = self.dev_top
        self.dev_top = (t1, int(remap[g1]) if 0 <= g1 < n else -1, t2)
        for chunks in self.seen.values():
            for j, a in enumerate(chunks):
                g = remap[a >> _TS_BITS]
                live = g >= 0  # all of them: a forgotten device's newest key is below every window kept here
                chunks[j] = (g[live] << _TS_BITS) | (a[live] & _TS_MASK)
        for u in self.units.values():
            u.dev_index = {int(remap[g]): li for g, li in u.dev_index.items()}
        return n - len(old)

    def seen_keys(self, window: int) -> np.ndarray | None:
        """The window's recorded keys as one sorted array (merging the per-batch arrays on demand)."""
        chunks = self.seen.get(window)
        if not chunks:
            return None
        if len(chunks) > 1:
            chunks[:] = [np.unique(np.concatenate(chunks))]
        return chunks[0]


def _codes(values: list) -> tuple[np.ndarray, list]:
    """Dense integer codes of a list of hashables (first-seen order) and the distinct values."""
    uniq = list(dict.fromkeys(values))
    index = {v: i for i, v in enumerate(uniq)}
    return np.fromiter(map(index.__getitem__, values), dtype=np.int64, count=len(values)), uniq


def _dense(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(a, return_inverse=True) for non-negative ints; by a presence table when their range is small."""
    lo, hi = int(a.min()), int(a.max())
    if hi - lo > 8 * len(a) + 1024:
        return np.unique(a, return_inverse=True)
    present = np.zeros(hi - lo + 1, dtype=bool)
    present[a - lo] = True
    uniq = np.flatnonzero(present)
    rank = np.cumsum(present) - 1
    return uniq + lo, rank[a - lo]


class WindowAggregator:
    """Partial window aggregates over many partitions. Pure: no Kafka, no clock."""

    def __init__(self, cfg: WindowConfig | None = None) -> None:
        self.cfg = cfg or WindowConfig()
        self.parts: dict[tuple[str, int], _Partition] = {}

    # --- state across restarts -------------------------------------------------------------------------------
    def restore(self, topic: str, partition: int, progress: Progress | float) -> None:
        """Start a partition replayed from a commit point with the event-time state recorded there (a bare float:
        the watermark basis alone, as older commits recorded it)."""
        if not isinstance(progress, Progress):
            t = float(progress)
            progress = Progress(t, (t, None, t), (t, None, t))
        self.parts[(topic, partition)] = _Partition.restored(progress)

    def progress(self, topic: str, partition: int) -> Progress:
        """A partition's event-time state now (empty for one not seen yet)."""
        p = self.parts.get((topic, partition))
        return p.progress() if p is not None else Progress()

    def drop(self, topic: str, partition: int) -> None:
        """Forget a partition (revoked): its open units will be rebuilt by whoever replays it."""
        self.parts.pop((topic, partition), None)

    def advance(self, topic: str, partition: int, next_offset: int) -> None:
        """Record that every message below `next_offset` has been processed (including dead-lettered ones)."""
        p = self.parts.setdefault((topic, partition), _Partition())
        p.next_offset = next_offset if p.next_offset is None else max(p.next_offset, next_offset)

    def observe(self, topic: str, partition: int, event_time: float) -> None:
        """Advance a partition's max event time without a row (rows held upstream, e.g. fragments being merged)."""
        p = self.parts.setdefault((topic, partition), _Partition())
        p.max_ts = max(p.max_ts, event_time)

    def commit_points(self) -> dict[tuple[str, int], tuple[int, Progress]]:
        """Per partition: (offset safe to commit, the event-time state (`Progress`) before it).

        Safe = no unit that is still open has a row below it, no emitted unit straddles it (has rows on both
        sides), and no unit emitted less than `dedup_replay_s` of watermark ago has a row below it. A restart
        replays from there with that max event time: every unit with rows at or above it is rebuilt whole, so
        re-emitted windows are identical (same window_id) and nothing is lost; and the dedup keys of the recently
        emitted units are rebuilt with them, so a late duplicate of one of their rows is dropped as it was before
        the restart (without the hold it became a correction, counted twice, or a revision-0 unit of one row that
        replaced the whole window downstream under the same window_id).
        """
        out = {}
        for key, p in self.parts.items():
            if p.next_offset is None:
                continue
            recent = p.max_ts - self.cfg.watermark_lag_s - self.cfg.dedup_replay_s
            cands = [(u.f, u.first_ts_max) for u in p.units.values()]
            cands += [(f, fm) for f, _, fm, end, _ in p.closed if end > recent]
            off, mts = min(cands, key=lambda c: c[0]) if cands else (p.next_offset, p.progress())
            dl = p.dup_last
            moved = True
            while moved:
                moved = False
                for f, last, fm, _, wk in p.closed:
                    if f < off <= max(last, dl.get(wk, -1)):
                        off, mts, moved = f, fm, True
            p.closed = [c for c in p.closed if max(c[1], dl.get(c[4], -1)) >= off]
            out[key] = (off, mts)
        return out

    def open_units(self) -> int:
        return sum(len(p.units) for p in self.parts.values())

    def states(self) -> list[PartitionState]:
        """What each partition holds now (for metrics and tests: the public view of `parts`). Safe from another
        thread (the metrics endpoint): every dict is copied by one C call before Python iterates it."""
        out = []
        for (topic, partition), p in list(self.parts.items()):
            units = list(p.units.values())
            out.append(PartitionState(topic, partition, p.max_ts, len(units), min((u.f for u in units), default=None),
                                      len(p.dev_ids), open_samples=sum(u.samples for u in units)))
        return out

    # --- the hot path ----------------------------------------------------------------------------------------
    def add(self, topic: str, partition: int, b: Batch) -> AddResult:
        cfg, W = self.cfg, self.cfg.window_s
        p = self.parts.setdefault((topic, partition), _Partition())
        n = len(b.ts)
        if n == 0:
            return AddResult(np.zeros(0, dtype=np.int64), 0)
        ts = b.ts
        ids = p.dev_ids
        g = list(map(ids.get, b.device))  # C-level lookups; the comprehension below only when a device is new
        long_dev = None
        if None in g:
            if b.ids_per_message and max(map(len, {b.device[i] for i, x in enumerate(g) if x is None})) > MAX_ID_CHARS:
                long_dev = np.fromiter((len(d) > MAX_ID_CHARS for d in b.device), dtype=bool, count=n)
            g = [ids.setdefault(d, len(ids)) for d in b.device]
        gid = np.array(g, dtype=np.int64)
        p.fit(len(ids))
        nid = p.dev_node[gid]
        if (nid < 0).any():  # devices new to the partition: their node is the node of their first row here
            nids = p.node_ids
            for i in np.flatnonzero(nid < 0).tolist():
                if p.dev_node[gid[i]] < 0:
                    p.dev_node[gid[i]] = nids.setdefault(b.node[i], len(nids))
            nid = p.dev_node[gid]
        ahead, before, snap = self._confirmed(p, ts, gid, nid, b.arrival_checked)
        bad_id = long_dev if long_dev is not None and long_dev.any() else None
        if bad_id is not None:  # ids too long to travel in a window: out, like rows ahead (letters, out_of_range)
            ahead = ahead & ~bad_id
        msg_start = np.concatenate(([True], b.offset[1:] != b.offset[:-1]))
        before_msg = np.flatnonzero(msg_start)[np.cumsum(msg_start) - 1]  # row index of each row's message start
        wm = before - cfg.watermark_lag_s
        w = np.floor(ts / W).astype(np.int64)
        epoch = np.where(np.isfinite(wm), np.floor(np.where(np.isfinite(wm), wm, 0.0) / W), _NO_EPOCH).astype(np.int64)
        r = np.maximum(epoch - w, 0)
        too_late = (wm - (w + 1) * W) > cfg.allowed_lateness_s
        if ahead.any() or bad_id is not None:  # out of everything below (dedup, intervals, windows)
            out_ = ahead if bad_id is None else ahead | bad_id
            too_late &= ~out_
            gone = too_late | out_
        else:
            gone = too_late
        keys = (gid << _TS_BITS) | np.round(ts * 1000).astype(np.int64)
        # Rows grouped by device, arrival order inside (stable): shared by the duplicate check and the intervals.
        order = np.argsort(gid, kind="stable")
        ks = keys[order]
        # A row can repeat an earlier (device, ts) only if its key is not above every key of that device seen
        # before it (earlier rows of this batch: running max; earlier batches: dev_key). Device ids are the keys'
        # high bits, so the running max never carries over from one device's rows to the next one's.
        prior = np.maximum(np.concatenate(([np.iinfo(np.int64).min], np.maximum.accumulate(ks)[:-1])),
                           p.dev_key[ks >> _TS_BITS])
        suspect = np.empty(n, dtype=bool)
        suspect[order] = ks <= prior
        if gone is not too_late:  # a bad clock's row (or a refused id's) must not stand as its device's newest
            keep_k = ~(gone & ~too_late)
            np.maximum.at(p.dev_key, gid[keep_k], keys[keep_k])
        else:
            np.maximum.at(p.dev_key, gid, keys)
        if suspect.any():  # out-of-order or repeated rows: the exact check against the windows' recorded keys
            dup = np.ones(n, dtype=bool)
            dup[np.unique(keys, return_index=True)[1]] = False
            dup |= gone
            check = suspect & ~dup
            for wv in np.unique(w[check]).tolist():
                old = p.seen_keys(wv)
                if old is not None:
                    sel = np.flatnonzero(check & (w == wv))
                    dup[sel[np.isin(keys[sel], old)]] = True
        else:
            dup = gone.copy()
        dropped = dup & ~gone
        duplicates = int(dropped.sum())
        if duplicates:
            last_off = b.offset if b.last_offset is None else b.last_offset
            for i in np.flatnonzero(dropped).tolist():
                k = (b.workload[i], int(w[i]))
                p.dup_last[k] = max(p.dup_last.get(k, -1), int(last_off[i]))
        new = ~dup
        wn = w[new]
        if len(wn):
            kn = keys[new]
            w0, w1 = int(wn.min()), int(wn.max())
            if w0 == w1:
                p.seen.setdefault(w0, []).append(kn)
            else:
                for wv in np.unique(wn).tolist():
                    p.seen.setdefault(wv, []).append(kn[wn == wv])
        keep = np.flatnonzero(new)
        self._expire(p)
        if len(keep):
            dt = self._intervals(p, b, keep, order[new[order]], gid)
            self._accumulate(p, b, keep, w, r, before_msg, snap, gid, dt)
        p.adds += 1
        if p.adds % COMPACT_EVERY == 0 and len(p.dev_ids) >= COMPACT_MIN:  # after the batch: its ids are done
            cfg = self.cfg
            p.compact(p.max_ts - cfg.watermark_lag_s - cfg.allowed_lateness_s - cfg.window_s, COMPACT_SHARE)
        return AddResult(np.flatnonzero(too_late), duplicates, np.flatnonzero(ahead),
                         np.flatnonzero(bad_id) if bad_id is not None else np.zeros(0, dtype=np.int64))

    def _confirmed(self, p: _Partition, ts: np.ndarray, gid: np.ndarray, nid: np.ndarray, alone_ok: bool
                   ) -> tuple[np.ndarray, np.ndarray, Callable[[int], Progress]]:
        """The clock check and the watermark basis.

        The partition's confirmed event time is the second largest of its nodes' newest times (of its devices'
        while it has seen one node): two sources agree on it, so one bad clock cannot move it. A row further than
        `max_clock_skew_s` ahead of the confirmed time is `ahead` (dead-lettered clock_ahead) and left out of the
        trackers, unless at least half of the partition's other active sources agree with it (a gap that every
        node makes is no bad clock). This holds with an arrival clock too: rows of a backfilled topic are far
        behind their Kafka timestamps whatever their clock. `alone_ok` (the rows passed the check against their
        Kafka timestamps) lets a source alone on its partition move the watermark; without it nothing vouches for
        a lone source. Returns (ahead, the watermark basis before each row = running max of the confirmed time, a
        function giving the full event-time state before a row) and leaves the partition's state at the batch's
        end. Clean batches take one vectorised pass; a batch with a row ahead takes the row-by-row pass (rare)."""
        n = len(ts)
        skew = self.cfg.max_clock_skew_s
        if p.first_node < 0:
            p.first_node = int(nid[0])
        node_top0, dev_top0, first_node = p.node_top, p.dev_top, p.first_node
        n_t1, n_src, n_t2 = _top2(ts, nid, *node_top0)
        multi_before = p.multi_node
        first_other = 0 if multi_before else n
        d_t1 = d_src = d_t2 = None
        if multi_before:
            t1, t2 = n_t1, n_t2
        else:
            d_t1, d_src, d_t2 = _top2(ts, gid, *dev_top0)
            other = np.flatnonzero(nid != first_node)
            if len(other):  # a second node: from its first row on, nodes confirm each other
                first_other = int(other[0])
                t1 = np.concatenate((d_t1[:first_other], n_t1[first_other:]))
                t2 = np.concatenate((d_t2[:first_other], n_t2[first_other:]))
            else:
                t1, t2 = d_t1, d_t2
        ahead = np.zeros(n, dtype=bool)
        # The clean batch's test; the row-by-row pass only when a row is ahead.
        t2_before = np.concatenate(([node_top0[2] if multi_before else dev_top0[2]], t2[:-1]))
        # Once two sources are seen, a row is held against the vouched top (the newest accepted time), not the
        # second source: a source that goes quiet (its job ended) must not turn the others' rows into letters.
        t1_before = np.concatenate(([node_top0[0] if multi_before else dev_top0[0]], t1[:-1]))
        unvouched0 = p.unvouched[0] if multi_before else p.unvouched[1]
        ref_before = t2_before if unvouched0 else np.where(np.isfinite(t2_before), t1_before, t2_before)
        with np.errstate(invalid="ignore"):
            cand = np.isfinite(ref_before) & (ts > ref_before + skew)
        # a top more than the bound above the confirmed time: a bad first row may sit there (nothing vouched)
        top_alone = any(p.unvouched) and math.isfinite(t2[-1]) and t1[-1] - t2[-1] > skew
        # rows that came with no confirmed time to hold them against, when one appears within the batch
        unchecked = not math.isfinite(t2_before[0]) and math.isfinite(t2[-1])
        if cand.any() or top_alone or unchecked:
            ahead, tr = self._confirm_rows(p, ts, gid, nid, first_other, multi_before)
            n_t1, n_src, n_t2 = tr[:, 0], tr[:, 1].astype(np.int64), tr[:, 2]
            if d_t1 is not None:
                d_t1, d_src, d_t2 = tr[:, 3], tr[:, 4].astype(np.int64), tr[:, 5]
                t1 = np.concatenate((d_t1[:first_other], n_t1[first_other:]))
                t2 = np.concatenate((d_t2[:first_other], n_t2[first_other:]))
            else:
                t1, t2 = n_t1, n_t2
        elif not math.isfinite(t2[-1]):  # nothing confirmed yet: the trackers' top is unvouched
            p.unvouched = (True, True)
        else:
            p.unvouched = (False, False)
        if first_other < n:
            p.multi_node = True
        # The watermark follows the vouched top (rows ahead of it are letters and never reach the trackers).
        conf = np.where(np.isfinite(t2), t1, t1 if alone_ok else -math.inf)
        if ahead.any():
            conf[ahead] = -math.inf
        basis = np.maximum.accumulate(np.concatenate(([p.max_ts], conf)))
        before = basis[:-1]
        dnames: list[str] | None = None
        nnames: list[str] | None = None

        def snap(i: int) -> Progress:  # the state before row i (only asked for rows that open a unit: rare)
            nonlocal dnames, nnames
            dnames = dnames if dnames is not None else list(p.dev_ids)
            nnames = nnames if nnames is not None else list(p.node_ids)

            def nm(names: list[str], g: int) -> str | None:
                return names[g] if 0 <= g < len(names) else None

            nt = node_top0 if i == 0 else (float(n_t1[i - 1]), int(n_src[i - 1]), float(n_t2[i - 1]))
            if d_t1 is None:
                dt = dev_top0  # not tracked once several nodes are seen
            else:
                dt = dev_top0 if i == 0 else (float(d_t1[i - 1]), int(d_src[i - 1]), float(d_t2[i - 1]))
            return Progress(float(before[i]), (dt[0], nm(dnames, dt[1]), dt[2]), (nt[0], nm(nnames, nt[1]), nt[2]),
                            nm(nnames, first_node), multi_before or i > first_other)

        p.node_top = (float(n_t1[-1]), int(n_src[-1]), float(n_t2[-1]))
        if d_t1 is not None:
            p.dev_top = (float(d_t1[-1]), int(d_src[-1]), float(d_t2[-1]))
        p.max_ts = float(basis[-1])
        return ahead, before, snap

    def _confirm_rows(self, p: _Partition, ts: np.ndarray, gid: np.ndarray, nid: np.ndarray, first_other: int,
                      multi_before: bool) -> tuple[np.ndarray, np.ndarray]:
        """`_confirmed` row by row, for a batch with rows ahead of the confirmed time. A row ahead is kept out of
        the trackers (a letter) unless rows of other sources, also ahead, agree with it within max_clock_skew_s
        (at least half of the partition's other active sources, one at least): then it is a jump they all make, and
        the batch's rows it agrees with are taken too. A tracker's top more than max_clock_skew_s above its second
        (a bad row that came first, when nothing could vouch) is dropped, and this batch's rows that far ahead are
        letters. Returns (ahead, per row after it: node top, its node, node second, device top, its device, device
        second)."""
        skew = self.cfg.max_clock_skew_s
        forced = np.zeros(len(ts), dtype=bool)
        pend0 = (dict(p.pending_node), dict(p.pending_dev))
        unvouched0 = p.unvouched
        for _ in range(3):  # a jump accepted late in the batch takes its earlier rows along: run again with them
            p.pending_node, p.pending_dev, p.unvouched = dict(pend0[0]), dict(pend0[1]), unvouched0
            ahead, out, agreed = self._confirm_pass(p, ts, gid, nid, first_other, multi_before, forced)
            if not agreed:
                break
            take = ahead & ~forced
            close = np.zeros(len(ts), dtype=bool)
            for t in agreed:
                close |= np.abs(ts - t) <= skew
            take &= close
            if not take.any():
                break
            forced |= take
        for pend, conf in ((p.pending_node, out[-1, 2]), (p.pending_dev, out[-1, 5])):  # caught up with: forget
            for k in [k for k, pt in pend.items() if pt <= conf + skew]:
                del pend[k]
        return ahead, out

    def _confirm_pass(self, p: _Partition, ts: np.ndarray, gid: np.ndarray, nid: np.ndarray, first_other: int,
                      multi_before: bool, forced: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
        n = len(ts)
        skew = self.cfg.max_clock_skew_s
        nt1, ng1, nt2 = p.node_top
        dt1, dg1, dt2 = p.dev_top
        ahead = np.zeros(n, dtype=bool)
        out = np.empty((n, 6))
        agreed: list[float] = []
        # Sources active within the lateness horizon (devices by their newest row; nodes through their devices):
        # a jump is taken when at least half of them (one at least) besides the row's own agree with it.
        nd_ = len(p.dev_ids)
        ref = max(nt2 if nt2 > -math.inf else -math.inf, dt2 if dt2 > -math.inf else -math.inf)
        recent = (p.dev_key[:nd_] & _TS_MASK) >= (ref - self.cfg.allowed_lateness_s) * 1000.0
        n_devs = max(1, int(recent.sum()))
        n_nodes = max(1, len(set(p.dev_node[:nd_][recent].tolist())))
        pend_n, pend_d = p.pending_node, p.pending_dev
        fl = forced.tolist()
        # a top nothing vouched for: set while there was no confirmed time to check it against
        n_unvouched, d_unvouched = p.unvouched
        for i, (t, g, nd) in enumerate(zip(ts.tolist(), gid.tolist(), nid.tolist(), strict=True)):
            multi = multi_before or i >= first_other
            conf, src, pend, n_src = (nt2, nd, pend_n, n_nodes) if multi else (dt2, g, pend_d, n_devs)
            if conf > -math.inf and not (n_unvouched if multi else d_unvouched):
                conf = nt1 if multi else dt1  # the vouched top: see _confirmed
            vouched = conf > -math.inf or fl[i]
            if conf > -math.inf and t > conf + skew and not fl[i]:
                need = max(1, n_src // 2)
                agree = sum(1 for s_, pt in pend.items() if s_ != src and abs(pt - t) <= skew)
                pend[src] = t
                if agree < need:
                    ahead[i] = True
                    out[i] = (nt1, ng1, nt2, dt1, dg1, dt2)
                    continue
                agreed.append(t)
            if t > nt1:
                n_unvouched = not vouched
            nt1, ng1, nt2 = push_top2(nt1, ng1, nt2, nd, t)
            if n_unvouched and nt2 > -math.inf and nt1 - nt2 > skew:  # the top is a bad clock that came first
                nt1, ng1, n_unvouched = nt2, -1, False
                ahead[: i + 1] |= ts[: i + 1] > nt2 + skew
            if not multi:
                if t > dt1:
                    d_unvouched = not vouched
                dt1, dg1, dt2 = push_top2(dt1, dg1, dt2, g, t)
                if d_unvouched and dt2 > -math.inf and dt1 - dt2 > skew:
                    dt1, dg1, d_unvouched = dt2, -1, False
                    ahead[: i + 1] |= ts[: i + 1] > dt2 + skew
            out[i] = (nt1, ng1, nt2, dt1, dg1, dt2)
        p.unvouched = (n_unvouched, d_unvouched)
        return ahead, out, agreed

    def _expire(self, p: _Partition) -> None:
        horizon = p.max_ts - self.cfg.watermark_lag_s - self.cfg.allowed_lateness_s
        for wv in [wv for wv in p.seen if (wv + 1) * self.cfg.window_s < horizon]:
            del p.seen[wv]
        if p.dup_last:
            p.dup_last = {k: v for k, v in p.dup_last.items() if (k[1] + 1) * self.cfg.window_s >= horizon}

    def _intervals(self, p: _Partition, b: Batch, idx: np.ndarray, by_dev: np.ndarray, gid: np.ndarray) -> np.ndarray:
        """interval_s if given; else the gap to the device's previous sample (capped); else (a device's first sample,
        or one out of order) the gap to its next sample in this batch (capped); else NaN: unknown, never a guess.
        `by_dev`: the kept rows grouped by device, in arrival order inside each device."""
        cfg = self.cfg
        gs, tss = gid[by_dev], b.ts[by_dev]
        first = np.concatenate(([True], gs[1:] != gs[:-1]))
        last = np.concatenate((first[1:], [True]))
        prev = np.concatenate(([np.nan], tss[:-1]))
        prev[first] = p.dev_last[gs[first]]
        p.dev_last[gs[last]] = tss[last]
        gap = tss - prev
        with np.errstate(invalid="ignore"):
            derived = np.where(gap > 0, np.minimum(gap, cfg.max_interval_s), np.nan)
            if np.isnan(derived).any():
                nxt = np.concatenate((tss[1:], [np.nan]))
                nxt[last] = np.nan
                gap_next = nxt - tss
                derived = np.where(np.isnan(derived) & (gap_next > 0), np.minimum(gap_next, cfg.max_interval_s),
                                   derived)
        out = np.empty(len(b.ts))
        out[by_dev] = derived
        given = b.interval[idx]
        return np.where(np.isnan(given), out[idx], given)

    def _accumulate(self, p: _Partition, b: Batch, idx: np.ndarray, w_all: np.ndarray, r_all: np.ndarray,
                    before_msg: np.ndarray, snap: Callable[[int], Progress], gid: np.ndarray, dt: np.ndarray) -> None:
        W, S = self.cfg.window_s, self.cfg.profile_buckets
        n = len(idx)
        ts, w, r, off = b.ts[idx], w_all[idx], r_all[idx], b.offset[idx]
        last_off = off if b.last_offset is None else b.last_offset[idx]
        il = idx.tolist()
        if b.ids_per_message:  # string ids are coded on each message's first row, then spread to its rows
            m0 = np.flatnonzero(np.concatenate(([True], b.offset[1:] != b.offset[:-1])))
            spread = np.repeat(np.arange(len(m0)), np.diff(np.append(m0, len(b.ts))))[idx]
            pick = m0.tolist()
        else:
            spread, pick = None, il

        def coded(values: list) -> tuple[np.ndarray, list]:
            code, uniq = _codes([values[i] for i in pick] if len(pick) != len(values) else values)
            return (code if spread is None else code[spread]), uniq

        rs = row_stats(b, idx, dt, coded, self.cfg.max_interval_s)
        per_row, act, known = rs.per_row, rs.act, rs.known

        wl, wl_names = coded(b.workload)
        wmin = int(w.min())
        span_w, span_r = int(w.max()) - wmin + 1, int(r.max()) + 1
        # Units (workload, window, revision) present in this batch, numbered 0.. in key order.
        uniq_u, urow = _dense(wl * (span_w * span_r) + (w - wmin) * span_r + r)
        n_units = len(uniq_u)
        # A unit's rows come in runs (a message is one node, one workload): sum each run, then runs into units.
        run0 = np.flatnonzero(np.concatenate(([True], urow[1:] != urow[:-1])))
        run_u = urow[run0]
        red = np.zeros((n_units, per_row.shape[1]))
        np.add.at(red, run_u, np.add.reduceat(per_row, run0, axis=0))
        last_u = np.zeros(n_units, dtype=np.int64)
        np.maximum.at(last_u, run_u, np.maximum.reduceat(last_off, run0))
        first_u = np.full(n_units, n, dtype=np.int64)
        np.minimum.at(first_u, run_u, run0)  # each unit's first row in arrival order
        count_u = np.bincount(urow, minlength=n_units)
        # (unit, device) pairs and their sub-window profiles, all units at once; pairs ordered by unit.
        ldev_u, ldev = _dense(gid[idx])
        pk_u, pinv = _dense(urow * len(ldev_u) + ldev)
        n_pairs = len(pk_u)
        pair_first = np.full(n_pairs, n, dtype=np.int64)
        np.minimum.at(pair_first, pinv, np.arange(n))
        pair_gid = ldev_u[pk_u % len(ldev_u)]
        pstarts = np.searchsorted(pk_u // len(ldev_u), np.arange(n_units + 1))
        k_bucket = np.clip(((ts - w * W) / (W / S)).astype(np.int64), 0, S - 1)
        flat = pinv * S + k_bucket
        psum, pcnt = profiles(rs, flat, n_pairs, S)
        add_u = unit_sums_layout(red, act, n_units)
        first_l, last_l, count_l = first_u.tolist(), last_u.tolist(), count_u.tolist()
        pstarts_l, pair_gid_l = pstarts.tolist(), pair_gid.tolist()
        for u in range(n_units):
            i0 = first_l[u]
            key = (wl_names[int(wl[i0])], int(w[i0]), int(r[i0]))
            unit = p.units.get(key)
            if unit is None:
                unit = p.units[key] = Unit(key[0], key[1], key[2], int(off[i0]), snap(int(before_msg[idx[i0]])), S)
            unit.l = max(unit.l, last_l[u])
            if unit.account is None:
                unit.account = b.account[il[i0]]
            if unit.job is None:
                unit.job = b.job[il[i0]]
            if unit.run_label is None:
                unit.run_label = b.run_label[il[i0]]
            unit.sums += add_u[u]
            unit.samples += count_l[u]
            p0, p1 = pstarts_l[u], pstarts_l[u + 1]
            if not unit.dev_index:  # a unit's first rows (every window starts so): all its devices at once
                loc = unit.add_devices(pair_gid_l[p0:p1], [il[i] for i in pair_first[p0:p1].tolist()], b,
                                       known[pair_first[p0:p1]])
            else:
                loc = list(map(unit.dev_index.get, pair_gid_l[p0:p1]))
            if None in loc:  # devices new to this unit: remember their node and model from their first row
                for j, li in enumerate(loc):
                    if li is None:
                        row = il[int(pair_first[p0 + j])]
                        loc[j] = unit.add_device(pair_gid_l[p0 + j], b.device[row], b.node[row], b.accelerator[row],
                                                 bool(known[pair_first[p0 + j]]))
            if loc == list(range(loc[0], loc[0] + len(loc))):  # the unit's devices in their first order
                loc = slice(loc[0], loc[0] + len(loc))
            unit.prof_sum[:, loc] += psum[:, p0:p1]
            unit.prof_cnt[:, loc] += pcnt[:, p0:p1]

    # --- emission --------------------------------------------------------------------------------------------
    def ready(self) -> list[WindowAggregate]:
        """Emit every unit the watermark has passed (its window's end for r = 0, its epoch's end for r > 0)."""
        out = []
        W = self.cfg.window_s
        for (topic, partition), p in self.parts.items():
            wm = p.max_ts - self.cfg.watermark_lag_s
            done = [k for k, u in p.units.items() if wm >= (u.w + u.r + 1) * W]
            for k in sorted(done, key=lambda k: (k[1], k[2], k[0])):
                out.append(self._emit(topic, partition, p, p.units.pop(k)))
        return out

    def drain(self) -> list[WindowAggregate]:
        """Emit everything still open (end of a finite input). Not for a stream that may be restarted: a replay
        would rebuild these windows with later rows and the same window ids."""
        out = []
        for (topic, partition), p in self.parts.items():
            for k in sorted(p.units, key=lambda k: (k[1], k[2], k[0])):
                out.append(self._emit(topic, partition, p, p.units[k]))
            p.units.clear()
        return out

    def _emit(self, topic: str, partition: int, p: _Partition, u: Unit) -> WindowAggregate:
        p.closed.append((u.f, u.l, u.first_ts_max, (u.w + u.r + 1) * self.cfg.window_s, (u.workload, u.w)))
        W = self.cfg.window_s
        start = u.w * W
        sums, node_names, basis, accelerators = u.encode()
        # model_construct: every field is built right here from typed state; validation would only cost time
        return WindowAggregate.model_construct(
            # the source topic too: two topics' partition 0 may both carry a workload (two exporters, a topic
            # migration), and partials sharing an id would be taken for replays of each other downstream
            window_id=content_id("win", u.workload, start, topic, partition, u.r),
            workload_id=u.workload,
            account_id=u.account,
            job_id=u.job,
            run_label=u.run_label,
            partition=partition,
            revision=u.r,
            window_start=start,
            window_end=start + W,
            sample_count=u.samples,
            device_count=len(u.dev_node),
            node_count=len(node_names),
            devices=sorted(u.dev_name),
            nodes=node_names,
            device_seconds=u.device_seconds,
            flop=float(u.flop[0]),
            flop_low=float(u.flop[1]),
            flop_high=float(u.flop[2]),
            basis=basis,  # type: ignore[arg-type]
            accelerators=dict(accelerators),
            unknown_accelerators=sorted(u.unknown),
            sums=sums,
            missing_fields=u.missing_fields(),
            offsets={f"{topic}:{partition}": [u.f, u.l]},
        )
