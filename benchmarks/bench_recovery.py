"""Restart-to-consuming time of a `run --stage all` worker after kill -9 with the detect tables in memory (the
baseline, TRAINWATCH_TABLE_STORE=memory: a restart replays every changelog in full) and in the local RocksDB store
(the default for a worker with a group.instance.id, pipeline/detect/local_store.py: a restart loads its DB and
replays the changelogs' tail), in the same run, at a small and a large state, and where each restart's time went
(pipeline/detect/startup.py phases: seconds after the kill, process CPU seconds).

`python -m benchmarks.bench_recovery [--scenario scope] [--stream-s 300] [--at 25,150,260]` writes
`benchmarks/results/recovery.json`.

On the running broker (TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS, default 127.0.0.1:9092) with topics, app id and groups
of its own (deleted at the end): the scenario's folder is produced paced over `--stream-s`, one worker (static
group membership) consumes it; at each `--at` point (seconds after the first commit) it is killed -9 and restarted
three times in a row: memory store, local store (its DB's tail is what the memory worker wrote meanwhile:
`local_after_memory`), local store again (the steady case, `local`), so all meet the same state.
Recovery = seconds from the kill until the detect app's group commits past what it had committed before,
polled every 0.25 s, as benchmarks/chaos.py measures it (its functions, imported). The state at each kill is the
changelogs' end offsets (what a memory restart replays) and the entries the local store loaded from its DBs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka.admin import AdminClient

from benchmarks.chaos import (
    PARTITIONS,
    REPO,
    RESULTS,
    ROLES,
    Worker,
    _consumer,
    _produce_paced,
    committed,
    ends,
    phases_since,
)
from pipeline.classifier_loader import BACKGROUND_ENV
from pipeline.detect.config import STORE_ENV

CAP_S = 60.0
SETTLE_S = 4.0  # after a recovery, before the next kill: the new worker has committed and runs normally


def _wait_detect(c, detect_in: list[str], worker: Worker, before: int, t_from: float, cap_s: float) -> float | None:
    while time.monotonic() - t_from < cap_s:
        worker.supervise()
        now = committed(c, detect_in)
        if now > before >= 0:
            return round(time.monotonic() - t_from, 2)
        time.sleep(0.25)
    return None


def _loaded(log: Path) -> tuple[int, int]:
    """(entries the local store loaded, partitions) from the last start's log (0, 0 for the memory store)."""
    text = log.read_text(errors="replace").rsplit("===== start", 1)[-1]
    ns = [int(m) for m in re.findall(r"local store [\w-]+: (\d+) entries", text)]
    return sum(ns), len(ns)


