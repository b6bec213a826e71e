"""How large a run the detect tables carry: one account's run of N workloads through StageTables (the faust app's
table code over in-memory tables, rule classifier), a save after every batch as the worker makes them.

Figures per N: the account's entry as the stage writes it (bytes, packed) and how many pieces it goes in
(`tables.PIECE_BYTES`), the largest changelog message of any save (it must stay under the topic's 8 MiB, and under a
piece), the time per workload-window (feed and save, as a ratio to the smallest N's in the same run), and the time a
restart takes to restore the partition from the table (and that it restores the same engine).

Before pieces, an engine entry was one message: the account's grew ~280 bytes per workload compressed, so one run
near 20,000 workloads made a message over 8 MiB and the refused write stopped the worker after every restart.

`python -m benchmarks.large_run [--workloads 100 5000 25000] [--windows 5] [--out benchmarks/results/large_run.json]`
Nothing here asserts: tests/test_table_values.py checks the pieces, their order and a kill after any message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import orjson

from pipeline.detect import tables
from pipeline.detect.batch import Msg, feed_partition
from pipeline.detect.tables import MemoryTable, StageTables, unpack
from pipeline.settings import Settings
from schemas.policy import load_policy
from schemas.serde import encode
from schemas.windows import WindowAggregate

T0, W = 1_740_960_000.0, 60.0
BATCH = 100  # the worker's batch (pipeline/detect/faust_app.py BATCH; not imported: that imports faust)


def workload_window(wid: str, i: int, account: str = "acct-big", t0: float = T0) -> WindowAggregate:
    """Window `i` of an 8-GPU training workload of run `run-big` (also the tests' large runs)."""
    start = t0 + i * W
    return WindowAggregate(window_id=f"w-{wid}-{i}", workload_id=wid, account_id=account, run_label="run-big",
                           partition=0, window_start=start, window_end=start + W, sample_count=48, device_count=8,
                           node_count=1, devices=[f"{wid}-gpu{d}" for d in range(8)], nodes=[f"n-{wid}"],
                           device_seconds=8 * W, flop=2e17, flop_low=1.8e17, flop_high=4e17, basis="tensor_active",
                           accelerators={"H100": 8})


def one(n: int, windows: int) -> dict:
    settings, topics = Settings(model_path="rule"), Settings().topics
    policy = load_policy("demo")
    engine, partials = MemoryTable(), MemoryTable()
    tabs = StageTables(engine, partials, settings, policy, None)
    ids = [(f"pod-{k:06d}-" + hashlib.sha256(str(k).encode()).hexdigest())[:60] for k in range(n)]
    cip = {"account_id": "acct-big", "name": "Big Co", "country": "DE", "us_person": False, "updated_at": T0 - 86400}
    off = iter(range(10**9))
    feed_partition(tabs, 0, [Msg(topics.cip, 0, next(off), orjson.dumps(cip))], topics, at=0.0)
    t0, st = time.perf_counter(), None
    for i in range(windows):
        msgs = [Msg(topics.windows, 0, next(off), encode(workload_window(wid, i))) for wid in ids]
        for b in range(0, len(msgs), BATCH):
            st = feed_partition(tabs, 0, msgs[b:b + BATCH], topics, at=0.0).stage
            tabs.save(0, st)
    feed_s = time.perf_counter() - t0
    entry = tabs.written[b"0|a|acct-big"]
    stored = engine.data[b"0|a|acct-big"]
    pieces = unpack(stored).get(tables._PIECES, [None, 0])[1] if stored.startswith(b'{"_pieces"') else 0
    t1 = time.perf_counter()
    restored, _ = StageTables(MemoryTable(engine.data), MemoryTable(partials.data), settings, policy, None).stage(0)
    restore_s = time.perf_counter() - t1
    same = json.dumps(restored.engine.to_dict(), sort_keys=True) == json.dumps(st.engine.to_dict(), sort_keys=True)
    run = next(iter(st.engine.runs.values()))
    members = sum(r == run.run_id for r in st.engine.stitcher.workload_run.values())
    return {"workloads": n, "windows": windows, "run_workloads": members,
            "account_entry_bytes": len(entry), "account_entry_pieces": pieces,
            "largest_message_bytes": max(len(v or b"") for _, _, v in engine.sent),
            "engine_table_bytes": sum(len(v) for v in engine.data.values()),
            "us_per_workload_window": round(1e6 * feed_s / (n * windows), 1), "restore_s": round(restore_s, 2),
            "restores_the_same_engine": same}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", type=int, nargs="+", default=[100, 5000, 25000])
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for n in sorted(args.workloads):
        r = one(n, args.windows)
        r["time_ratio_to_smallest"] = round(r["us_per_workload_window"] / rows[0]["us_per_workload_window"], 2) \
            if rows else 1.0
        rows.append(r)
        print(json.dumps(r))
    if args.out:
        args.out.write_bytes(orjson.dumps({"piece_bytes": tables.PIECE_BYTES, "runs": rows},
                                          option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
