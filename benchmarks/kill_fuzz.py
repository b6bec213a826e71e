"""Kill -9 in the middle of a detect checkpoint, anywhere: does the restart end as a worker never killed?

The faust detect agent saves a batch's state as changelog messages on two topics (`engine`, `partials`;
pipeline/detect/tables.py), and a kill -9 keeps any prefix of each topic's messages. Its input offsets are committed
only once every write before is acknowledged, but they may lag the state by several batches. This replays that
without Kafka, on the demo scenario's real detect inputs (the in-process pipeline's, telemetry over 4 partitions, in
the order it hands them to the detect stage), through StageTables over dict tables with the packaged classifier:

- the reference: every batch fed and saved, then the end of input;
- each trial: a random batch n, a random prefix of its save's engine messages and of its partials messages (the rest
  never reached the broker), a random commit lag (0-5 batches): a fresh StageTables from what persisted reads again
  from batch n - lag to the end.

A trial is wrong when a detection's latest content by id, or a run's sum or crossing time, differs from the
reference. The quick chaos run's intermittent acct-resold crossing 117 s late and a lost owner case came from such
cuts (docs/faust.md, "Delivery"); 15 of the first 57 trials of this script were wrong before those fixes.

`python -m benchmarks.kill_fuzz [--accounts acct-resold,acct-sm] [--trials 40] [--batch 20] [--seed 1]
[--out benchmarks/results/kill_fuzz.json]`. The default accounts are those the chaos run's windows partition 2
carries (the flaky one). Nothing here asserts: tests/test_journal_restore.py kills one save at every message.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from pipeline.classifier_loader import load_classifier
from pipeline.detect.tables import MemoryTable, StageTables
from pipeline.settings import Settings, load_settings
from schemas.detection import Detection
from schemas.policy import load_policy

RESULTS = Path(__file__).resolve().parent / "results" / "kill_fuzz.json"
Item = tuple[str, Any]  # ("w", window partial) | ("c", CIP record) | ("a", allocation), as detect is handed them


def demo_inputs(policy_name: str, tmp: Path) -> list[Item]:
    """The demo scenario's detect inputs in the order the in-process pipeline hands them to the detect stage."""
    from pipeline.ingest.aggregate import WindowConfig
    from pipeline.runner import InProcessPipeline
    from pipeline.simulator import simulate
    from pipeline.sources import read_folder
    from pipeline.store import Store

    policy = load_policy(policy_name)
    folder = simulate("demo", tmp / "demo", seed=0)
    items: list[Item] = []

    class Recording:
        """The detect stage, its inputs recorded."""

        def __init__(self, stage: Any) -> None:
            self.stage = stage

        def on_windows(self, ws: list) -> Any:
            items.extend(("w", w) for w in ws)
            return self.stage.on_windows(ws)

        def on_cip(self, c: Any) -> Any:
            items.append(("c", c))
            return self.stage.on_cip(c)

        def on_allocation(self, a: Any) -> Any:
            items.append(("a", a))
            return self.stage.on_allocation(a)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.stage, name)

    with Store.connect(f"chdb://{tmp / 'store'}", "kill_fuzz") as store:
        pipeline = InProcessPipeline(store, policy, load_classifier("rule", policy), window=WindowConfig(),
                                     telemetry_partitions=4)
        pipeline.detect = Recording(pipeline.detect)  # type: ignore[assignment]
        pipeline.run(read_folder(folder))
    return items


def feed(tabs: StageTables, batch: list[Item], out: list[Detection]) -> None:
    """One batch as the faust agent runs it (batch.feed_partition without quiet sources), then its save."""
    st, _ = tabs.stage(0)
    st.begin_batch()
    for kind, x in batch:
        if kind == "w":
            tabs.before_window(0, st, x)
            out += st.on_window(x)
        else:
            out += st.on_cip(x) if kind == "c" else st.on_allocation(x)
    out += st.end_batch()
    out += st.on_time()
    tabs.save(0, st)


def outcome(tabs: StageTables, out: list[Detection]) -> tuple[dict[str, Any], dict[str, Any]]:
    """After the end of input: each detection's latest content by id, and each run's (account, sum, crossing)."""
    st, _ = tabs.stage(0)
    out += st.flush()
    out += st.on_time()
    dets = {d.detection_id: d.model_dump(mode="json") for d in out}
    runs = {r.run_id: [r.account_id, r.used, (r.crossed or {}).get("at")] for r in st.engine.runs.values()}
    return dets, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", default="acct-resold,acct-sm", help="comma-separated; 'all' for every account")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--batch", type=int, default=20, help="inputs per batch (the unit of checkpoint)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--policy", default="demo")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tw-kill-fuzz-") as tmp:
        items = demo_inputs(args.policy, Path(tmp))
    if args.accounts != "all":
        keep = set(args.accounts.split(","))
        items = [x for x in items if x[1].account_id in keep]
    policy = load_policy(args.policy)
    classifier = load_classifier(load_settings().model_path, policy)
    settings = Settings()
    batches = [items[i:i + args.batch] for i in range(0, len(items), args.batch)]

    def tables(engine: dict | None = None, partials: dict | None = None) -> StageTables:
        return StageTables(MemoryTable(engine), MemoryTable(partials), settings, policy, classifier)

    ref = tables()
    ref_out: list[Detection] = []
    for b in batches:
        feed(ref, b, ref_out)
    want_dets, want_runs = outcome(ref, ref_out)
    rng = random.Random(args.seed)
    wrong: list[dict[str, Any]] = []
    for trial in range(args.trials):
        n, lag = rng.randrange(1, len(batches)), rng.choice([0, 0, 1, 2, 5])
        tabs, out = tables(), []
        for b in batches[:n]:
            feed(tabs, b, out)
        engine, partials = dict(tabs.engine.data), dict(tabs.partials.data)
        e0, p0 = len(tabs.engine.sent), len(tabs.partials.sent)
        feed(tabs, batches[n], out)  # its outputs were acknowledged before its state was queued (faust_app.py)
        em, pm = tabs.engine.sent[e0:], tabs.partials.sent[p0:]
        ce, cp = rng.randint(0, len(em)), rng.randint(0, len(pm))
        restarted = tables(MemoryTable.after(engine, em[:ce]), MemoryTable.after(partials, pm[:cp]))
        for b in batches[max(0, n - lag):]:
            feed(restarted, b, out)
        dets, runs = outcome(restarted, out)
        if dets != want_dets or runs != want_runs:
            wrong.append({"trial": trial, "batch": n, "lag": lag, "engine_cut": [ce, len(em)],
                          "partials_cut": [cp, len(pm)],
                          "runs": {k: [want_runs.get(k), runs.get(k)] for k in set(runs) | set(want_runs)
                                   if runs.get(k) != want_runs.get(k)},
                          "detections": sorted(k for k in set(dets) | set(want_dets)
                                               if dets.get(k) != want_dets.get(k))})
            print(f"wrong: {wrong[-1]}", flush=True)
    result = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": f"{os.cpu_count()} CPUs",
              "accounts": args.accounts, "inputs": len(items), "batches": len(batches), "batch": args.batch,
              "seed": args.seed, "trials": args.trials, "wrong": len(wrong), "wrong_trials": wrong,
              "reference_detections": len(want_dets), "reference_runs": len(want_runs),
              "wall_s": round(time.monotonic() - t0, 1)}
    print(f"kill fuzz: {len(wrong)} of {args.trials} trials wrong ({len(items)} inputs in {len(batches)} batches, "
          f"{len(want_dets)} detections, {len(want_runs)} runs; {result['wall_s']} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    main()
