"""Does the case set depend on one input stream arriving late? A broker failover or a slow producer can hold a whole
topic back behind the others, past the detect engine's re-decide journal (`REDECIDE_S`, 20 windows of event time).
The same folder through the in-process pipeline with allocations, CIP records or telemetry delivered late by each
delay (pipeline/sources.py `held_back`), compared with the run in delivery order by the chaos run's rules
(benchmarks/partitioning.py `compare`: same cases, knowledge_at within one window, statuses, due dates).

`python -m benchmarks.late_inputs FOLDER... [--policy demo] [--streams allocations cip] [--delays 600 1500 7200]
[--out benchmarks/results/late_inputs.json]`. Each run is its own process (chDB: one engine path per process), two at
a time. Nothing here asserts: tests/test_engine_event_order.py pins the engine's side of it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from benchmarks.partitioning import compare, run, same


def held_back_runs(folder: Path, policy: str, holds: list[tuple[str, float]]) -> dict[str, Any]:
    """The in-order run and one run per (stream, delay) of `folder`, two at a time; each compared with the first."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tw-late-") as t, ThreadPoolExecutor(2) as pool:
        ref_f = pool.submit(run, folder, policy, 1, Path(t))
        futs = {h: pool.submit(run, folder, policy, 1, Path(t), h) for h in holds}
        ref = ref_f.result()
        diffs = {f"{s}+{d:g}s": compare(ref, f.result()) for (s, d), f in futs.items()}
    return {"folder": str(folder), "policy": policy, "wall_s": round(time.monotonic() - t0, 1),
            "in_order": {"cases": len(ref["cases"]), "detections": len(ref["detections"])}, "held_back": diffs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--policy", default="demo")
    ap.add_argument("--streams", nargs="+", default=["allocations", "cip"])
    ap.add_argument("--delays", type=float, nargs="+", default=[600.0, 1500.0, 7200.0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    holds = [(s, d) for s in args.streams for d in args.delays]
    result = {}
    for folder in args.folders:
        res = result[folder.name] = held_back_runs(folder, args.policy, holds)
        for name, d in res["held_back"].items():
            moved = ", ".join(f"{m['subject']} {m['delta_s']} s" for m in d["knowledge_at_moved"]) or "none"
            print(f"{folder.name} {name}: {d['cases']} vs {d['cases_ref']} cases, same={same(d)}; lost "
                  f"{len(d['lost'])}, extra {len(d['extra'])}, moved: {moved}; status changed "
                  f"{len(d['status_changed'])}; detections extra {len(d['detections_extra'])}, lost "
                  f"{len(d['detections_lost'])}")
    if args.out:
        args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
