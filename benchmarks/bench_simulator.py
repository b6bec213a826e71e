"""Simulator throughput: samples/s in memory (numpy columns) and to files (JSON lines + ground truth).

    python -m benchmarks.bench_simulator [--quick]

Figure `simulator.samples_per_s`: samples written to files per second (JSON lines + ground truth), target >= 200k
on one core. Baseline, same run: `simulator.memory_samples_per_s`, generation alone as numpy columns — the ratio
says how much of the time goes to formatting and writing lines. In full mode about a third of the file time is
system time: the kernel copying ~2 GB into the page cache, which no change to the formatting can remove.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import bench_main
from pipeline.simulator import iter_columns
from pipeline.simulator.scenarios import build
from pipeline.simulator.writer import write


def run(quick: bool = False, scale: float = 0.2) -> dict[str, Any]:
    # Full mode: scale 0.2 of `bench` (~4.6M samples, ~3 GB of lines); scale 1.0 writes ~15 GB.
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
    return {
        "figures": {"simulator.samples_per_s": res["file_samples_per_s"],
                    "simulator.memory_samples_per_s": res["memory_samples_per_s"]},
        "targets": [
            {"key": "simulator.samples_per_s", "min": 200_000, "target_text": ">= 200k samples/s to files"},
            {"key": "simulator.samples_per_s", "baseline": "simulator.memory_samples_per_s", "min": 0.0,
             "target_text": "share of in-memory generation speed kept when writing lines (informational)"},
        ],
        "params": res,
        "notes": [f"simulator: scenario bench at scale {scale}, {lines:,} lines of ~{res['bytes_per_line']:.0f} B"],
    }


if __name__ == "__main__":
    bench_main(run)
