"""Simulator throughput: samples/s in memory (numpy columns) and to files (JSON lines + ground truth).

    .venv/bin/python benchmarks/bench_simulator.py [--quick] [--scale F]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.simulator import iter_columns
from pipeline.simulator.scenarios import build
from pipeline.simulator.writer import write


def run(scale: float = 1.0, quick: bool = False) -> dict[str, Any]:
    scale = 0.03 if quick else scale
    t0 = time.perf_counter()
    n_mem = sum(len(c["ts"]) for c in iter_columns("bench", 0, scale=scale))
    mem_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        manifest, file_s = write(build("bench", 0, scale=scale), Path(d) / "bench")
        size = (Path(d) / "bench" / "telemetry.jsonl").stat().st_size
    lines = manifest["counts"]["lines"]
    res = {"scenario": "bench", "scale": scale, "samples_in_memory": n_mem, "memory_samples_per_s": n_mem / mem_s,
           "lines": lines, "file_seconds": file_s, "file_samples_per_s": lines / file_s,
           "bytes_per_line": size / max(lines, 1)}
    for k, v in res.items():
        print(f"{k:>22}: {v:,.3f}" if isinstance(v, float) else f"{k:>22}: {v}")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small run (seconds)")
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args()
    run(a.scale, a.quick)
