"""The pure windowing core: valid rows of one Kafka partition -> partial window aggregates per workload.

Event-time tumbling windows of `window_s`, aligned to epoch multiples. Per partition the watermark is the largest
event time seen minus `watermark_lag_s`. Every row is assigned, from the watermark *before* it, to a unit
(workload, window w, revision r):

- r = 0 while window w is still open (watermark < its end); the unit is emitted when the watermark passes the end.
- late rows (window already closed) go to r = (index of the window epoch the watermark is in) - w >= 1, a
  CORRECTION that carries only the late rows' additive contribution; it is emitted when the watermark passes the
  end of that epoch. Summing every revision of a window gives the totals of an all-in-order run.
- rows whose window ended more than `allowed_lateness_s` before the watermark are returned as too late (DLQ).

Because the assignment depends only on the partition's message order and the watermark, a replay from a safe
offset with the watermark recorded there rebuilds identical units, hence identical window ids (see
`commit_points`). Duplicated (device, ts) rows count once (dedup state per window, kept until it expires).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from detectors.catalog import resolve
from detectors.compute import BASIS_NAMES, estimate_flop
from schemas.ids import content_id
from schemas.telemetry import METRIC_FIELDS
from schemas.windows import WindowAggregate

DERIVED_FIELDS = ("util_frac", "power_frac", "fb_frac")
#: Every per-sample statistic kept in `sums` (raw DCGM fields plus fractions of the device's nominal capacity).
STAT_FIELDS = METRIC_FIELDS + DERIVED_FIELDS
#: Metrics whose sub-window profiles travel for cross-device / cross-node synchrony.
SYNC_FIELDS = ("tensor_active", "util_frac", "power_frac")
_COL = {f: i for i, f in enumerate(STAT_FIELDS)}
_SYNC_COLS = [_COL[f] for f in SYNC_FIELDS]
_BASIS_KEYS = ("none", "utilisation_power", "tensor_active")  # index = detectors.compute basis code
_NO_EPOCH = -(2**40)


@dataclass(frozen=True, slots=True)
class WindowConfig:
    window_s: float = 60.0
    watermark_lag_s: float = 30.0
    allowed_lateness_s: float = 3600.0
    #: sub-buckets per window for the synchrony profiles (12 x 5 s at the default window)
    profile_buckets: int = 12
    #: interval of a sample without interval_s: gap to the device's previous sample, capped here ...
    max_interval_s: float = 60.0
    #: ... or this for a device's first sample (dcgm-exporter's default collection interval)
    default_interval_s: float = 30.0


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


@dataclass(slots=True)
class AddResult:
    too_late: np.ndarray  # row indices into the batch
    duplicates: int


@cache
def _device_params(accelerator: str | None, precision: str | None) -> tuple[float, float, float, float, float]:
    """(peak point, low, high, TDP W, memory MiB); NaN where the catalog does not know."""
    acc = resolve(accelerator)
    if acc is None:
        return (math.nan,) * 5
    if precision is not None:
        p = acc.peak(precision)
        lo = hi = p
    else:
        p = acc.peak(None)
        lo, hi = acc.low_precision_band
    tdp = acc.tdp_w if acc.tdp_w else math.nan
    mem = acc.memory_gib * 1024.0 if acc.memory_gib else math.nan
    return p, lo, hi, tdp, mem


class _Unit:
    """State of one (workload, window, revision) on one partition: additive sums plus per-device profiles."""

    __slots__ = ("account", "basis", "dev_acc", "dev_index", "dev_node", "device_seconds", "f", "first_ts_max",
                 "flop", "job", "l", "prof_cnt", "prof_sum", "r", "run_label", "samples", "stats", "unknown", "w",
                 "workload")

    def __init__(self, workload: str, w: int, r: int, f: int, first_ts_max: float, buckets: int) -> None:
        self.workload, self.w, self.r = workload, w, r
        self.f = self.l = f
        self.first_ts_max = first_ts_max  # partition's max event time before the message of the first row
        self.account = self.job = self.run_label = None
        self.samples = 0
        self.flop = np.zeros(3)
        self.basis = np.zeros(3, dtype=np.int64)
        self.device_seconds = 0.0
        self.stats = np.zeros((4, len(STAT_FIELDS)))  # sum v*dt, sum v^2*dt, sum dt (present), count
        self.dev_index: dict[str, int] = {}
        self.dev_node: list[str] = []
        self.dev_acc: list[str | None] = []
        self.prof_sum = np.zeros((len(SYNC_FIELDS), 8, buckets))
        self.prof_cnt = np.zeros((len(SYNC_FIELDS), 8, buckets))
        self.unknown: set[str] = set()

    def grow(self, n: int) -> None:
        cap = self.prof_sum.shape[1]
        if n > cap:
            new = max(n, 2 * cap)
            pad = ((0, 0), (0, new - cap), (0, 0))
            self.prof_sum = np.pad(self.prof_sum, pad)
            self.prof_cnt = np.pad(self.prof_cnt, pad)


@dataclass(slots=True)
class _Partition:
    max_ts: float = -math.inf
    next_offset: int | None = None
    units: dict[tuple[str, int, int], _Unit] = field(default_factory=dict)
    closed: list[tuple[int, int, float]] = field(default_factory=list)  # (first, last, first_ts_max) of emitted
    seen: dict[int, np.ndarray] = field(default_factory=dict)  # window -> sorted dedup keys
    last_ts: dict[str, float] = field(default_factory=dict)  # device -> previous event time


def _profile_var(s: np.ndarray, c: np.ndarray) -> tuple[float, int]:
    """Sum over rows of the population variance of each row's non-empty bucket means; rows with >= 2 buckets."""
    have = c > 0
    nb = have.sum(axis=1)
    use = nb >= 2
    if not use.any():
        return 0.0, 0
    mean_k = np.divide(s, c, out=np.zeros_like(s), where=have)
    mu = mean_k.sum(axis=1) / np.maximum(nb, 1)
    var = (np.where(have, (mean_k - mu[:, None]) ** 2, 0.0)).sum(axis=1) / np.maximum(nb, 1)
    return float(var[use].sum()), int(use.sum())


