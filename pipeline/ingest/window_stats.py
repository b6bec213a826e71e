"""The statistics of a window unit: per-row quantities (utilisation fractions, FLOP estimates, moments) and their
additive sums, and sub-window profiles for synchrony; a unit's `sums` are written by schemas/window_sums.py.

aggregate.py decides which rows go to which unit (windowing, dedup, watermark); this module decides what a unit
adds up and how it is written. Everything here is vectorised over a batch's rows; a unit's state is one vector.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from detectors.catalog import resolve
from detectors.compute import ACHIEVABLE_SHARE, BASIS_UNKNOWN_ACCELERATOR, estimate_flop, unknown_accelerator_peaks
from schemas.telemetry import METRIC_FIELDS
from schemas.window_sums import BASES, STAT_FIELDS, SYNC_FIELDS, write_sums

if TYPE_CHECKING:
    from pipeline.ingest.aggregate import Batch, Progress

# The statistics, their order and how `sums` is written are schemas/window_sums.py's; a unit keeps them as vectors.
_COL = {f: i for i, f in enumerate(STAT_FIELDS)}
_SYNC_COLS = [_COL[f] for f in SYNC_FIELDS]
_N_STATS = 4 * len(STAT_FIELDS)
#: + FLOP point/low/high, device-seconds, samples per basis code, samples whose interval was unknown
_N_SUMS = _N_STATS + 4 + len(BASES) + 1


@cache
def device_params(accelerator: str | None, precision: str | None
                  ) -> tuple[float, float, float, float, float, float, float]:
    """(peak point, low, high, TDP W, memory MiB, 1 if the catalog knows the part else 0, the part's achievable
    share of peak: the tensor basis's low end). An unknown (or absent) part gets the catalog-wide peaks (a wide band,
    never a zero), no TDP or memory (NaN) and the default share."""
    acc = resolve(accelerator)
    if acc is None:
        return (*unknown_accelerator_peaks(precision), math.nan, math.nan, 0.0, ACHIEVABLE_SHARE)
    if precision is not None:
        p = acc.peak(precision)
        lo = hi = p
    else:
        p = acc.peak(None)
        lo, hi = acc.low_precision_band
    tdp = acc.tdp_w if acc.tdp_w else math.nan
    mem = acc.memory_gib * 1024.0 if acc.memory_gib else math.nan
    return p, lo, hi, tdp, mem, 1.0, acc.achievable_share


class Unit:
    """State of one (workload, window, revision) on one partition: additive sums plus per-device profiles."""

    __slots__ = ("account", "basis", "dev_acc", "dev_index", "dev_name", "dev_node", "f", "first_ts_max", "flop",
                 "job", "l", "prof_cnt", "prof_sum", "r", "run_label", "samples", "stats", "sums", "unknown", "w",
                 "workload")

    def __init__(self, workload: str, w: int, r: int, f: int, first_ts_max: Progress, buckets: int) -> None:
        self.workload, self.w, self.r = workload, w, r
        self.f = self.l = f
        self.first_ts_max = first_ts_max  # partition's event-time state before the message of the first row
        self.account = self.job = self.run_label = None
        self.samples = 0
        # Every additive quantity in one vector, so that a batch adds to a unit in one operation; named views:
        self.sums = np.zeros(_N_SUMS)
        self.stats = self.sums[:_N_STATS].reshape(4, len(STAT_FIELDS))  # sum v*dt, sum v^2*dt, sum dt, count
        self.flop = self.sums[_N_STATS : _N_STATS + 3]  # point, low, high
        self.basis = self.sums[_N_STATS + 4 : _N_SUMS - 1]  # samples per basis code
        self.dev_index: dict[int, int] = {}  # the partition's device id -> row of the profiles
        self.dev_name: list[str] = []
        self.dev_node: list[str] = []
        self.dev_acc: list[str | None] = []
        self.prof_sum = np.zeros((len(SYNC_FIELDS), 8, buckets))
        self.prof_cnt = np.zeros((len(SYNC_FIELDS), 8, buckets))
        self.unknown: set[str] = set()

    def add_devices(self, gids: list[int], rows: list[int], b: Batch, known: np.ndarray) -> list[int]:
        """Devices of a unit that has none yet; `rows`: each one's first row in the batch."""
        k = len(gids)
        self.dev_index = dict(zip(gids, range(k), strict=True))
        self.dev_name = [b.device[i] for i in rows]
        self.dev_node = [b.node[i] for i in rows]
        self.dev_acc = [b.accelerator[i] for i in rows]
        if not known.all():
            self.unknown.update(self.dev_acc[j] or "unknown" for j in np.flatnonzero(~known).tolist())
        self._reserve(k)
        return list(range(k))

    def add_device(self, gid: int, name: str, node: str, accelerator: str | None, known: bool) -> int:
        li = self.dev_index[gid] = len(self.dev_name)
        self.dev_name.append(name)
        self.dev_node.append(node)
        self.dev_acc.append(accelerator)
        if not known:
            self.unknown.add(accelerator or "unknown")
        self._reserve(li + 1)
        return li

    def _reserve(self, n: int) -> None:
        """At least n profile rows, doubling (np.pad would cost more than the copy)."""
        cap = self.prof_sum.shape[1]
        if n > cap:
            new = max(n, 2 * cap)
            for name in ("prof_sum", "prof_cnt"):
                old = getattr(self, name)
                grown = np.zeros((old.shape[0], new, old.shape[2]))
                grown[:, :cap] = old
                setattr(self, name, grown)

    @property
    def device_seconds(self) -> float:
        return float(self.sums[_N_STATS + 3])

    def missing_fields(self) -> list[str]:
        """Raw fields no row of the unit carried."""
        return [f for j, f in enumerate(METRIC_FIELDS) if self.stats[3, j] == 0]

    def encode(self) -> tuple[dict[str, float], list[str], str, Counter]:
        """(sums, node names, FLOP basis, accelerator counts) as the window aggregate carries them."""
        u = self
        nd = len(u.dev_node)
        node_index = {x: i for i, x in enumerate(sorted(set(u.dev_node)))}
        s, c = u.prof_sum[:, :nd], u.prof_cnt[:, :nd]
        have = np.flatnonzero(c.any(axis=(1, 2))).tolist()
        basis_l = u.basis.tolist()
        if have:
            ps, pc = s.sum(axis=1).tolist(), c.sum(axis=1).tolist()
            dv, dn = _profile_var(s, c)
            # per node: the devices' bucket sums added up (a one-hot product: nodes x devices)
            onehot = np.zeros((len(node_index), nd))
            onehot[list(map(node_index.__getitem__, u.dev_node)), np.arange(nd)] = 1.0
            nv, nn = _profile_var(np.matmul(onehot, s), np.matmul(onehot, c))
            spread = np.stack((dv, dn, nv, nn), axis=1).tolist()
            sums = write_sums(u.samples, u.stats.tolist(), basis_l, ps, pc, spread, float(u.sums[-1]))
        else:
            sums = write_sums(u.samples, u.stats.tolist(), basis_l, interval_unknown=float(u.sums[-1]))
        node_names = list(node_index)
        present_basis = [BASES[i] for i, n in enumerate(basis_l) if n]
        basis = present_basis[0] if len(present_basis) == 1 else "mixed"
        accelerators = Counter(u.dev_acc)
        if None in accelerators:
            accelerators["unknown"] = accelerators.get("unknown", 0) + accelerators.pop(None)
        return sums, node_names, basis, accelerators


