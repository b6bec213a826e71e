"""What one verdict costs: the packaged classifier judging one history at a time, as the detect engine calls it.

Figures `verdict.ms_as_sent` and `verdict.ms_smi` (milliseconds per `GbmWorkloadClassifier.assess` of one
history; the same histories with their DCGM profiling fields hidden reach the nvidia-smi tier, where since version
6.2 a training call also asks the kind support's training-kind members). Baselines, same run, same histories:
`verdict.ms_*_per_tree`, the same calls with scikit-learn predicting tree by tree (detectors/flat_trees.py
`per_tree`). Histories: the simulator's eval scenario (seed 3, never trained on: 6.3 trains on 7, 11, 1, 2), the
detect stage's own windows.
Best of 3 passes, one thread.
"""

from __future__ import annotations

import os
import time

import numpy as np

from benchmarks.common import bench_main


def _ms_per_row(model, X: np.ndarray, passes: int = 3) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(len(X)):
            model.assess(X[i : i + 1])
        best = min(best, (time.perf_counter() - t0) / len(X))
    return round(best * 1000, 3)


def run(quick: bool = False) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from detectors.flat_trees import per_tree
    from detectors.model_artifact import load_artifact
    from pipeline.model_eval import _smi_view
    from pipeline.model_train import simulated_dataset

    scale, n = (0.25, 60) if quick else (0.5, 150)
    ds = simulated_dataset("eval", 3, scale=scale)
    model, meta = load_artifact(None)
    idx = np.random.default_rng(0).permutation(len(ds.y))[:n]
    X = model.featurizer_.transform([ds.histories[i] for i in idx])
    views = {"as_sent": X, "smi": _smi_view(model, X)}
    figures: dict[str, float] = {}
    for name, M in views.items():
        model.assess(M[:5])  # derive the cached references once, outside the timing
        flat = _ms_per_row(model, M)
        with per_tree():
            base = _ms_per_row(model, M)
        figures[f"verdict.ms_{name}"], figures[f"verdict.ms_{name}_per_tree"] = flat, base
    bands = {name: {b: sum(d["band"] == b for d in model.assess(M)) for b in ("training", "uncertain", "not_training")}
             for name, M in views.items()}
    return {
        "figures": figures,
        "targets": [{"key": f"verdict.ms_{v}", "baseline": f"verdict.ms_{v}_per_tree", "max": 1.0,
                     "target_text": "one verdict no slower than with scikit-learn predicting tree by tree"}
                    for v in views],
        "params": {"scenario": "eval", "seed": 3, "scale": scale, "histories": len(idx),
                   "model_version": meta.model_version, "bands": bands},
        "notes": [f"verdict: ms per history judged alone by classifier {meta.model_version} ({len(idx)} seed-3 "
                  "histories, one thread, best of 3); `_smi`: DCGM fields hidden (the nvidia-smi tier)."],
    }


if __name__ == "__main__":
    bench_main(run)
