"""The compute estimate against ground truth: the real H200 captures' train and LoRA runs (data/gpu_capture_h200,
and the held-out second capture data/gpu_capture_h200_b; manifest model FLOP) through the ingest stage's compute
accounting (detectors/compute.py), as ratios.

    python -m benchmarks.compute_truth [--out benchmarks/results/compute_truth.json]

Per capture (capture B's figures carry a `b.` prefix and its runs sit under `runs_b`), capture variant
(profiling fields: tensor_active basis; the same with the precision reported; nvidia-smi only: utilisation /
power basis) and run: estimated FLOP (point, low, high) / the manifest's model FLOP, whether the truth lies inside
the band the product reports (the tensor basis's low end at the part's achievable share of peak, the catalog's
column: H200 0.65).
Ratios, not timings: the figures do not depend on the machine.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from detectors.compute import achievable_share
from pipeline.gpu_capture import CAPTURE_B_DIR, CAPTURE_DIR
from pipeline.model_eval import COMPUTE_TRUTH_RUNS, compute_vs_truth
from schemas.serde import dumps

OUT = Path(__file__).resolve().parent / "results" / "compute_truth.json"


#: (figure prefix, results key, folder): the first capture keeps its original keys; B is held out.
CAPTURES = (("", "runs", CAPTURE_DIR), ("b.", "runs_b", CAPTURE_B_DIR))


def run() -> dict[str, Any]:
    figures: dict[str, Any] = {}
    out: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "capture": "data/gpu_capture_h200",
                           "capture_b": "data/gpu_capture_h200_b", "achievable_share": achievable_share("NVIDIA H200"),
                           "figures": figures}
    for prefix, key, folder in CAPTURES:
        res = compute_vs_truth(folder)
        for variant, runs in res.items():
            if not isinstance(runs, dict):
                continue
            for w in COMPUTE_TRUTH_RUNS:
                r = runs.get(w) or {}
                if "ratio" in r:
                    name = f"compute_truth.{prefix}{variant}.{w.removeprefix('h200-')}"
                    figures[f"{name}.ratio"] = r["ratio"]
                    figures[f"{name}.band_ratio"] = r["band_ratio"]
                    figures[f"{name}.truth_inside_band"] = r["truth_inside_band"]
        out[key] = res
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    result = run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(dumps(result) + b"\n")
    for prefix, key, _ in CAPTURES:
        for variant, runs in result[key].items():
            for w, r in (runs.items() if isinstance(runs, dict) else []):
                if "ratio" in r:
                    print(f"{prefix + variant:22} {w:12} basis {r['basis']!s:28} estimate/truth {r['ratio']:7.3f}  "
                          f"band [{r['band_ratio'][0]:.3f}, {r['band_ratio'][1]:.3f}] "
                          f"truth inside {r['truth_inside_band']}")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
