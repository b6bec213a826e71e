"""Vectorised checks over decoded rows: sentinels -> NaN, ranges per field, clocks, required ids.

A DCGM blank marker ("not supported"), matched exactly, is not an error: it becomes NaN (unknown). An out-of-range
reading (absurd magnitudes included: bounds per field in schemas.telemetry.MAX_VALUES), a timestamp before 2000,
more than MAX_FUTURE_SKEW_S ahead of the reference clock or more than `max_clock_skew_s` ahead of its message's
arrival (the Kafka timestamp, when known), a row without device / node / workload, or an id too long to travel
in a window, is a bad row; it is dead-lettered on its own and the rest of its message is kept.
"""

from __future__ import annotations

import numpy as np

from pipeline.ingest.columns import Rows
from schemas.telemetry import (
    BYTE_FIELDS,
    MAX_FUTURE_SKEW_S,
    MAX_GPU_INDEX,
    MAX_ID_CHARS,
    MAX_VALUES,
    METRIC_FIELDS,
    SENTINELS_ALL,
    SENTINELS_NON_BYTE,
)

_MIN_TS = 946_684_800.0  # 2000-01-01, as TelemetrySample
_UPPER = np.array([MAX_VALUES[f] for f in METRIC_FIELDS])
_IS_BYTE = np.array([f in BYTE_FIELDS for f in METRIC_FIELDS])
_FIELDS = np.array(METRIC_FIELDS)
_SMALLEST_SENTINEL = min(SENTINELS_NON_BYTE)
#: id columns of Rows and their wire names (checked for length)
_ID_COLUMNS = (("device", "device"), ("node", "node"), ("workload", "workload_id"), ("account", "account_id"),
               ("accelerator", "accelerator"), ("job", "job_id"), ("run_label", "run_label"))


def sentinels_to_nan(metrics: np.ndarray) -> int:
    """Replace DCGM blank markers by NaN in place (same rule as schemas.telemetry.is_sentinel); returns the count.
    Exact matches only: 1e300 is not "not supported", it is out of range."""
    if not np.fmax.reduce(metrics, axis=None, initial=-np.inf) >= _SMALLEST_SENTINEL:  # one pass, NaN ignored
        return 0
    s = np.isin(metrics, SENTINELS_ALL) | (~_IS_BYTE & np.isin(metrics, SENTINELS_NON_BYTE))
    n = int(s.sum())
    if n:
        metrics[s] = np.nan
    return n


def _long_ids(rows: Rows) -> np.ndarray | None:
    """Rows with an id over MAX_ID_CHARS characters (None: none). For rows of columnar messages the ids but the
    device are the message's: checked once per message."""
    n = len(rows)
    starts = None
    if rows.ids_per_message and n:
        starts = np.flatnonzero(np.concatenate(([True], rows.msg[1:] != rows.msg[:-1]))).tolist()
    bad = None
    for name, _ in _ID_COLUMNS:
        col = getattr(rows, name)
        if name == "device" and starts is not None:
            continue  # a columnar message's devices: checked when new to the partition (WindowAggregator.add)
        vals = col if starts is None else [col[i] for i in starts]
        if max(map(len, filter(None, vals)), default=0) > MAX_ID_CHARS:
            m = np.fromiter((v is not None and len(v) > MAX_ID_CHARS for v in col), dtype=bool, count=n)
            bad = m if bad is None else bad | m
    return bad


def _bad_gpu_index(rows: Rows) -> np.ndarray | None:
    if rows.gpu_index.count(None) == len(rows.gpu_index):  # the usual case: not reported
        return None
    uniq = set(rows.gpu_index)
    uniq.discard(None)
    if not uniq or all(0 <= g < MAX_GPU_INDEX for g in uniq):
        return None
    return np.fromiter((g is not None and not 0 <= g < MAX_GPU_INDEX for g in rows.gpu_index), dtype=bool,
                       count=len(rows))


def validate_rows(rows: Rows, now: float, arrival: np.ndarray | None = None, max_clock_skew_s: float = 300.0,
                  max_message_len: int | None = None) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Check all rows; returns (ok mask, [(row, reason, detail)] for the bad ones). Sentinels become NaN in place.
    `arrival`: per row, its message's arrival time (NaN: unknown); rows further ahead of it than
    `max_clock_skew_s` are `clock_ahead`. `max_message_len`: the longest message's bytes, when known (no id can be
    longer: the id-length check is skipped when that is within MAX_ID_CHARS)."""
    sentinels_to_nan(rows.metrics)
    m = rows.metrics
    with np.errstate(invalid="ignore"):
        bad_range = (m < 0) | (m > _UPPER)  # inf too; NaN = missing
    ts = rows.ts
    with np.errstate(invalid="ignore"):
        bad_ts = ~(ts >= _MIN_TS)  # NaN too
        future = ts > now + MAX_FUTURE_SKEW_S
        ahead = ts > arrival + max_clock_skew_s if arrival is not None else np.zeros(len(ts), dtype=bool)
    if (None in rows.device or None in rows.node or None in rows.workload
            or "" in rows.device or "" in rows.node or "" in rows.workload):  # an empty id is no id
        missing = np.fromiter(
            (not d or not n or not w for d, n, w in zip(rows.device, rows.node, rows.workload, strict=True)),
            dtype=bool, count=len(rows),
        )
    else:  # the usual case, checked by C-level list scans
        missing = np.zeros(len(rows), dtype=bool)
    with np.errstate(invalid="ignore"):
        bad_interval = ~((rows.interval > 0) & (rows.interval <= 3600)) & ~np.isnan(rows.interval)
    any_range = bad_range.any(axis=1)
    long_ids = None if max_message_len is not None and max_message_len <= MAX_ID_CHARS else _long_ids(rows)
    bad_gpu = _bad_gpu_index(rows)
    ok = ~(any_range | bad_ts | future | ahead | missing | bad_interval)
    if long_ids is not None:
        ok &= ~long_ids
    if bad_gpu is not None:
        ok &= ~bad_gpu
    problems: list[tuple[int, str, str]] = []
    for i in np.flatnonzero(~ok).tolist():
        if missing[i]:
            problems.append((i, "missing_id", "device, node and workload are required (labels or inventory)"))
        elif long_ids is not None and long_ids[i]:
            problems.append((i, "out_of_range", f"an id is longer than {MAX_ID_CHARS} characters"))
        elif bad_ts[i]:
            problems.append((i, "bad_timestamp", f"timestamp {ts[i]} is before 2000-01-01 or not a number"))
        elif future[i]:
            problems.append((i, "future_timestamp", f"timestamp {ts[i]} is more than {MAX_FUTURE_SKEW_S:.0f} s "
                                                    f"ahead of {now}"))
        elif ahead[i]:
            problems.append((i, "clock_ahead", f"timestamp {ts[i]} is {ts[i] - arrival[i]:.0f} s ahead of its "
                                               f"arrival {arrival[i]} (bound {max_clock_skew_s:.0f} s)"))
        elif bad_interval[i]:
            problems.append((i, "out_of_range", f"interval_s {rows.interval[i]} not in (0, 3600]"))
        elif bad_gpu is not None and bad_gpu[i]:
            problems.append((i, "out_of_range", f"gpu_index {rows.gpu_index[i]} not in [0, {MAX_GPU_INDEX})"))
        else:
            j = int(np.flatnonzero(bad_range[i])[0])
            problems.append((i, "out_of_range", f"{_FIELDS[j]} = {m[i, j]} outside [0, {_UPPER[j]:g}]"))
    return ok, problems
