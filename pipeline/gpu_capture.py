"""The project's real GPU captures (data/gpu_capture_h200 and the held-out second one, data/gpu_capture_h200_b,
see their PROVENANCE.md: same tool, format and workloads) read into native samples.

The capture tool writes one row per NVML tick (0.1 s) with `workload` naming what ran, and GPM metrics on every
fifth tick (0.5 s, each the mean over the last interval). Mapping to the native schema (schemas/telemetry.py, the
DCGM field each native field stands for in brackets):

| capture key | native field | note |
|---|---|---|
| gpu_util_pct | gpu_util [DEV_GPU_UTIL] | NVML utilisation.gpu, the same counter |
| mem_util_pct | mem_copy_util [DEV_MEM_COPY_UTIL] | NVML utilisation.memory |
| fb_used_mib, power_w, sm_clock_mhz, energy_mj | same names [DEV_FB_USED, POWER_USAGE, SM_CLOCK, TOTAL_ENERGY] | |
| gpm_sm_util_pct / 100 | sm_active [PROF_SM_ACTIVE] | |
| gpm_sm_occupancy_pct / 100 | sm_occupancy [PROF_SM_OCCUPANCY] | |
| gpm_any_tensor_util_pct / 100 | tensor_active [PROF_PIPE_TENSOR_ACTIVE] | `tensor="any"` (default) |
| gpm_hmma + gpm_imma / 100 | tensor_active | `tensor="hmma"`: the header's "(HMMA) pipe" reading |
| gpm_fp64_util_pct + gpm_dfma_tensor_util_pct / 100 | fp64_active [PROF_PIPE_FP64_ACTIVE] | FP64 work on either pipe |
| gpm_dram_bw_util_pct / 100 | dram_active [PROF_DRAM_ACTIVE] | |
| gpm_fp32 / gpm_fp16 _util_pct / 100 | fp32_active / fp16_active | |
| gpm_pcie_*, gpm_nvlink_* MiB/s x 2^20 | pcie_*_bytes, nvlink_*_bytes (bytes/s) | |

Whether DCGM's PIPE_TENSOR_ACTIVE counts the FP64 (DFMA) tensor pipe on Hopper is not settled by its header
("tensor (HMMA) pipe") and the simulator assumes it does (its FP64 HPC lights tensor_active). The default takes the
harder reading: tensor_active is *any* tensor pipe, so the FP64 HPC job shows 92 % tensor activity and only
fp64_active (DFMA folded in: the native schema has no separate DFMA field; the kind of tensor work is FP64 there)
tells it from training. A GPM reading is the mean over the 0.5 s before it, so in the full tier it is given to
every NVML tick it covers (the four before it and its own; `gpm_hold="none"` keeps it on its own tick only):
otherwise four samples in five would carry no tensor activity and fall to the utilisation / power compute basis,
which a DCGM exporter sampling the profiling fields at its own interval never does. `tier="smi"` keeps the NVML
fields only (what nvidia-smi shows). `temp_c` has no native field and is dropped; no memory clock and no fb_free
were read, so they stay missing (never zero).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.model_train import Dataset, dataset_from_entries, histories_from_messages
from schemas.serde import dumps

CAPTURE_DIR = Path(__file__).resolve().parents[1] / "data" / "gpu_capture_h200"
#: The second capture (fresh machine, scale 0.8): held out, nothing is tuned on it.
CAPTURE_B_DIR = CAPTURE_DIR.with_name("gpu_capture_h200_b")
#: Every real capture by its results key (`trainwatch model evaluate`, benchmarks/compute_truth.py).
CAPTURES = {"h200_capture": CAPTURE_DIR, "h200_capture_b": CAPTURE_B_DIR}
Tier = Literal["full", "smi"]
_NVML = {"gpu_util_pct": "gpu_util", "mem_util_pct": "mem_copy_util", "fb_used_mib": "fb_used_mib",
         "power_w": "power_w", "sm_clock_mhz": "sm_clock_mhz", "energy_mj": "energy_mj"}
_GPM_FRACTION = {"gpm_sm_util_pct": "sm_active", "gpm_sm_occupancy_pct": "sm_occupancy",
                 "gpm_dram_bw_util_pct": "dram_active", "gpm_fp32_util_pct": "fp32_active",
                 "gpm_fp16_util_pct": "fp16_active"}
_GPM_RATE = {"gpm_pcie_tx_mib_s": "pcie_tx_bytes", "gpm_pcie_rx_mib_s": "pcie_rx_bytes",
             "gpm_nvlink_tx_mib_s": "nvlink_tx_bytes", "gpm_nvlink_rx_mib_s": "nvlink_rx_bytes"}
NVML_INTERVAL_S = 0.1
#: A GPM reading covers the GPM interval before it (0.5 s) plus clock jitter.
GPM_COVER_S = 0.55


def load_capture(folder: Path = CAPTURE_DIR) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(raw rows, manifest) of a capture folder."""
    rows = [json.loads(ln) for ln in (folder / "samples.jsonl").read_text().splitlines() if ln.strip()]
    return rows, json.loads((folder / "manifest.json").read_text())


