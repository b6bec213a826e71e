"""An output topic deleted under a running detect worker, then made again: does the worker hold on, and are the cases
the replay's? (docs/faust.md "Limitations": a topic lost while the worker runs.)

The demo's windows, CIP records and allocations (as tests/test_faust_detect.py delivers them) to a detect worker on
a real broker: half, drained; then the named topic is deleted, the other half produced, `--hold` seconds waited
(the worker's liveness polled), the topic created again, everything drained, the worker stopped (SIGTERM). Its
cases are compared with the in-process replay's (case id, status, reason, subject, knowledge_at).

    python -m benchmarks.missing_topic [--topics detections cases] [--hold 60] [--bootstrap 127.0.0.1:9092]
        [--out benchmarks/results/missing_topic.json]

Needs the broker (`deploy/local/kafka.sh start`). Reuses the real-broker tests' helpers (tests/test_faust_detect.py):
the same delivery and the same comparison as the tests that run in CI.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.runner import InProcessPipeline
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from pipeline.store import Store
from schemas.policy import load_policy
from tests.test_faust_detect import (
    REPO,
    case_rows,
    delivery_order,
    drain_and_stop,
    drained,
    produce,
    read_topic,
    reap,
    rule,
    stage_topics,
    worker_cases,
    worker_env,
)


def _create(admin: AdminClient, name: str) -> None:
    deadline = time.monotonic() + 60
    while True:  # a topic just deleted can be refused for a moment (its deletion still in progress)
        try:
            admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(30)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def one(bootstrap: str, stream: str, hold_s: float, tmp: Path) -> dict[str, Any]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    made: list[str] = []

    def unique_topic(prefix: str, partitions: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result(30)
        made.append(name)
        return name

    folder = simulate("demo", tmp / "demo")
    items = delivery_order(folder)
    app_id, db = f"mt-{uuid.uuid4().hex[:10]}", f"faust_{uuid.uuid4().hex[:10]}"
    topics = stage_topics(unique_topic, bootstrap, "mt", app_id)
    env = worker_env(bootstrap, tmp, db, topics)
    produce(bootstrap, topics, items[:len(items) // 2])
    log_path = tmp / "worker.log"
    alive: list[bool] = []
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stage", "detect", "--app-id", app_id],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            drained(bootstrap, app_id, topics, proc, log_path)
            before = {m["message_id"] for m in read_topic(bootstrap, topics["cases"])}  # the feed as deleted
            admin.delete_topics([topics[stream]])[topics[stream]].result(30)
            t0 = time.monotonic()
            produce(bootstrap, topics, items[len(items) // 2:])
            while time.monotonic() - t0 < hold_s:
                time.sleep(2)
                alive.append(proc.poll() is None)
            _create(admin, topics[stream])
            back = time.monotonic()
            rc = drain_and_stop(bootstrap, app_id, topics, proc, log_path)
            drained_after_s = time.monotonic() - back
            after = {m["message_id"] for m in read_topic(bootstrap, topics["cases"])}
        finally:
            reap(proc)
            admin.delete_topics([*made, f"{app_id}-owners-repartition"])
    text = log_path.read_text(errors="replace")
    store = Store.connect(f"chdb://{tmp / 'replay-store'}", "replay")
    InProcessPipeline(store, load_policy("demo"), rule()).run(read_folder(folder))
    expected = case_rows(store)
    worker = worker_cases(env["TRAINWATCH_CLICKHOUSE_DSN"], db)
    got = {tuple(c) for c in worker["cases"]}
    # every case event reaches the feed once: on the topic as it was, or (deleted: the feed) on the one made again
    feed = (before | after) if stream == "cases" else after
    return {"topic": stream, "hold_s": hold_s, "alive_throughout": all(alive), "exit_code": rc,
            "drained_after_recreate_s": round(drained_after_s, 1), "cases_replay": len(expected),
            "cases_kafka": len(got), "lost": sorted(map(list, expected - got)),
            "extra": sorted(map(list, got - expected)),
            "case_events": len(set(worker["ids"])), "feed_messages_after_recreate": len(after),
            "case_events_not_on_the_feed": len(set(worker["ids"]) - feed),
            "log_topic_not_found_lines": text.count("not found in cluster metadata")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topics", nargs="+", default=["detections", "cases"],
                    help="streams whose topic is deleted (detections: detect's output and the cases agent's input; "
                         "cases: the compliance feed)")
    ap.add_argument("--hold", type=float, default=60.0)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    runs = []
    for stream in args.topics:
        with tempfile.TemporaryDirectory(prefix="tw-missing-") as t:
            r = one(args.bootstrap, stream, args.hold, Path(t))
        print(orjson.dumps(r).decode(), flush=True)
        runs.append(r)
    if args.out:
        args.out.write_bytes(orjson.dumps({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                           "runs": runs}, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
