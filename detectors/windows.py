"""Merge the partial window aggregates of one workload and finish the classifier's features. Pure.

Ingest emits one partial per (workload, window, source topic and partition, revision); every statistic travels as
an additive sum (`WindowAggregate.sums`, laid out, written and read by schemas/window_sums.py), so partials from
different partitions and late-data corrections simply add. Means are time-weighted (sum of value x interval /
seconds covered), so no feature depends on the sampling interval.
Missing inputs give None, never 0. Each feature is documented in docs/ingest.md.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.telemetry import METRIC_FIELDS
from schemas.window_sums import WindowSums, read_sums
from schemas.windows import WindowAggregate

_MEAN_FIELDS = (
    ("tensor", "tensor_active"),
    ("sm", "sm_active"),
    ("sm_occupancy", "sm_occupancy"),
    ("dram", "dram_active"),
    ("gr_engine", "gr_engine_active"),
    ("gpu_util", "util_frac"),
    ("mem_copy_util", "mem_copy_util"),
    ("power", "power_frac"),
    ("fb_used", "fb_frac"),
    ("sm_clock", "sm_clock_mhz"),
    ("mem_clock", "mem_clock_mhz"),
)
#: Fields the collector reports in percent (DCGM/nvidia-smi 0-100); their features are fractions like the others.
_PERCENT_FIELDS = frozenset(("mem_copy_util",))
_SYNC = (("tensor", "tensor_active"), ("util", "util_frac"), ("power", "power_frac"))
_RATES = (
    ("nvlink_bps", ("nvlink_tx_bytes", "nvlink_rx_bytes")),
    ("net_bps", ("net_tx_bytes", "net_rx_bytes")),
    ("pcie_bps", ("pcie_tx_bytes", "pcie_rx_bytes")),
)

#: Readings in the device's own units (W, MiB), kept beside the fractions of the catalog's TDP and memory: when the
#: accelerator is unknown or absent the fractions are missing, and the classifier bounds them from these instead
#: of treating the power and memory evidence as absent (detectors/classifier.py, "missing information").
UNIT_FEATURES = ("mean_power_watts", "std_power_watts", "mean_fb_used_mib", "std_fb_used_mib", "mean_fb_total_mib")

#: The classifier's input, in a stable order.
FEATURE_NAMES: tuple[str, ...] = (
    *(f"{p}_{name}" for name, _ in _MEAN_FIELDS for p in ("mean", "std")),
    *(f"sync_{scope}_{name}" for name, _ in _SYNC for scope in ("devices", "nodes")),
    *(f"{stat}_{name}" for name, _ in _SYNC for stat in ("profile_cv", "profile_ac1")),
    "mem_occupancy",
    *(name for name, _ in _RATES),
    "fp64_share",
    "device_count",
    "node_count",
    "devices_per_node",
    "log10_flop_rate",
    "tensor_basis_share",
    "fields_present",
    *UNIT_FEATURES,
)


@dataclass(slots=True)
class WorkloadWindow:
    """One workload's window after merging every partition's partial and every correction."""

    workload_id: str
    account_id: str | None
    job_id: str | None
    run_label: str | None
    window_start: float
    window_end: float
    devices: list[str]
    nodes: list[str]
    device_count: int
    node_count: int
    flop: float
    flop_low: float
    flop_high: float
    basis: str
    device_seconds: float
    sample_count: int
    accelerators: dict[str, int]
    unknown_accelerators: list[str]
    window_ids: list[str]
    sums: dict[str, float]
    features: dict[str, float | None] = field(default_factory=dict)

    def feature_vector(self) -> list[float | None]:
        return [self.features.get(n) for n in FEATURE_NAMES]


def merge_partials(partials: Iterable[WindowAggregate]) -> WorkloadWindow:
    """Merge partials of ONE workload and window (any partitions, any revisions); duplicates by window_id count
    once. Raises ValueError on an empty list or mixed workloads/windows."""
    uniq: dict[str, WindowAggregate] = {}
    for p in partials:
        uniq.setdefault(p.window_id, p)
    parts = sorted(uniq.values(), key=lambda p: (p.partition, p.revision))
    if not parts:
        raise ValueError("merge_partials needs at least one partial")
    first = parts[0]
    if any(p.workload_id != first.workload_id or p.window_start != first.window_start for p in parts):
        raise ValueError("partials of different workloads or windows")
    sums: dict[str, float] = {}
    devices: set[str] = set()
    nodes: set[str] = set()
    unknown: set[str] = set()
    for p in parts:
        for k, v in p.sums.items():
            sums[k] = sums.get(k, 0.0) + v
        devices.update(p.devices)
        nodes.update(p.nodes)
        unknown.update(p.unknown_accelerators)
    # devices per model: a device lives on one partition, so first emissions (revision 0) add up
    accelerators: dict[str, int] = {}
    for p in parts:
        if p.revision == 0:
            for model, n in p.accelerators.items():
                accelerators[model] = accelerators.get(model, 0) + n
    bases = {p.basis for p in parts if p.sample_count}
    basis = bases.pop() if len(bases) == 1 else ("mixed" if bases else "none")
    ww = WorkloadWindow(
        workload_id=first.workload_id,
        account_id=next((p.account_id for p in parts if p.account_id), None),
        job_id=next((p.job_id for p in parts if p.job_id), None),
        run_label=next((p.run_label for p in parts if p.run_label), None),
        window_start=first.window_start,
        window_end=first.window_end,
        devices=sorted(devices),
        nodes=sorted(nodes),
        device_count=len(devices),
        node_count=len(nodes),
        flop=sum(p.flop for p in parts),
        flop_low=sum(p.flop_low for p in parts),
        flop_high=sum(p.flop_high for p in parts),
        basis=basis,
        device_seconds=sum(p.device_seconds for p in parts),
        sample_count=sum(p.sample_count for p in parts),
        accelerators=accelerators,
        unknown_accelerators=sorted(unknown),
        window_ids=[p.window_id for p in parts],
        sums=sums,
    )
    ww.features = window_features(sums, ww.device_count, ww.node_count, ww.flop, ww.window_end - ww.window_start)
    return ww


def _mean_std(ws: WindowSums, name: str) -> tuple[float | None, float | None]:
    m = ws.stat(name)
    n = m.seconds
    if n <= 0:
        return None, None
    mean = m.sum / n
    var = m.sumsq / n - mean * mean
    if var <= 1e-9 * max(mean * mean, 1e-12):  # rounding of E[x^2] - E[x]^2 on a constant signal
        var = 0.0
    return mean, math.sqrt(var)


def _var(xs: list[float]) -> float:
    mu = sum(xs) / len(xs)
    return sum((x - mu) ** 2 for x in xs) / len(xs)


def _synchrony(ws: WindowSums, name: str, scope: str, prof: list[float], members: int) -> float | None:
    """var(workload-mean profile) / mean var(each device's or node's own profile): ~1 when they move together,
    ~1/N when independent. None when undefined (too few buckets, no variation at all, or one device / node: its
    profile is the mean's, 1.0 by construction, which would read as lockstep from no evidence, issue 14)."""
    total, n = ws.spread[(name, scope)]
    if n <= 0 or len(prof) < 2 or members < 2:
        return None
    within = total / n
    if within <= 1e-12:
        return None
    return _var(prof) / within


def _ac1(prof: list[float]) -> float | None:
    if len(prof) < 3:
        return None
    mu = sum(prof) / len(prof)
    den = sum((x - mu) ** 2 for x in prof)
    if den <= 1e-18:
        return None
    return sum((a - mu) * (b - mu) for a, b in itertools.pairwise(prof)) / den


def _unit_features(sums: WindowSums, f: dict[str, float | None]) -> None:
    """Watts and MiB as reported, and the memory fraction from used / (used + free) when the catalog does not know
    the part but the exporter sends both (nvidia-smi memory.used and memory.total, DCGM FB_USED and FB_FREE)."""
    f["mean_power_watts"], f["std_power_watts"] = _mean_std(sums, "power_w")
    used, used_std = _mean_std(sums, "fb_used_mib")
    free, _ = _mean_std(sums, "fb_free_mib")
    f["mean_fb_used_mib"], f["std_fb_used_mib"] = used, used_std
    f["mean_fb_total_mib"] = used + free if used is not None and free is not None else None
    if f.get("mean_fb_used") is None and used is not None and free is not None and used + free > 0:
        # both fields come from the same samples in every exporter seen; a time-weighted ratio of means
        f["mean_fb_used"] = used / (used + free)


def window_features(raw_sums: dict[str, float], device_count: int, node_count: int, flop: float,
                    window_s: float) -> dict[str, float | None]:
    """The classifier's features from a merged `sums` map (None where an input is missing)."""
    sums = read_sums(raw_sums)
    f: dict[str, float | None] = {}
    for name, field_ in _MEAN_FIELDS:
        mean, std = _mean_std(sums, field_)
        if field_ in _PERCENT_FIELDS and mean is not None and std is not None:
            mean, std = mean / 100.0, std / 100.0
        f[f"mean_{name}"], f[f"std_{name}"] = mean, std
    for name, field_ in _SYNC:
        prof = sums.profiles[field_]
        f[f"sync_devices_{name}"] = _synchrony(sums, field_, "dev", prof, device_count)
        f[f"sync_nodes_{name}"] = _synchrony(sums, field_, "node", prof, node_count)
        if len(prof) >= 2:
            mu = sum(prof) / len(prof)
            f[f"profile_cv_{name}"] = math.sqrt(_var(prof)) / mu if mu > 1e-12 else None
        else:
            f[f"profile_cv_{name}"] = None
        f[f"profile_ac1_{name}"] = _ac1(prof)
    _unit_features(sums, f)
    f["mem_occupancy"] = f["mean_fb_used"]
    for name, fields in _RATES:
        means = [_mean_std(sums, x)[0] for x in fields]
        known = [m for m in means if m is not None]
        f[name] = sum(known) if known else None
    pipes = {x: _mean_std(sums, x)[0] for x in ("fp64_active", "fp32_active", "fp16_active", "tensor_active")}
    if pipes["fp64_active"] is None:
        f["fp64_share"] = None
    else:
        total = sum(v for v in pipes.values() if v is not None)
        f["fp64_share"] = pipes["fp64_active"] / total if total > 1e-12 else None
    f["device_count"] = float(device_count)
    f["node_count"] = float(node_count)
    f["devices_per_node"] = device_count / node_count if node_count else None
    basis_total = sum(sums.basis.values())
    # an unknown part's estimate is a catalog-wide band: no evidence of the rate (as before it had a basis)
    known_basis = basis_total - sums.basis["none"] - sums.basis["unknown_accelerator"]
    f["log10_flop_rate"] = math.log10(flop / window_s) if flop > 0 and known_basis > 0 else None
    f["tensor_basis_share"] = sums.basis["tensor_active"] / basis_total if basis_total else None
    samples = sums.samples
    if samples > 0:
        have = sum(sums.stat(x).count for x in METRIC_FIELDS)
        f["fields_present"] = have / (samples * len(METRIC_FIELDS))
    else:
        f["fields_present"] = None
    return {k: f.get(k) for k in FEATURE_NAMES}