def _frac(v: float) -> float:
    return min(max(float(v) / 100.0, 0.0), 1.0)


def to_native(row: dict[str, Any], *, tier: Tier = "full", tensor: Literal["any", "hmma"] = "any",
              accelerator: str = "NVIDIA H200", workload_id: str | None = None,
              gpm: dict[str, Any] | None = None, precision: str | None = None) -> dict[str, Any]:
    """One capture row as a native TelemetrySample dict (see the module's mapping table); `gpm`: the GPM reading
    that covers this tick (default: the row's own, if any)."""
    s: dict[str, Any] = {"ts": float(row["ts"]), "node": "h200-capture", "device": "GPU-h200-capture-0",
                         "gpu_index": 0, "accelerator": accelerator, "account_id": "h200-capture",
                         "workload_id": workload_id or f"h200-{row['workload']}", "interval_s": NVML_INTERVAL_S}
    if precision:  # what a provider that knows the job's precision would send (the capture ran bf16; HPC fp64)
        s["precision"] = precision
    for k, f in _NVML.items():
        if row.get(k) is not None:
            s[f] = float(row[k])
    g = row if gpm is None else gpm
    if tier == "smi" or "gpm_sm_util_pct" not in g:
        return s
    row = g
    for k, f in _GPM_FRACTION.items():
        if row.get(k) is not None:
            s[f] = _frac(row[k])
    for k, f in _GPM_RATE.items():
        if row.get(k) is not None:
            s[f] = max(float(row[k]), 0.0) * 2**20
    if tensor == "any":
        s["tensor_active"] = _frac(row["gpm_any_tensor_util_pct"])
    else:
        s["tensor_active"] = _frac(row["gpm_hmma_tensor_util_pct"] + row.get("gpm_imma_tensor_util_pct", 0.0))
    s["fp64_active"] = _frac(row.get("gpm_fp64_util_pct", 0.0) + row.get("gpm_dfma_tensor_util_pct", 0.0))
    return s


def capture_runs(folder: Path = CAPTURE_DIR, *, tier: Tier = "full", tensor: Literal["any", "hmma"] = "any",
                 gpm_hold: Literal["cover", "none"] = "cover", precision: str | None = None,
                 ) -> dict[str, list[dict[str, Any]]]:
    """Native samples per manifest workload (`h200-<name>`), time-sorted; the setup / between gaps are dropped."""
    rows, manifest = load_capture(folder)
    names = {w["workload"] for w in manifest["workloads"]}
    by_wl: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("workload") in names:
            by_wl[r["workload"]].append(r)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, rs in by_wl.items():
        rs.sort(key=lambda r: r["ts"])
        cover: list[dict[str, Any] | None] = [None] * len(rs)
        nxt: dict[str, Any] | None = None
        for i in range(len(rs) - 1, -1, -1):  # backwards: the next GPM reading covers the ticks before it
            if "gpm_sm_util_pct" in rs[i]:
                nxt = rs[i]
            if gpm_hold == "cover" and nxt is not None and nxt["ts"] - rs[i]["ts"] <= GPM_COVER_S:
                cover[i] = nxt
        prec = None if precision is None else ("fp64" if name == "hpc" else precision)
        out[f"h200-{name}"] = [to_native(r, tier=tier, tensor=tensor, gpm=c, precision=prec)
                               for r, c in zip(rs, cover, strict=True)]
    return out


