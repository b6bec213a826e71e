"""Fleet simulator with ground truth (`trainwatch simulate`). See docs/simulator.md.

- `simulate(scenario, out_dir, seed=0, **params)` writes one scenario's folder and returns it.
- `iter_columns(scenario, seed=0, **params)` yields the delivered samples as numpy columns, no files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.simulator.engine import MAL_NONE, iter_blocks
from pipeline.simulator.scenarios import SCENARIOS, build
from pipeline.simulator.writer import write

__all__ = ["SCENARIOS", "build", "iter_columns", "simulate"]


def simulate(scenario: str, out_dir: Path, seed: int = 0, *, columnar: bool = False, **params: Any) -> Path:
    """Write `scenario` for `seed` into `out_dir` (created); byte-identical for the same arguments."""
    out_dir = Path(out_dir)
    write(build(scenario, seed, **params), out_dir, columnar=columnar)
    return out_dir


def iter_columns(scenario: str, seed: int = 0, **params: Any) -> Iterator[dict[str, np.ndarray]]:
    """Delivered valid samples per block, as columns: ts, workload (index), device (index), node (index),
    every metric (NaN where the node does not report it), plus `true_tensor_active` and `duplicate`."""
    sc = build(scenario, seed, **params)
    for blk, _, _ in iter_blocks(sc):
        ok = blk.mal == MAL_NONE
        node = blk.dev[ok] // 8
        smi = sc.fleet.smi_only[node]
        cols: dict[str, np.ndarray] = {"ts": blk.ts[ok], "workload": blk.wl[ok], "device": blk.dev[ok],
                                       "node": node, "duplicate": blk.dup[ok]}
        for k, v in blk.cols.items():
            v = v[ok]
            cols[k] = v if k in ("gpu_util", "mem_copy_util", "fb_used_mib", "fb_free_mib", "power_w",
                                 "sm_clock_mhz", "mem_clock_mhz") else np.where(smi, np.nan, v)
        cols["true_tensor_active"] = blk.cols["tensor_active"][ok]
        yield cols
