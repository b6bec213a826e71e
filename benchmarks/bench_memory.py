"""Memory of the detect stage per tracked workload (the ingest stage's per-device figure is in bench_ingest).

Figure `memory.bytes_per_workload`: bytes the detect engine holds (tracemalloc, after GC) per tracked workload,
from the difference between 50 and 400 workloads each fed 30 windows. Baseline, same run:
`memory.bytes_per_workload_serialised` — the same state as the plain-dict JSON a faust table checkpoints.
"""

from __future__ import annotations

import gc
import tracemalloc

import orjson

from benchmarks.common import bench_main
from detectors.classifier_base import RuleClassifier
from detectors.engine import DetectEngine
from schemas.policy import load_policy

T0 = 1_740_960_000.0
W = 60.0


def _held(n_workloads: int, windows: int) -> tuple[int, int]:
    policy = load_policy("demo")
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    engine = DetectEngine(policy, RuleClassifier(), W)
    feats = {"mean_tensor": 0.4, "std_tensor": 0.1, "mean_gpu_util": 0.7, "mean_power": 0.5, "sync_nodes_tensor": 0.8}
    for k in range(windows):
        for i in range(n_workloads):
            start = T0 + W * k
            engine.on_window({"workload_id": f"wl-{i}", "account_id": f"acct-{i % 97}", "job_id": f"job-{i}",
                              "run_label": None, "window_start": start, "window_end": start + W,
                              "devices": [f"GPU-{i}-{d}" for d in range(8)], "nodes": [f"node-{i}"],
                              "device_count": 8, "node_count": 1, "flop": 1e12, "flop_low": 1e12, "flop_high": 2e12,
                              "basis": "tensor_active", "accelerators": {"NVIDIA H100 80GB HBM3": 8},
                              "features": feats, "window_ids": [f"win-{i}-{k}"]})
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return held, len(orjson.dumps(engine.to_dict()))


def run(quick: bool = False) -> dict:
    windows = 10 if quick else 30
    (small, small_ser), (large, large_ser) = _held(50, windows), _held(400, windows)
    per = (large - small) / 350
    per_ser = (large_ser - small_ser) / 350
    return {
        "figures": {"memory.bytes_per_workload": round(per), "memory.bytes_per_workload_serialised": round(per_ser)},
        "targets": [{"key": "memory.bytes_per_workload", "baseline": "memory.bytes_per_workload_serialised",
                     "max": 10.0, "target_text": "in-memory state vs its checkpointed JSON (informational)"}],
        "params": {"windows_per_workload": windows, "workloads": [50, 400]},
        "notes": [f"memory: detect engine state per tracked workload after {windows} windows each (run history of "
                  "16 windows for the classifier, remembered window keys, verdicts, run description); the ingest "
                  "stage's bytes per active device are `memory.bytes_per_device`."],
    }


if __name__ == "__main__":
    bench_main(run)
