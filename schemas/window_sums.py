"""The layout of `WindowAggregate.sums`: the one place that names its keys, writes them (ingest) and reads them
back (detect). Neither side spells a key itself.

A window partial carries every statistic as an additive sum, so the partials of one workload-window (several
partitions, late-data corrections) merge by adding values key by key, and finished statistics (means, spreads,
synchrony) are computed only after the merge. Keys, each present only when non-zero:

- `samples`: rows in the partial; `samples.interval_unknown`: rows whose interval was neither sent nor derivable
  (counted 0 s in device-seconds, moments and the FLOP point and low, the longest interval in the FLOP high);
- `<stat>.sum`, `<stat>.sumsq`: sum of value x interval, of value^2 x interval (time-weighted moments);
- `<stat>.n`: seconds the field covered (sum of the intervals of the rows carrying it); `<stat>.count`: those rows;
- `basis.<basis>`: rows whose FLOP estimate rests on that basis (`BASES`);
- `prof.<sync>.<k>.sum`, `prof.<sync>.<k>.n`: sub-window bucket k of the window, the values of every device added
  up, and their rows;
- `<sync>.dev_var.sum`, `<sync>.dev_var.n`: over the devices with >= 2 non-empty buckets, the sum of the variance
  of each device's bucket means, and the number of such devices; `<sync>.node_var.*` the same per node (a node's
  devices' buckets added up).

`<stat>` is each of `STAT_FIELDS` (the raw telemetry fields, then fractions of the device's nominal capacity);
`<sync>` each of `SYNC_FIELDS`; k < `MAX_PROFILE_BUCKETS`. Keys that are not in this layout are ignored on read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal, NamedTuple, get_args

from schemas.telemetry import METRIC_FIELDS

#: Quantities ingest derives per sample: utilisation as a fraction, power / TDP, memory used / memory.
DERIVED_FIELDS = ("util_frac", "power_frac", "fb_frac")
#: Every per-sample statistic kept in `sums`, in this order (raw fields first, as `METRIC_FIELDS`).
STAT_FIELDS: tuple[str, ...] = METRIC_FIELDS + DERIVED_FIELDS
#: Statistics whose sub-window profiles travel, for cross-device / cross-node synchrony.
SYNC_FIELDS = ("tensor_active", "util_frac", "power_frac")
#: Most sub-window buckets a window may have (profile keys beyond are not read).
MAX_PROFILE_BUCKETS = 1024

#: What a sample's FLOP estimate rests on; the index is the basis code of detectors/compute.py.
#: `unknown_accelerator`: the part is not in the catalog (or not reported), the band spans the catalog's parts.
SampleBasis = Literal["none", "utilisation_power", "tensor_active", "unknown_accelerator"]
BASES: tuple[str, ...] = get_args(SampleBasis)
#: A window's basis: its samples' one basis, or `mixed`.
ComputeBasis = Literal[SampleBasis, "mixed"]

SAMPLES_KEY = "samples"
INTERVAL_UNKNOWN_KEY = "samples.interval_unknown"
#: per STAT_FIELDS column: (sum, sumsq, n, count) keys
STAT_KEYS: tuple[tuple[str, str, str, str], ...] = tuple(
    (f"{f}.sum", f"{f}.sumsq", f"{f}.n", f"{f}.count") for f in STAT_FIELDS)
#: per BASES code
BASIS_KEYS: tuple[str, ...] = tuple(f"basis.{b}" for b in BASES)
#: per SYNC_FIELDS column: (device-spread sum, its n, node-spread sum, its n) keys
SPREAD_KEYS: tuple[tuple[str, str, str, str], ...] = tuple(
    (f"{f}.dev_var.sum", f"{f}.dev_var.n", f"{f}.node_var.sum", f"{f}.node_var.n") for f in SYNC_FIELDS)


@cache
def profile_keys(buckets: int) -> tuple[tuple[tuple[str, str], ...], ...]:
    """Per SYNC_FIELDS column, per bucket k < `buckets`: the (sum, n) keys."""
    if not 0 < buckets <= MAX_PROFILE_BUCKETS:
        raise ValueError(f"profile buckets must be 1..{MAX_PROFILE_BUCKETS}, not {buckets}")
    return tuple(tuple((f"prof.{f}.{k}.sum", f"prof.{f}.{k}.n") for k in range(buckets)) for f in SYNC_FIELDS)


# --- writing --------------------------------------------------------------------------------------------------------
def write_sums(samples: float, stats: Sequence[Sequence[float]], basis: Sequence[float],
               prof_sum: Sequence[Sequence[float]] | None = None, prof_n: Sequence[Sequence[float]] | None = None,
               spread: Sequence[Sequence[float]] | None = None, interval_unknown: float = 0.0) -> dict[str, float]:
    """A partial's `sums` from its accumulators, in plain lists:

    - `stats`: 4 rows (sum v*dt, sum v^2*dt, sum dt, count) x STAT_FIELDS columns; a column with count 0 is left out;
    - `basis`: rows per BASES code;
    - `prof_sum`, `prof_n`: per SYNC_FIELDS column, per bucket (all devices added);
    - `spread`: per SYNC_FIELDS column, (device-spread sum, n, node-spread sum, n);
    a SYNC_FIELDS column whose buckets are all empty writes neither its profile nor its spread;
    - `interval_unknown`: rows whose interval was unknown.
    """
    out: dict[str, float] = {SAMPLES_KEY: float(samples)}
    if interval_unknown:
        out[INTERVAL_UNKNOWN_KEY] = float(interval_unknown)
    s_sum, s_sq, s_n, s_count = stats
    for j, c in enumerate(s_count):
        if c > 0:
            k_sum, k_sq, k_n, k_c = STAT_KEYS[j]
            out[k_sum], out[k_sq], out[k_n], out[k_c] = s_sum[j], s_sq[j], s_n[j], c
    for code, n in enumerate(basis):
        if n:
            out[BASIS_KEYS[code]] = float(n)
    if prof_sum is not None and prof_n is not None and spread is not None:
        for si, (ps, pc) in enumerate(zip(prof_sum, prof_n, strict=True)):
            if not any(pc):
                continue
            keys = profile_keys(len(pc))[si]
            for k, cnt in enumerate(pc):
                if cnt:
                    out[keys[k][0]], out[keys[k][1]] = ps[k], cnt
            for key, v in zip(SPREAD_KEYS[si], spread[si], strict=True):
                out[key] = float(v)
    return out


# --- reading --------------------------------------------------------------------------------------------------------
class Moments(NamedTuple):
    """One statistic's additive moments: sum of value x interval, of value^2 x interval, seconds covered, rows."""

    sum: float = 0.0
    sumsq: float = 0.0
    seconds: float = 0.0
    count: float = 0.0