def _profile_var(s: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per metric (axis 0): sum over rows (axis 1) of the population variance of each row's non-empty bucket means
    (axis 2), over rows with >= 2 buckets; and the number of such rows."""
    have = c > 0
    nb = have.sum(axis=2)
    m = np.divide(s, c, out=np.zeros_like(s), where=have)
    nb1 = np.maximum(nb, 1)
    mu = m.sum(axis=2) / nb1
    var = np.maximum(np.einsum("ijk,ijk->ij", m, m) / nb1 - mu * mu, 0.0)  # E[m^2] - E[m]^2, rounding clamped
    use = nb >= 2
    return (var * use).sum(axis=1), use.sum(axis=1)


class RowStats(NamedTuple):
    """A batch's selected rows as statistics: `per_row` holds, for the columns `act` the batch carries, sum v*dt,
    sum v^2*dt, sum dt and count, then FLOP point/low/high, dt, a one-hot basis code and 1 where the interval was
    unknown (see `unit_sums_layout`)."""

    per_row: np.ndarray
    act: np.ndarray
    known: np.ndarray  # the row's accelerator is in the catalog
    present: np.ndarray  # (rows, STAT_FIELDS): the value is there
    xz: np.ndarray  # the values, 0 where missing


def row_stats(b: Batch, idx: np.ndarray, dt: np.ndarray, coded: Callable[[list], tuple[np.ndarray, list]],
              unknown_dt_s: float) -> RowStats:
    """Statistics of rows `idx` of `b`, each weighted by its interval `dt`; `coded(column)` gives the rows' dense
    codes of a batch column and the distinct values (the caller knows when ids are constant per message).
    A NaN interval is unknown: the row counts 0 s everywhere but in the FLOP high, which takes `unknown_dt_s`."""
    n = len(idx)
    if b.precision.count(None) == len(b.precision):  # precision rarely reported: key by model alone
        code, uniq = coded(b.accelerator)
        table = np.array([device_params(a, None) for a in uniq], dtype=np.float64).reshape(len(uniq), 7)
    else:
        code, uniq = coded(list(zip(b.accelerator, b.precision, strict=True)))
        table = np.array([device_params(a, pr) for a, pr in uniq], dtype=np.float64).reshape(len(uniq), 7)
    params = table[code]
    known = params[:, 5] > 0
    no_dt = np.isnan(dt)
    any_no_dt = bool(no_dt.any())
    if any_no_dt:  # FLOP is linear in the interval: estimate at the longest, then zero the point and low
        dt_high, dt = np.where(no_dt, unknown_dt_s, dt), np.where(no_dt, 0.0, dt)
    else:
        dt_high = dt

    x = np.empty((n, len(STAT_FIELDS)))
    x[:, : len(METRIC_FIELDS)] = b.metrics[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        x[:, _COL["util_frac"]] = x[:, _COL["gpu_util"]] / 100.0
        x[:, _COL["power_frac"]] = x[:, _COL["power_w"]] / params[:, 3]
        x[:, _COL["fb_frac"]] = x[:, _COL["fb_used_mib"]] / params[:, 4]
    activity = x[:, _COL["util_frac"]]
    for alt in ("gr_engine_active", "sm_active"):
        activity = np.where(np.isnan(activity), x[:, _COL[alt]], activity)
    fp, flo, fhi, basis = estimate_flop(dt_high, params[:, 0], params[:, 1], params[:, 2],
                                        x[:, _COL["tensor_active"]], activity, x[:, _COL["power_frac"]],
                                        achievable_share=params[:, 6])
    if any_no_dt:
        fp, flo = np.where(no_dt, 0.0, fp), np.where(no_dt, 0.0, flo)
    basis = np.where(known, basis, BASIS_UNKNOWN_ACCELERATOR)  # unknown model: kept, flagged, its own wide band
    present = ~np.isnan(x)
    xz = np.where(present, x, 0.0)
    # Only the statistics this batch carries (exporters send a fixed subset): fewer columns to reduce.
    act = np.flatnonzero(present.any(axis=0))
    m_act = len(act)
    per_row = np.empty((n, 4 * m_act + 4 + len(BASES) + 1))
    xa, pa, dtc = xz[:, act], present[:, act], dt[:, None]
    np.multiply(xa, dtc, out=per_row[:, :m_act])
    np.multiply(per_row[:, :m_act], xa, out=per_row[:, m_act : 2 * m_act])
    np.multiply(pa, dtc, out=per_row[:, 2 * m_act : 3 * m_act])
    per_row[:, 3 * m_act : 4 * m_act] = pa
    tail = per_row[:, 4 * m_act :]
    tail[:, 0], tail[:, 1], tail[:, 2], tail[:, 3] = fp, flo, fhi, dt
    tail[:, 4:] = 0.0
    tail[np.arange(n), 4 + basis] = 1.0
    if any_no_dt:
        tail[:, -1] = no_dt
    return RowStats(per_row, act, known, present, xz)


def unit_sums_layout(red: np.ndarray, act: np.ndarray, n_units: int) -> np.ndarray:
    """Per-unit reductions of `RowStats.per_row` in a unit's `sums` layout (all statistics, not only the batch's)."""
    m_act = len(act)
    add_u = np.zeros((n_units, _N_SUMS))  # in the units' layout (all statistics, not only this batch's)
    add_u[:, :_N_STATS].reshape(n_units, 4, len(STAT_FIELDS))[:, :, act] = red[:, : 4 * m_act].reshape(
        n_units, 4, m_act)
    add_u[:, _N_STATS:] = red[:, 4 * m_act :]
    return add_u


def profiles(rs: RowStats, flat: np.ndarray, n_pairs: int, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-window sums and counts of the synchrony metrics per (unit, device) pair; `flat` = pair * buckets + k."""
    psum = np.zeros((len(SYNC_FIELDS), n_pairs, buckets))
    pcnt = np.zeros((len(SYNC_FIELDS), n_pairs, buckets))
    present, xz, S = rs.present, rs.xz, buckets
    for si, col in enumerate(_SYNC_COLS):
        pres = present[:, col]
        if pres.all():
            psum[si] = np.bincount(flat, xz[:, col], minlength=n_pairs * S).reshape(n_pairs, S)
            pcnt[si] = np.bincount(flat, minlength=n_pairs * S).reshape(n_pairs, S)
        elif pres.any():
            psum[si] = np.bincount(flat[pres], xz[pres, col], minlength=n_pairs * S).reshape(n_pairs, S)
            pcnt[si] = np.bincount(flat[pres], minlength=n_pairs * S).reshape(n_pairs, S)
    return psum, pcnt
