"""Does the case set depend on how telemetry is partitioned? The same folder through the in-process pipeline with
telemetry spread over 1, 2 and 4 partitions by node (pipeline/runner.py node_partition, as a Kafka producer keyed by
node spreads it), compared as benchmarks/chaos.py compares Kafka with the replay: same (policy, reason, subject)
cases, same runs (case ids), knowledge_at within one window, due_at = knowledge_at + 15 days, no extra case.

`python -m benchmarks.partitioning FOLDER [--policy demo] [--partitions 1 2 4] [--out result.json]`
Each partition count runs in its own process (chDB: one engine path per process). Per run it also records every
detection, so a difference can be traced to the run and the decision behind it. Nothing here asserts:
tests/test_detect_partitioning.py asserts the property on a small scenario.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
WINDOW_S = 60.0
DUE_S = 15 * 86400.0

RUN_SCRIPT = """
import sys, orjson
from pathlib import Path
from pipeline.classifier_loader import load_classifier
from pipeline.ingest.aggregate import WindowConfig
from pipeline.runner import InProcessPipeline
from pipeline.settings import load_settings
from pipeline.sources import held_back, read_folder
from pipeline.store import Store
from schemas.policy import load_policy
settings = load_settings()
policy = load_policy(sys.argv[4])
records = read_folder(Path(sys.argv[1]))
if len(sys.argv) > 6:  # one stream held back: "stream:seconds" (benchmarks/late_inputs.py)
    stream, delay = sys.argv[6].split(":")
    records = held_back(records, stream, float(delay))
with Store.connect(sys.argv[2], sys.argv[3]) as store:
    res = InProcessPipeline(store, policy, load_classifier(settings.model_path, policy),
                            window=WindowConfig.from_settings(settings), batch_size=settings.ingest.batch_size,
                            telemetry_partitions=int(sys.argv[5])).run(records)
    cases = [{"case_id": c.case_id, "policy": c.policy_id, "status": c.status, "reason": c.reason,
              "subject": c.beneficial_owner_id or c.account_id, "run_id": c.run_id, "knowledge_at": c.knowledge_at,
              "due_at": c.due_at} for c in store.list_cases()]
    dets = [{"detection_id": d.detection_id, "detector": d.detector_id, "outcome": d.outcome, "reason": d.reason,
             "account": d.account_id, "owner": d.beneficial_owner_id, "run_id": d.run_id, "event_time": d.event_time,
             "verdict": (d.evidence.get("verdict") or {}).get("band")} for d in res.detections]
    print(orjson.dumps({"cases": cases, "detections": dets}).decode())
"""


def run(folder: Path, policy: str, partitions: int, tmp: Path, hold: tuple[str, float] | None = None) -> dict[str, Any]:
    """One in-process run in its own process: its cases and detections. `hold`: (stream, seconds) delivered late."""
    name = (f"p{partitions}" + (f"_{hold[0]}_{hold[1]:g}" if hold else "")).replace(".", "_").replace("-", "m")
    extra = [f"{hold[0]}:{hold[1]!r}"] if hold else []
    res = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(folder), f"chdb://{tmp / name}", name, policy,
                          str(partitions), *extra], cwd=REPO, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed: {res.stderr[-2000:]}")
    return orjson.loads(res.stdout.strip().splitlines()[-1])


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Differences of `got` against `ref` (the single-partition run), by the chaos run's rules."""
    def subj(c: dict[str, Any]) -> tuple[str, str, str]:
        return (c["policy"], c["reason"], c["subject"])

    r_ids = {c["case_id"]: c for c in ref["cases"]}
    g_ids = {c["case_id"]: c for c in got["cases"]}
    moved, status, due = [], [], []
    for cid in sorted(r_ids.keys() & g_ids.keys()):
        a, b = r_ids[cid], g_ids[cid]
        ka, kb = a["knowledge_at"], b["knowledge_at"]
        if (ka is None) != (kb is None) or (ka is not None and abs(ka - kb) > WINDOW_S):
            moved.append({"case_id": cid, "subject": a["subject"], "ref": ka, "got": kb,
                          "delta_s": None if ka is None or kb is None else round(kb - ka, 2)})
        if a["status"] != b["status"]:
            status.append({"case_id": cid, "subject": a["subject"], "ref": a["status"], "got": b["status"]})
        if kb is not None and b["due_at"] is not None and abs(b["due_at"] - (kb + DUE_S)) > 1e-3:
            due.append(cid)
    d_ref = {d["detection_id"] for d in ref["detections"]}
    d_got = {d["detection_id"] for d in got["detections"]}
    return {"cases_ref": len(ref["cases"]), "cases": len(got["cases"]),
            "lost": [[cid, *subj(r_ids[cid]), r_ids[cid]["status"]] for cid in sorted(r_ids.keys() - g_ids.keys())],
            "extra": [[cid, *subj(g_ids[cid]), g_ids[cid]["status"]] for cid in sorted(g_ids.keys() - r_ids.keys())],
            "subjects_lost": sorted(map(list, {subj(c) for c in ref["cases"]} - {subj(c) for c in got["cases"]})),
            "subjects_extra": sorted(map(list, {subj(c) for c in got["cases"]} - {subj(c) for c in ref["cases"]})),
            "knowledge_at_moved": moved, "status_changed": status, "due_at_wrong": due,
            "detections_lost": sorted([d["detector"], d["account"], d["outcome"], d["reason"], d["event_time"]]
                                      for d in ref["detections"] if d["detection_id"] not in d_got),
            "detections_extra": sorted([d["detector"], d["account"], d["outcome"], d["reason"], d["event_time"]]
                                       for d in got["detections"] if d["detection_id"] not in d_ref)}


def same(diff: dict[str, Any]) -> bool:
    return not any(diff[k] for k in ("lost", "extra", "knowledge_at_moved", "status_changed", "due_at_wrong"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--policy", default="demo")
    ap.add_argument("--partitions", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tw-part-") as t, ThreadPoolExecutor(len(args.partitions)) as pool:
        futs = {p: pool.submit(run, args.folder, args.policy, p, Path(t)) for p in args.partitions}
        runs = {str(p): f.result() for p, f in futs.items()}
    ref_p = str(args.partitions[0])
    result = {"folder": str(args.folder), "policy": args.policy,
              "by_partitions": {str(p): compare(runs[ref_p], runs[str(p)]) for p in args.partitions[1:]},
              "runs": runs}
    for p, d in result["by_partitions"].items():
        print(f"{p} vs {ref_p} partitions: {d['cases']} vs {d['cases_ref']} cases, same={same(d)}")
        for k in ("lost", "extra", "knowledge_at_moved", "status_changed", "due_at_wrong", "detections_lost",
                  "detections_extra"):
            for x in d[k]:
                print(f"  {k}: {x}")
    if args.out:
        args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