_NO_MOMENTS = Moments()


@dataclass(frozen=True, slots=True)
class WindowSums:
    """`sums` read back, typed. Absent keys read as 0."""

    samples: float
    interval_unknown: float  # rows whose interval was unknown
    moments: dict[str, Moments]  # STAT_FIELDS name -> its moments (only fields some row carried)
    basis: dict[str, float]  # BASES name -> rows
    profiles: dict[str, list[float]]  # SYNC_FIELDS name -> bucket means, non-empty buckets in time order
    spread: dict[tuple[str, str], tuple[float, float]]  # (SYNC_FIELDS name, "dev" | "node") -> (sum, n)

    def stat(self, name: str) -> Moments:
        return self.moments.get(name, _NO_MOMENTS)


# key -> (kind, index, slot): kind 0 samples (slot 1: interval unknown), 1 stat, 2 basis, 3 spread, 4 profile (index =
# sync column, slot = 2 * bucket + part)
@cache
def _key_index() -> dict[str, tuple[int, int, int]]:
    idx: dict[str, tuple[int, int, int]] = {SAMPLES_KEY: (0, 0, 0), INTERVAL_UNKNOWN_KEY: (0, 0, 1)}
    for j, keys in enumerate(STAT_KEYS):
        idx.update({k: (1, j, s) for s, k in enumerate(keys)})
    idx.update({k: (2, code, 0) for code, k in enumerate(BASIS_KEYS)})
    for si, keys in enumerate(SPREAD_KEYS):
        idx.update({k: (3, si, s) for s, k in enumerate(keys)})
    for si, per_bucket in enumerate(profile_keys(MAX_PROFILE_BUCKETS)):
        for k, (k_sum, k_n) in enumerate(per_bucket):
            idx[k_sum], idx[k_n] = (4, si, 2 * k), (4, si, 2 * k + 1)
    return idx


def read_sums(sums: Mapping[str, float]) -> WindowSums:
    """Read a (merged) `sums` map in one pass; keys outside the layout are ignored."""
    idx = _key_index()
    samples = [0.0, 0.0]
    stats: dict[int, list[float]] = {}
    basis = dict.fromkeys(BASES, 0.0)
    spread = [[0.0, 0.0, 0.0, 0.0] for _ in SYNC_FIELDS]
    prof: list[dict[int, list[float]]] = [{} for _ in SYNC_FIELDS]
    for key, v in sums.items():
        hit = idx.get(key)
        if hit is None:
            continue
        kind, i, slot = hit
        if kind == 1:
            stats.setdefault(i, [0.0, 0.0, 0.0, 0.0])[slot] += v
        elif kind == 4:
            prof[i].setdefault(slot >> 1, [0.0, 0.0])[slot & 1] += v
        elif kind == 0:
            samples[slot] += v
        elif kind == 2:
            basis[BASES[i]] += v
        else:
            spread[i][slot] += v
    return WindowSums(
        samples=samples[0],
        interval_unknown=samples[1],
        moments={STAT_FIELDS[j]: Moments(*m) for j, m in sorted(stats.items())},
        basis=basis,
        profiles={f: [s / c for _, (s, c) in sorted(prof[si].items()) if c > 0] for si, f in enumerate(SYNC_FIELDS)},
        spread={(f, scope): (spread[si][2 * o], spread[si][2 * o + 1])
                for si, f in enumerate(SYNC_FIELDS) for o, scope in enumerate(("dev", "node"))},
    )