class WindowAggregator:
    """Partial window aggregates over many partitions. Pure: no Kafka, no clock."""

    def __init__(self, cfg: WindowConfig | None = None) -> None:
        self.cfg = cfg or WindowConfig()
        self.parts: dict[tuple[str, int], _Partition] = {}
        self._dev_ids: dict[str, int] = {}

    # --- state across restarts -------------------------------------------------------------------------------
    def restore(self, topic: str, partition: int, max_ts: float) -> None:
        """Start a partition replayed from a commit point with the max event time recorded there."""
        self.parts[(topic, partition)] = _Partition(max_ts=max_ts)

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

    def commit_points(self) -> dict[tuple[str, int], tuple[int, float]]:
        """Per partition: (offset safe to commit, max event time before it).

        Safe = no unit that is still open has a row below it, and no emitted unit straddles it (has rows on both
        sides). A restart replays from there with that max event time: every unit with rows at or above it is
        rebuilt whole, so re-emitted windows are identical (same window_id) and nothing is lost.
        """
        out = {}
        for key, p in self.parts.items():
            if p.next_offset is None:
                continue
            cands = [(u.f, u.first_ts_max) for u in p.units.values()]
            off, mts = min(cands) if cands else (p.next_offset, p.max_ts)
            moved = True
            while moved:
                moved = False
                for f, last, fm in p.closed:
                    if f < off <= last:
                        off, mts, moved = f, fm, True
            p.closed = [c for c in p.closed if c[1] >= off]
            out[key] = (off, mts)
        return out

    def open_units(self) -> int:
        return sum(len(p.units) for p in self.parts.values())

    # --- the hot path ----------------------------------------------------------------------------------------
    def add(self, topic: str, partition: int, b: Batch) -> AddResult:
        cfg, W = self.cfg, self.cfg.window_s
        p = self.parts.setdefault((topic, partition), _Partition())
        n = len(b.ts)
        if n == 0:
            return AddResult(np.zeros(0, dtype=np.int64), 0)
        ts = b.ts
        cm = np.maximum.accumulate(ts)
        before = np.maximum(np.concatenate(([-math.inf], cm[:-1])), p.max_ts)
        msg_start = np.concatenate(([True], b.offset[1:] != b.offset[:-1]))
        before_msg = before[np.flatnonzero(msg_start)][np.cumsum(msg_start) - 1]
        wm = before - cfg.watermark_lag_s
        p.max_ts = max(p.max_ts, float(cm[-1]))
        w = np.floor(ts / W).astype(np.int64)
        epoch = np.where(np.isfinite(wm), np.floor(np.where(np.isfinite(wm), wm, 0.0) / W), _NO_EPOCH).astype(np.int64)
        r = np.maximum(epoch - w, 0)
        too_late = (wm - (w + 1) * W) > cfg.allowed_lateness_s

        # Duplicates of (device, ts): within the batch, then against the window's earlier rows.
        ids = self._dev_ids
        g = [ids.get(d) for d in b.device]
        if None in g:
            g = [ids.setdefault(d, len(ids)) for d in b.device]
        gid = np.array(g, dtype=np.int64)
        keys = (gid << 41) | np.round(ts * 1000).astype(np.int64)
        dup = np.ones(n, dtype=bool)
        dup[np.unique(keys, return_index=True)[1]] = False
        dup |= too_late
        for wv in np.unique(w[~dup]).tolist():
            sel = np.flatnonzero((w == wv) & ~dup)
            k = keys[sel]
            old = p.seen.get(wv)
            if old is not None:
                hit = np.isin(k, old, assume_unique=False)
                dup[sel[hit]] = True
                k = k[~hit]
                p.seen[wv] = np.union1d(old, k)
            else:
                p.seen[wv] = np.unique(k)
        duplicates = int((dup & ~too_late).sum())
        keep = np.flatnonzero(~dup)
        self._expire(p)
        if len(keep):
            self._accumulate(p, b, keep, w, r, before_msg, gid)
        return AddResult(np.flatnonzero(too_late), duplicates)

    def _expire(self, p: _Partition) -> None:
        horizon = p.max_ts - self.cfg.watermark_lag_s - self.cfg.allowed_lateness_s
        for wv in [wv for wv in p.seen if (wv + 1) * self.cfg.window_s < horizon]:
            del p.seen[wv]

    def _intervals(self, p: _Partition, b: Batch, idx: np.ndarray, gid: np.ndarray) -> np.ndarray:
        """interval_s if given; else the gap to the device's previous sample (capped); else the default."""
        cfg = self.cfg
        ts, g = b.ts[idx], gid[idx]
        order = np.lexsort((np.arange(len(idx)), g))
        gs, tss = g[order], ts[order]
        first = np.concatenate(([True], gs[1:] != gs[:-1]))
        prev = np.concatenate(([np.nan], tss[:-1]))
        firsts = np.flatnonzero(first)
        prev[firsts] = [p.last_ts.get(b.device[idx[order[i]]], math.nan) for i in firsts.tolist()]
        lasts = np.concatenate((firsts[1:] - 1, [len(gs) - 1]))
        for i in lasts.tolist():
            p.last_ts[b.device[idx[order[i]]]] = float(tss[i])
        gap = tss - prev
        with np.errstate(invalid="ignore"):
            derived = np.where(gap > 0, np.minimum(gap, cfg.max_interval_s), cfg.default_interval_s)
        out = np.empty(len(idx))
        out[order] = derived
        given = b.interval[idx]
        return np.where(np.isnan(given), out, given)

    def _accumulate(self, p: _Partition, b: Batch, idx: np.ndarray, w_all: np.ndarray, r_all: np.ndarray,
                    before_msg: np.ndarray, gid: np.ndarray) -> None:
        W, S = self.cfg.window_s, self.cfg.profile_buckets
        n = len(idx)
        dt = self._intervals(p, b, idx, gid)
        ts, w, r, off = b.ts[idx], w_all[idx], r_all[idx], b.offset[idx]
        last_off = off if b.last_offset is None else b.last_offset[idx]
        il = idx.tolist()
        whole = n == len(b.ts)
        acc = b.accelerator if whole else [b.accelerator[i] for i in il]
        prec = b.precision if whole else [b.precision[i] for i in il]
        codes: dict = {}
        if prec.count(None) == n:  # precision rarely reported: key by model alone
            code = np.array([codes.setdefault(a, len(codes)) for a in acc], dtype=np.int64)
            table = np.array([_device_params(a, None) for a in codes], dtype=np.float64).reshape(len(codes), 5)
        else:
            code = np.array([codes.setdefault(k, len(codes)) for k in zip(acc, prec, strict=True)], dtype=np.int64)
            table = np.array([_device_params(a, pr) for a, pr in codes], dtype=np.float64).reshape(len(codes), 5)
        params = table[code]
        known = ~np.isnan(params[:, 0])

        x = np.empty((n, len(STAT_FIELDS)))
        x[:, : len(METRIC_FIELDS)] = b.metrics[idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            x[:, _COL["util_frac"]] = x[:, _COL["gpu_util"]] / 100.0
            x[:, _COL["power_frac"]] = x[:, _COL["power_w"]] / params[:, 3]
            x[:, _COL["fb_frac"]] = x[:, _COL["fb_used_mib"]] / params[:, 4]
        activity = x[:, _COL["util_frac"]]
        for alt in ("gr_engine_active", "sm_active"):
            activity = np.where(np.isnan(activity), x[:, _COL[alt]], activity)
        fp, flo, fhi, basis = estimate_flop(dt, params[:, 0], params[:, 1], params[:, 2], x[:, _COL["tensor_active"]],
                                            activity, x[:, _COL["power_frac"]])
        basis = np.where(known, basis, 0)  # unknown model: kept, flagged, basis none
        present = ~np.isnan(x)
        xz = np.where(present, x, 0.0)
        # Only the statistics this batch carries (exporters send a fixed subset): fewer columns to reduce.
        act = np.flatnonzero(present.any(axis=0))
        m_act = len(act)
        per_row = np.empty((n, 4 * m_act + 7))
        xa, pa, dtc = xz[:, act], present[:, act], dt[:, None]
        np.multiply(xa, dtc, out=per_row[:, :m_act])
        np.multiply(per_row[:, :m_act], xa, out=per_row[:, m_act : 2 * m_act])
        np.multiply(pa, dtc, out=per_row[:, 2 * m_act : 3 * m_act])
        per_row[:, 3 * m_act : 4 * m_act] = pa
        tail = per_row[:, 4 * m_act :]
        tail[:, 0], tail[:, 1], tail[:, 2], tail[:, 3] = fp, flo, fhi, dt
        tail[:, 4:] = 0.0
        tail[np.arange(n), 4 + basis] = 1.0

        wl_codes: dict[str, int] = {}
        wls = b.workload if whole else [b.workload[i] for i in il]
        wl = np.array([wl_codes.setdefault(x, len(wl_codes)) for x in wls], dtype=np.int64)
        wmin = int(w.min())
        span_w, span_r = int(w.max()) - wmin + 1, int(r.max()) + 1
        ukey = (wl * span_w + (w - wmin)) * span_r + r
        # Units (workload, window, revision) present in this batch: one reduction per statistic over all of them.
        uniq_u, urow = np.unique(ukey, return_inverse=True)
        n_units = len(uniq_u)
        order = np.argsort(urow, kind="stable")
        starts = np.searchsorted(urow[order], np.arange(n_units))
        red = np.add.reduceat(per_row[order], starts, axis=0)
        last_u = np.maximum.reduceat(last_off[order], starts)
        first_u = order[starts]  # each unit's first row in arrival order (stable sort)
        count_u = np.diff(np.append(starts, n))
        # (unit, device) pairs and their sub-window profiles, all units at once.
        g = gid[idx]
        n_dev = int(g.max()) + 1
        upk, pair_first, pinv = np.unique(urow * n_dev + g, return_index=True, return_inverse=True)
        n_pairs = len(upk)
        pstarts = np.searchsorted(upk // n_dev, np.arange(n_units + 1))
        k_bucket = np.clip(((ts - w * W) / (W / S)).astype(np.int64), 0, S - 1)
        flat = pinv * S + k_bucket
        psum = np.zeros((len(SYNC_FIELDS), n_pairs, S))
        pcnt = np.zeros((len(SYNC_FIELDS), n_pairs, S))
        for si, col in enumerate(_SYNC_COLS):
            pres = present[:, col]
            if pres.any():
                psum[si] = np.bincount(flat[pres], xz[pres, col], minlength=n_pairs * S).reshape(n_pairs, S)
                pcnt[si] = np.bincount(flat[pres], minlength=n_pairs * S).reshape(n_pairs, S)
        wl_names = list(wl_codes)
        rows_orig = idx.tolist()
        pair_first_l = pair_first.tolist()
        for u in range(n_units):
            i0 = int(first_u[u])
            kk = int(uniq_u[u])
            key = (wl_names[kk // (span_w * span_r)], int(w[i0]), int(r[i0]))
            unit = p.units.get(key)
            if unit is None:
                unit = p.units[key] = _Unit(key[0], key[1], key[2], int(off[i0]), float(before_msg[idx[i0]]), S)
            unit.l = max(unit.l, int(last_u[u]))
            ri = rows_orig[i0]
            if unit.account is None:
                unit.account = b.account[ri]
            if unit.job is None:
                unit.job = b.job[ri]
            if unit.run_label is None:
                unit.run_label = b.run_label[ri]
            v = red[u]
            unit.stats[:, act] += v[: 4 * m_act].reshape(4, m_act)
            unit.flop += v[4 * m_act : 4 * m_act + 3]
            unit.device_seconds += float(v[4 * m_act + 3])
            unit.basis += v[4 * m_act + 4 :].astype(np.int64)
            unit.samples += int(count_u[u])
            p0, p1 = int(pstarts[u]), int(pstarts[u + 1])
            loc = []
            for j in range(p0, p1):
                kr = pair_first_l[j]
                row = rows_orig[kr]
                dev = b.device[row]
                li = unit.dev_index.get(dev)
                if li is None:
                    li = unit.dev_index[dev] = len(unit.dev_node)
                    unit.dev_node.append(b.node[row])
                    unit.dev_acc.append(b.accelerator[row])
                    if not known[kr]:
                        unit.unknown.add(b.accelerator[row] or "unknown")
                loc.append(li)
            unit.grow(len(unit.dev_node))
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

    def _emit(self, topic: str, partition: int, p: _Partition, u: _Unit) -> WindowAggregate:
        p.closed.append((u.f, u.l, u.first_ts_max))
        W = self.cfg.window_s
        start = u.w * W
        st = u.stats
        sums: dict[str, float] = {"samples": float(u.samples)}
        for j, name in enumerate(STAT_FIELDS):
            if st[3, j] > 0:
                sums[f"{name}.sum"] = float(st[0, j])
                sums[f"{name}.sumsq"] = float(st[1, j])
                sums[f"{name}.n"] = float(st[2, j])
                sums[f"{name}.count"] = float(st[3, j])
        for bi, bname in enumerate(_BASIS_KEYS):
            if u.basis[bi]:
                sums[f"basis.{bname}"] = float(u.basis[bi])
        nd = len(u.dev_node)
        node_names = sorted(set(u.dev_node))
        node_code = np.array([node_names.index(x) for x in u.dev_node]) if nd else np.zeros(0, dtype=np.int64)
        for si, name in enumerate(SYNC_FIELDS):
            s, c = u.prof_sum[si, :nd], u.prof_cnt[si, :nd]
            if not c.any():
                continue
            ps, pc = s.sum(axis=0), c.sum(axis=0)
            for k in np.flatnonzero(pc).tolist():
                sums[f"prof.{name}.{k}.sum"] = float(ps[k])
                sums[f"prof.{name}.{k}.n"] = float(pc[k])
            dv, dn = _profile_var(s, c)
            sums[f"{name}.dev_var.sum"], sums[f"{name}.dev_var.n"] = dv, float(dn)
            ns = np.zeros((len(node_names), s.shape[1]))
            nc = np.zeros_like(ns)
            np.add.at(ns, node_code, s)
            np.add.at(nc, node_code, c)
            nv, nn = _profile_var(ns, nc)
            sums[f"{name}.node_var.sum"], sums[f"{name}.node_var.n"] = nv, float(nn)
        present_basis = [BASIS_NAMES[i] for i in range(3) if u.basis[i]]
        basis = present_basis[0] if len(present_basis) == 1 else "mixed"
        accelerators: dict[str, int] = {}
        for a in u.dev_acc:
            accelerators[a or "unknown"] = accelerators.get(a or "unknown", 0) + 1
        # model_construct: every field is built right here from typed state; validation would only cost time
        return WindowAggregate.model_construct(
            window_id=content_id("win", u.workload, start, partition, u.r),
            workload_id=u.workload,
            account_id=u.account,
            job_id=u.job,
            run_label=u.run_label,
            partition=partition,
            revision=u.r,
            window_start=start,
            window_end=start + W,
            sample_count=u.samples,
            device_count=nd,
            node_count=len(node_names),
            devices=sorted(u.dev_index),
            nodes=node_names,
            device_seconds=u.device_seconds,
            flop=float(u.flop[0]),
            flop_low=float(u.flop[1]),
            flop_high=float(u.flop[2]),
            basis=basis,  # type: ignore[arg-type]
            accelerators=accelerators,
            unknown_accelerators=sorted(u.unknown),
            sums=sums,
            missing_fields=[f for j, f in enumerate(METRIC_FIELDS) if st[3, j] == 0],
            offsets={f"{topic}:{partition}": [u.f, u.l]},
        )
