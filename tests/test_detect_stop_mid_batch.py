"""A detect worker stopped (SIGTERM) while a batch is half done loses none of it: the batch is read again.

faust's `take_events` acknowledges a batch's events in a `finally`, so an agent that leaves its loop by an exception
or a cancellation (a graceful stop, `app.crash`) would have the batch it was working on acknowledged, and the
commit on the way out would move past it: windows never stored, never in the engine state (pipeline/detect/
fetch_guard.py `withhold_acks_on_failure`). Made deterministic here: the store fails every call (the chaos run's fault
injection) while the second half of the demo arrives, so the detect agent is mid-batch, retrying the windows' insert,
when the worker is asked to stop. After a restart with the store back, every window partial produced is stored and
the cases are the in-process replay's."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest

from pipeline.runner import InProcessPipeline
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from schemas.policy import load_policy
from tests.test_faust_detect import (
    REPO,
    case_rows,
    delivery_order,
    drain_and_stop,
    produce,
    read_topic,
    reap,
    rule,
    stage_topics,
    stop,
    wait_for,
    worker_cases,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]



def stored_partials(dsn: str, db: str) -> set[str]:
    script = ("import sys, orjson; from pipeline.store import Store\n"
              "s = Store.connect(sys.argv[1], sys.argv[2])\n"
              "rows = s.query('SELECT DISTINCT window_id AS i FROM windows')\n"
              "print(orjson.dumps([r['i'] for r in rows]).decode())\n")
    return set(orjson.loads(subprocess.run([sys.executable, "-c", script, dsn, db], cwd=REPO, capture_output=True,
                                           check=True, timeout=60).stdout.splitlines()[-1]))


def test_stop_while_a_batch_waits_for_the_store_loses_none_of_it(tmp_path: Path, kafka_bootstrap: str,
                                                                 unique_topic, store) -> None:
    folder = simulate("demo", tmp_path / "demo")
    items = delivery_order(folder)
    app_id = f"sm-{uuid.uuid4().hex[:10]}"
    topics = stage_topics(unique_topic, kafka_bootstrap, "sm", app_id)
    db = f"stopmid_{uuid.uuid4().hex[:10]}"
    dsn = f"chdb://{tmp_path / 'worker-store'}"
    down = tmp_path / "store-down"
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "TRAINWATCH_POLICY": "demo",
           "TRAINWATCH_CLICKHOUSE_DSN": dsn, "TRAINWATCH_DATABASE": db, "TRAINWATCH_MODEL_PATH": "rule",
           **{f"TRAINWATCH_TOPICS__{s.upper()}": t for s, t in topics.items()}}
    env.pop("TRAINWATCH_CONFIG", None)
    cmd = [sys.executable, "-m", "pipeline", "run", "--stage", "detect", "--app-id", app_id,
           "--fault-store-down-file", str(down)]
    log_path = tmp_path / "worker.log"
    log = log_path.open("wb")
    half = len(items) // 2
    produce(kafka_bootstrap, topics, items[:half])
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: bool(read_topic(kafka_bootstrap, topics["detections"])), "detections", proc, log_path)
        down.touch()  # every store call fails from now on: the next batch stops at its windows' insert
        produce(kafka_bootstrap, topics, items[half:])
        wait_for(lambda: b"store unavailable during windows" in log_path.read_bytes(), "a batch waiting for the store",
                 proc, log_path)
        stop(proc, 60)  # a deployment's stop, the batch half done
        down.unlink()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        drain_and_stop(kafka_bootstrap, app_id, topics, proc, log_path)
    finally:
        reap(proc)
        log.close()

    produced = {orjson.loads(v)["window_id"] for s, _, v in items if s == "windows"}
    missing = produced - stored_partials(dsn, db)
    assert not missing, f"{len(missing)} of {len(produced)} window partials never stored:\n" + \
        log_path.read_text(errors="replace")[-6000:]
    InProcessPipeline(store, load_policy("demo"), rule()).run(read_folder(folder))
    assert {tuple(c) for c in worker_cases(dsn, db)["cases"]} == case_rows(store), \
        log_path.read_text(errors="replace")[-3000:]