def run(scenario: str, at: list[float], stream_s: float, bootstrap: str, tmp: Path) -> dict:
    import subprocess

    from pipeline.simulator import simulate
    from pipeline.topics import changelog_topics

    folder = simulate(scenario, tmp / scenario, seed=0)
    tag = uuid.uuid4().hex[:8]
    topics = {r: f"bench-rec-{tag}-{r}" for r in ROLES}
    app_id, group = f"bench-rec-{tag}", f"bench-rec-{tag}-ingest"
    env = {**os.environ, "TRAINWATCH_POLICY": "demo",
           "TRAINWATCH_DATA_DIR": str(tmp / "var"),
           "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "TRAINWATCH_CLICKHOUSE_DSN": f"chdb://{tmp / 'store'}",
           "TRAINWATCH_DATABASE": f"bench_{tag}", "TRAINWATCH_KAFKA__GROUP_INSTANCE_ID": f"bench-rec-{tag}",
           "TRAINWATCH_TOPIC_CONFIG__PARTITIONS": str(PARTITIONS), "TRAINWATCH_TOPIC_CONFIG__REPLICATION_FACTOR": "1",
           **{f"TRAINWATCH_TOPICS__{r.upper()}": t for r, t in topics.items()}}
    for k in ("TRAINWATCH_CONFIG", BACKGROUND_ENV, STORE_ENV):
        env.pop(k, None)
    made = [*topics.values(), f"{app_id}-owners-repartition", *changelog_topics(app_id)]
    res = subprocess.run([sys.executable, "-m", "pipeline", "topics", "create", "--app-id", app_id], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise SystemExit(f"topics create failed: {res.stderr[-2000:]}")
    worker = Worker([sys.executable, "-m", "pipeline", "run", "--stage", "all", "--app-id", app_id,
                     "--ingest-group", group], env, tmp / "worker.log")
    dwatch = _consumer(bootstrap, app_id)
    detect_in = [topics["windows"], topics["cip"], topics["allocations"], f"{app_id}-owners-repartition"]
    done, counts = threading.Event(), {}
    producer = threading.Thread(target=_produce_paced, args=(bootstrap, topics, folder, stream_s, done, counts),
                                daemon=True)
    runs: list[dict] = []
    t0 = time.monotonic()
    try:
        worker.start()
        producer.start()
        first = _wait_detect(dwatch, detect_in, worker, 0, t0, 180.0)
        t_first = time.monotonic()
        for n, point in enumerate(at):
            time.sleep(max(0.0, t_first + point - time.monotonic()))
            # memory first; the first local restart then replays what the memory worker wrote since (its DB's tail
            # is that long: `local_after_memory`); the second is the steady case (`local`: its DB is current)
            for variant in ("memory", "local_after_memory", "local"):
                time.sleep(SETTLE_S)
                if done.is_set():
                    print("[recovery] stream ended before every kill; use a longer --stream-s", file=sys.stderr)
                    break
                load = os.getloadavg()[0]
                worker.env = {**env, STORE_ENV: variant.split("_")[0]}
                state = {c: ends(dwatch, [c]) for c in changelog_topics(app_id)}
                t_k, e_k = time.monotonic(), time.time()
                worker.kill9()
                # read after the kill: a commit the dying worker had in flight landed after a read before it (0.08 s)
                before = committed(dwatch, detect_in)
                worker.start()
                took = _wait_detect(dwatch, detect_in, worker, before, t_k, CAP_S)
                ph = phases_since(worker.log_path, e_k)
                loaded, parts = _loaded(worker.log_path)
                runs.append({"variant": variant, "point": n, "resumed_s": took, "load1": round(load, 2),
                             "at_s": round(t_k - t0, 1), "changelog_messages": sum(state.values()),
                             "local_entries_loaded": loaded, "local_dbs": parts, "phases_s": ph})
                print(f"[recovery] point {n} ({round(t_k - t0)} s, changelogs {sum(state.values())}): {variant} "
                      f"resumed after {took} s (load {load:.1f}, loaded {loaded}) {ph}", file=sys.stderr)
        logs = {n: ends(dwatch, [n]) for n in changelog_topics(app_id)}
    finally:
        done.wait(max(0.0, stream_s - (time.monotonic() - t0)) + 30.0)  # the producer ends before its topics go
        worker.stop()
        dwatch.close()
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for fut in admin.delete_topics(made, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result(30)

    def med(v: str, point: int | None = None) -> float | None:
        xs = [r["resumed_s"] for r in runs if r["variant"] == v and r["resumed_s"] is not None
              and (point is None or r["point"] == point)]
        return round(statistics.median(xs), 2) if xs else None

    per_point = []
    for n in sorted({r["point"] for r in runs}):
        m, loc = med("memory", n), med("local", n)
        msgs = max(r["changelog_messages"] for r in runs if r["point"] == n)
        per_point.append({"point": n, "changelog_messages": msgs, "memory_s": m, "local_s": loc,
                          "local_after_memory_s": med("local_after_memory", n),
                          "ratio_local_vs_memory": round(loc / m, 2) if m and loc else None})
    mem, loc = med("memory"), med("local")
    return {"what": "seconds from kill -9 of `run --stage all` until the detect group commits again: tables in memory "
                    "(full changelog replay) vs the local RocksDB store (tail replay), same run, same state",
            "scenario": scenario, "bootstrap": bootstrap, "partitions": PARTITIONS, "stream_s": stream_s,
            "first_start_s": first, "per_point": per_point, "memory_median_s": mem, "local_median_s": loc,
            "ratio_local_vs_memory": round(loc / mem, 2) if mem and loc else None,
            "runs": runs, "changelog_end_offsets": logs, "cpus": os.cpu_count(),
            "worker_restarts_on_own": len(worker.own_exits), "own_exits": worker.own_exits, "produced": counts}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=("demo", "scope"), default="scope")
    ap.add_argument("--stream-s", type=float, default=300.0)
    ap.add_argument("--keep-log", type=Path, default=None, help="copy the worker's log here at the end")
    ap.add_argument("--at", default="25,150,260", help="kill points, seconds after the first commit (comma-separated)")
    args = ap.parse_args(argv)
    bootstrap = os.environ.get("TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as d:
        try:
            result = run(args.scenario, [float(x) for x in args.at.split(",")], args.stream_s, bootstrap, Path(d))
        finally:
            if args.keep_log and (Path(d) / "worker.log").exists():
                shutil.copy(Path(d) / "worker.log", args.keep_log)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print(orjson.dumps({k: v for k, v in result.items() if k != "runs"}).decode())


if __name__ == "__main__":
    main()
