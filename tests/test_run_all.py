"""`trainwatch run --stage all` end to end on the real broker: native telemetry in, cases on the feed and in the store.

The ingest stage (thread) turns telemetry into windows, the faust worker detects and opens cases; SIGTERM stops
both cleanly (exit 0), and what the feed carries is what the store holds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from pipeline.simulator import simulate
from pipeline.sources import read_folder
from tests.test_faust_detect import read_topic, reap, stop, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
STREAMS = ("telemetry", "windows", "cip", "allocations", "detections", "cases", "dlq")


def _produce_scenario(bootstrap: str, topics: dict[str, str], folder: Path) -> int:
    """Every record of the folder to its raw topic in delivery order; side records keyed by account."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4"})
    n = 0
    for rec in read_folder(folder):
        key = None
        if rec.stream != "telemetry" and rec.value.startswith(b"{"):
            key = str(orjson.loads(rec.value).get("account_id", "")).encode()
        p.produce(topics[rec.stream], rec.value, key)
        n += 1
        if n % 10_000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    return n


def _cases_on_feed(bootstrap: str, topic: str) -> dict[str, dict]:
    return {m["case"]["case_id"]: m for m in read_topic(bootstrap, topic)}


def test_run_all_opens_cases_and_stops_cleanly(tmp_path: Path, kafka_bootstrap: str, unique_topic) -> None:
    folder = simulate("demo", tmp_path / "demo")
    topics = {s: unique_topic(f"ra-{s}") for s in STREAMS}
    app_id, db = f"ra-{uuid.uuid4().hex[:10]}", f"runall_{uuid.uuid4().hex[:10]}"
    dsn = f"chdb://{tmp_path / 'store'}"
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "TRAINWATCH_POLICY": "demo",
           "TRAINWATCH_CLICKHOUSE_DSN": dsn, "TRAINWATCH_DATABASE": db, "TRAINWATCH_DATA_DIR": str(tmp_path / "var"),
           "TRAINWATCH_MODEL_PATH": "rule", **{f"TRAINWATCH_TOPICS__{s.upper()}": t for s, t in topics.items()}}
    env.pop("TRAINWATCH_CONFIG", None)
    with socket.socket() as sock:  # a free port for the worker's /metrics
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env["TRAINWATCH_DETECT__METRICS_PORT"] = str(port)
    assert _produce_scenario(kafka_bootstrap, topics, folder) > 100_000
    log_path = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "pipeline", "run", "--stage", "all", "--app-id", app_id,
           "--ingest-group", f"{app_id}-ingest"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            # The foreign pretraining run (acct-de-ai) crosses the threshold within the demo's first hours.
            wait_for(lambda: any(m["case"]["account_id"] == "acct-de-ai"
                                 for m in _cases_on_feed(kafka_bootstrap, topics["cases"]).values()),
                     "a case for acct-de-ai on the feed", proc, log_path, 90.0)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            # It stops in ~2 s; its stop watchdog (pipeline/shutdown.py, stop_timeout_s 25 s) bounds a hung stop
            # and writes every thread's stack into the log, which a failure below shows.
            rc = stop(proc, 90)
        finally:
            reap(proc)
    tail = log_path.read_text(errors="replace")[-3000:]
    assert rc == 0, f"run --stage all exited {rc} on SIGTERM:\n{tail}"
    assert read_topic(kafka_bootstrap, topics["windows"]), "the ingest thread wrote no windows"
    feed = read_topic(kafka_bootstrap, topics["cases"])
    # The worker's store, read after it exited (chDB: one process per path).
    script = ("import sys, orjson; from pipeline.store import Store\n"
              "s = Store.connect(sys.argv[1], sys.argv[2])\n"
              "cs = {c.case_id: [c.account_id, c.status] for c in s.list_cases()}\n"
              "ids = [r['event_id'] for r in s.query('SELECT event_id FROM case_events')]\n"
              "print(orjson.dumps({'cases': cs, 'ids': ids}).decode())\n")
    got = orjson.loads(subprocess.run([sys.executable, "-c", script, dsn, db], cwd=REPO, capture_output=True,
                                      check=True, timeout=60).stdout)
    assert any(acct == "acct-de-ai" for acct, _ in got["cases"].values()), tail
    assert {m["case"]["case_id"] for m in feed} <= set(got["cases"]), "a feed case is missing from the store"
    assert {m["message_id"] for m in feed} <= set(got["ids"]), "a feed message has no case event in the store"
    assert "Traceback" not in tail, tail
    # The worker's /metrics counted what it did: detections per detector, case events, each stage's event time.
    assert 'trainwatch_detections_total{detector="compute_threshold"' in metrics, metrics
    events = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("trainwatch_case_events_total{")]
    assert events and sum(events) >= 1, metrics
    assert 'trainwatch_stage_event_time_lag_seconds{stage="detect"}' in metrics
    assert 'trainwatch_stage_event_time_lag_seconds{stage="cases"}' in metrics