def truth(folder: Path = CAPTURE_DIR) -> dict[str, dict[str, Any]]:
    """Manifest ground truth per workload id: label, is_training, seconds, model FLOP."""
    _, manifest = load_capture(folder)
    return {f"h200-{w['workload']}": {"is_training": w["label"] == "training", "label": w["label"],
                                      "source_family": "h200_capture", "archetype": w["workload"],
                                      "seconds": float(w["seconds"]), "model_flop": float(w["model_flop"]),
                                      "start": float(w["start"]), "end": float(w["end"])}
            for w in manifest["workloads"]}


def capture_entries(folder: Path = CAPTURE_DIR, *, tier: Tier = "full", tensor: Literal["any", "hmma"] = "any",
                    keep_windows: bool = False, precision: str | None = None,
                    ) -> tuple[dict[str, list[dict[str, Any]]], dict[tuple[str, float], Any]]:
    """History entries (and optionally merged windows) per run, each run through the windowing core on its own
    (as `trainwatch classify` does)."""
    entries: dict[str, list[dict[str, Any]]] = {}
    windows: dict[tuple[str, float], Any] = {}
    for samples in capture_runs(folder, tier=tier, tensor=tensor, precision=precision).values():
        # `now` only bounds future timestamps: the capture is historical, so its own last time is a valid clock
        hb, dead = histories_from_messages((dumps(s) for s in samples), samples[-1]["ts"] + 3600.0,
                                           keep_windows=keep_windows)
        if dead:
            raise ValueError(f"{dead} capture samples dead-lettered by the windowing core")
        entries.update(hb.entries)
        windows.update(hb.windows)
    return entries, windows


def capture_dataset(folder: Path = CAPTURE_DIR, *, tier: Tier = "full",
                    tensor: Literal["any", "hmma"] = "any") -> Dataset | None:
    """One whole-run history per workload (label from the manifest); None when the capture is absent."""
    if not (folder / "samples.jsonl").is_file():
        return None
    entries, _ = capture_entries(folder, tier=tier, tensor=tensor)
    digest = hashlib.sha256((folder / "samples.jsonl").read_bytes()).hexdigest()
    return dataset_from_entries(entries, truth(folder), digest, 0, per_workload=1)


#: `stretch_run`'s warm-up cut: at most this many seconds (or a fifth of the run) from its start.
WARMUP_S = 10.0


def stretch_run(samples: list[dict[str, Any]], minutes: float, *, interval_s: float = 10.0, devices: int = 1,
                accelerator: str | None = "NVIDIA H200", seed: int = 0) -> list[dict[str, Any]]:
    """A capture run continued as a long multi-GPU job would run: its steady part (the warm-up cut) played
    forwards and backwards (no seam: a jump from the end back to the start would read as a change of phase) for
    `minutes`, sampled every `interval_s` on each of `devices` GPUs, in step as a data-parallel job's are (one
    point of the run for all, each GPU's sample drawn up to 1 s apart, so each keeps its own noise), with the
    accelerator named or not (None). The capture's runs last 36-85 s, so on their own every window judged is
    a young run's; this is what the classifier says of the same work lasting long enough to be judged whole.
    The energy counter is dropped (replayed, it would run backwards)."""
    ts = np.array([s["ts"] for s in samples])
    keep = ts >= ts[0] + min(WARMUP_S, 0.2 * (ts[-1] - ts[0]))
    steady = [s for s, k in zip(samples, keep, strict=True) if k]
    rel = ts[keep] - ts[keep][0]
    span = max(float(rel[-1]), 1e-9)
    rng = np.random.default_rng(seed)
    grid = np.arange(0.0, minutes * 60.0, interval_s)
    t0 = float(samples[0]["ts"])
    out: list[dict[str, Any]] = []
    phase = rng.uniform(0.0, span)
    for d in range(devices):
        u = (grid + phase + rng.uniform(0.0, 1.0, grid.size)) % (2.0 * span)
        u = np.where(u > span, 2.0 * span - u, u)
        for g, i in zip(grid, np.searchsorted(rel, u).clip(0, len(rel) - 1), strict=True):
            s = {k: v for k, v in steady[i].items() if k != "energy_mj"}
            s.update(ts=t0 + float(g) + float(rng.uniform(0.0, 0.05)), device=f"{s['device']}-{d}", gpu_index=d,
                     interval_s=interval_s)
            if accelerator is None:
                s.pop("accelerator", None)
            else:
                s["accelerator"] = accelerator
            out.append(s)
    out.sort(key=lambda s: s["ts"])
    return out
