"""Vectorised checks over decoded rows: sentinels -> NaN, ranges per field kind, clock, required ids.

A sentinel ("not supported") is not an error: it becomes NaN (unknown). An out-of-range reading, a timestamp
before 2000 or more than MAX_FUTURE_SKEW_S ahead of the reference clock, or a row without device / node / workload
is a bad row; it is dead-lettered on its own and the rest of its message is kept.
"""

from __future__ import annotations

import numpy as np

from pipeline.ingest.columns import Rows
from schemas.telemetry import (
    _FP64_BLANK,
    _INT32_BLANK,
    _INT64_BLANK,
    BYTE_FIELDS,
    FRACTION_FIELDS,
    MAX_FUTURE_SKEW_S,
    METRIC_FIELDS,
    PERCENT_FIELDS,
)

_MIN_TS = 946_684_800.0  # 2000-01-01, as TelemetrySample
_UPPER = np.array(
    [1.0 if f in FRACTION_FIELDS else 100.0 if f in PERCENT_FIELDS else 5000.0 if f == "power_w" else np.inf
     for f in METRIC_FIELDS]
)
_IS_BYTE = np.array([f in BYTE_FIELDS for f in METRIC_FIELDS])
_FIELDS = np.array(METRIC_FIELDS)


def sentinels_to_nan(metrics: np.ndarray) -> int:
    """Replace DCGM blank markers by NaN in place (same rule as schemas.telemetry.is_sentinel); returns the count."""
    with np.errstate(invalid="ignore"):
        s = (metrics >= _INT64_BLANK) | (metrics == _FP64_BLANK)
        s |= ~_IS_BYTE & (((metrics >= _INT32_BLANK) & (metrics <= 0x7FFFFFFF)) | (metrics >= _FP64_BLANK))
    n = int(s.sum())
    if n:
        metrics[s] = np.nan
    return n


def validate_rows(rows: Rows, now: float) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Check all rows; returns (ok mask, [(row, reason, detail)] for the bad ones). Sentinels become NaN in place."""
    sentinels_to_nan(rows.metrics)
    m = rows.metrics
    with np.errstate(invalid="ignore"):
        bad_range = (m < 0) | (m > _UPPER) | np.isinf(m)
    ts = rows.ts
    with np.errstate(invalid="ignore"):
        bad_ts = ~(ts >= _MIN_TS)  # NaN too
        future = ts > now + MAX_FUTURE_SKEW_S
    if None in rows.device or None in rows.node or None in rows.workload:
        missing = np.fromiter(
            ((d is None) or (n is None) or (w is None) for d, n, w in zip(rows.device, rows.node, rows.workload,
                                                                           strict=True)),
            dtype=bool, count=len(rows),
        )
    else:  # the usual case, checked by C-level list scans
        missing = np.zeros(len(rows), dtype=bool)
    bad_interval = (rows.interval <= 0) | (rows.interval > 3600)
    any_range = bad_range.any(axis=1)
    ok = ~(any_range | bad_ts | future | missing | bad_interval)
    problems: list[tuple[int, str, str]] = []
    for i in np.flatnonzero(~ok).tolist():
        if missing[i]:
            problems.append((i, "missing_id", "device, node and workload are required (labels or inventory)"))
        elif bad_ts[i]:
            problems.append((i, "bad_timestamp", f"timestamp {ts[i]} is before 2000-01-01 or not a number"))
        elif future[i]:
            problems.append((i, "future_timestamp", f"timestamp {ts[i]} is more than {MAX_FUTURE_SKEW_S:.0f} s "
                                                    f"ahead of {now}"))
        elif bad_interval[i]:
            problems.append((i, "out_of_range", f"interval_s {rows.interval[i]} not in (0, 3600]"))
        else:
            j = int(np.flatnonzero(bad_range[i])[0])
            problems.append((i, "out_of_range", f"{_FIELDS[j]} = {m[i, j]} outside [0, {_UPPER[j]}]"))
    return ok, problems
