"""Restart-to-consuming time of a `run --stage all` worker after kill -9, with the classifier loaded eagerly (the
baseline, TRAINWATCH_BACKGROUND_CLASSIFIER=0) and in the background (the default, pipeline/classifier_loader.py),
in the same run, and where each restart's time went (pipeline/detect/startup.py phases: seconds after the kill,
process CPU seconds).

`python -m benchmarks.bench_recovery [--kills 3] [--stream-s 150]` writes `benchmarks/results/recovery.json`.

On the running broker (TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS, default 127.0.0.1:9092) with topics, app id and groups
of its own (deleted at the end): the demo folder is produced paced, one worker (static group membership) consumes
it, and is killed with kill -9 mid-stream and restarted at once, eager (baseline) and background in ABBA order
(changelogs grow along the stream), `--kills` times each.
Recovery = seconds from the kill until the detect app's group commits past what it had committed before,
polled every 0.25 s, as benchmarks/chaos.py measures it (its functions, imported).
The changelogs are created by `topics create` with the compaction configs (pipeline/topics.py) in both variants,
so the ratio isolates the classifier load; the load average at each kill is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka.admin import AdminClient

from benchmarks.chaos import PARTITIONS, REPO, RESULTS, ROLES, Worker, _consumer, _produce_paced, committed, ends
from pipeline.classifier_loader import BACKGROUND_ENV
from pipeline.detect.startup import phases

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


def _phases_since(log: Path, t_kill: float) -> dict[str, list[float]]:
    """The last start's startup phases (pipeline/detect/startup.py): [seconds after the kill, process CPU s]."""
    text = log.read_text(errors="replace").rsplit("===== start", 1)[-1]
    return {k: [round(at - t_kill, 2), cpu] for k, (at, cpu) in sorted(phases(text).items(), key=lambda kv: kv[1])}


def run(kills: int, stream_s: float, bootstrap: str, tmp: Path) -> dict:
    import subprocess

    from pipeline.simulator import simulate
    from pipeline.topics import changelog_topics

    folder = simulate("demo", tmp / "demo", seed=0)
    tag = uuid.uuid4().hex[:8]
    topics = {r: f"bench-rec-{tag}-{r}" for r in ROLES}
    app_id, group = f"bench-rec-{tag}", f"bench-rec-{tag}-ingest"
    env = {**os.environ, "TRAINWATCH_POLICY": "demo", "TRAINWATCH_DATA_DIR": str(tmp / "var"),
           "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "TRAINWATCH_CLICKHOUSE_DSN": f"chdb://{tmp / 'store'}",
           "TRAINWATCH_DATABASE": f"bench_{tag}", "TRAINWATCH_KAFKA__GROUP_INSTANCE_ID": f"bench-rec-{tag}",
           "TRAINWATCH_TOPIC_CONFIG__PARTITIONS": str(PARTITIONS), "TRAINWATCH_TOPIC_CONFIG__REPLICATION_FACTOR": "1",
           **{f"TRAINWATCH_TOPICS__{r.upper()}": t for r, t in topics.items()}}
    env.pop("TRAINWATCH_CONFIG", None)
    env.pop(BACKGROUND_ENV, None)
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
        for i in range(2 * kills):
            variant = "eager" if i % 4 in (0, 3) else "background"
            time.sleep(SETTLE_S)
            if done.is_set():
                print("[recovery] stream ended before every kill; use a longer --stream-s", file=sys.stderr)
                break
            load = os.getloadavg()[0]
            worker.env = {**env, BACKGROUND_ENV: "1" if variant == "background" else "0"}
            t_k, e_k = time.monotonic(), time.time()
            worker.kill9()
            # read after the kill: a commit the dying worker had in flight landed after a read before it (0.08 s)
            before = committed(dwatch, detect_in)
            worker.start()
            took = _wait_detect(dwatch, detect_in, worker, before, t_k, CAP_S)
            ph = _phases_since(worker.log_path, e_k)
            runs.append({"variant": variant, "resumed_s": took, "load1": round(load, 2),
                         "at_s": round(t_k - t0, 1), "phases_s": ph})
            print(f"[recovery] kill {i + 1}: {variant} resumed after {took} s (load {load:.1f}) {ph}", file=sys.stderr)
        logs = {n: ends(dwatch, [n]) for n in changelog_topics(app_id)}
    finally:
        done.wait(max(0.0, stream_s - (time.monotonic() - t0)) + 30.0)  # the producer ends before its topics go
        worker.stop()
        dwatch.close()
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for fut in admin.delete_topics(made, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result(30)

    def med(v: str) -> float | None:
        xs = [r["resumed_s"] for r in runs if r["variant"] == v and r["resumed_s"] is not None]
        return round(statistics.median(xs), 2) if xs else None

    eager, bg = med("eager"), med("background")
    return {"what": "seconds from kill -9 of `run --stage all` until the detect group commits again (median)",
            "bootstrap": bootstrap, "partitions": PARTITIONS, "stream_s": stream_s, "first_start_s": first,
            "eager_median_s": eager, "background_median_s": bg,
            "ratio_background_vs_eager": round(bg / eager, 2) if eager and bg else None,
            "runs": runs, "changelog_end_offsets": logs, "cpus": os.cpu_count(),
            "worker_restarts_on_own": len(worker.own_exits), "produced": counts}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3, help="kills per variant (eager, background), ABBA")
    ap.add_argument("--stream-s", type=float, default=150.0)
    args = ap.parse_args(argv)
    bootstrap = os.environ.get("TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as d:
        result = run(args.kills, args.stream_s, bootstrap, Path(d))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print(orjson.dumps({k: v for k, v in result.items() if k != "runs"}).decode())


if __name__ == "__main__":
    main()
