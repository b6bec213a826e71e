"""The faust detect + cases app on the real broker: kill -9 mid-stream, restart, same cases as in process, no dups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.detect.faust_app import owners_topic
from pipeline.ingest.aggregate import WindowConfig
from pipeline.ingest.stage import IngestCore, SourceMessage
from pipeline.runner import InProcessPipeline
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from pipeline.store import Store
from schemas.policy import load_policy
from schemas.serde import encode

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 60.0
BATCH = 5000  # the runner's default telemetry batch: the same windows close at the same places


def delivery_order(folder: Path) -> list[tuple[str, bytes, bytes]]:
    """(stream, key, value) for windows, CIP and allocations in the order the in-process runner meets them."""
    core = IngestCore(WindowConfig(), "native")
    out: list[tuple[str, bytes, bytes]] = []
    buf: list[SourceMessage] = []

    def flush() -> None:
        if buf:
            core.process("telemetry", 0, list(buf), now=time.time())
            buf.clear()
        out.extend(("windows", (w.account_id or w.workload_id).encode(), encode(w)) for w in core.ready())

    for rec in read_folder(folder):
        if rec.stream == "telemetry":
            buf.append(SourceMessage(rec.offset, rec.value))
            if len(buf) >= BATCH:
                flush()
            continue
        flush()
        acct = orjson.loads(rec.value).get("account_id", "") if rec.value.startswith(b"{") else ""
        out.append((rec.stream, str(acct).encode(), rec.value))
    flush()
    out.extend(("windows", (w.account_id or w.workload_id).encode(), encode(w)) for w in core.drain())
    return out


def produce(bootstrap: str, topics: dict[str, str], items: list[tuple[str, bytes, bytes]]) -> None:
    # lz4, as the ingest stage's producer writes windows: faust (aiokafka) must be able to read it.
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                  "compression.type": "lz4"})
    for stream, key, value in items:
        p.produce(topics[stream], value, key)
        p.poll(0)
    assert p.flush(30) == 0


def lag(bootstrap: str, group: str, topics: list[str]) -> int:
    """Messages not yet committed by `group`, summed in the order given (list topics upstream first: a lag of 0
    read on a later topic then covers what the earlier ones produced). A topic that does not exist yet: -1."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = []
        for t in topics:
            meta = c.list_topics(t, timeout=10).topics.get(t)
            if meta is None or meta.error is not None or not meta.partitions:
                return -1
            tps += [TopicPartition(t, p) for p in sorted(meta.partitions)]
        total = 0
        for tp in c.committed(tps, timeout=10):
            _, hi = c.get_watermark_offsets(tp, timeout=10)
            total += hi - max(tp.offset, 0)
        return total
    finally:
        c.close()


def read_topic(bootstrap: str, topic: str) -> list[dict]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}", "enable.auto.commit": False})
    try:
        _, hi = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        if hi == 0:
            return []
        c.assign([TopicPartition(topic, 0, 0)])
        out: list[dict] = []
        deadline = time.monotonic() + DEADLINE_S
        while len(out) < hi:
            assert time.monotonic() < deadline, f"read {len(out)}/{hi} of {topic}"
            out += [orjson.loads(m.value()) for m in c.consume(500, 1.0) if m.error() is None]
        return out
    finally:
        c.close()


def wait_for(cond: Callable[[], bool], what: str, proc: subprocess.Popen, log: Path,
             deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not cond():
        tail = log.read_text(errors="replace")[-3000:]
        assert proc.poll() is None, f"worker exited ({proc.returncode}) while waiting for {what}:\n{tail}"
        assert time.monotonic() < deadline, f"no {what} within {deadline_s} s:\n{tail}"
        time.sleep(0.5)


def case_rows(store: Store) -> set[tuple]:
    return {(c.case_id, c.status, c.reason, c.beneficial_owner_id or c.account_id, c.knowledge_at)
            for c in store.list_cases()}


def test_kill_and_restart_gives_the_same_cases_once(tmp_path: Path, kafka_bootstrap: str, unique_topic, store,
                                                    store_path: Path) -> None:
    folder = simulate("demo", tmp_path / "demo")
    items = delivery_order(folder)
    topics = {s: unique_topic(f"fd-{s}") for s in ("windows", "cip", "allocations", "detections", "cases")}
    app_id = f"fd-{uuid.uuid4().hex[:10]}"
    db = f"faust_{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "TRAINWATCH_POLICY": "demo",
           "TRAINWATCH_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'worker-store'}", "TRAINWATCH_DATABASE": db,
           **{f"TRAINWATCH_TOPICS__{s.upper()}": t for s, t in topics.items()}}
    env.pop("TRAINWATCH_CONFIG", None)
    cmd = [sys.executable, "-m", "pipeline", "run", "--stage", "detect", "--app-id", app_id]
    log_path = tmp_path / "worker.log"
    log = log_path.open("wb")

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    half = len(items) // 2
    produce(kafka_bootstrap, topics, items[:half])
    proc = start()
    try:
        # Mid-stream: some detections are out, the second half is not even produced yet.
        wait_for(lambda: bool(read_topic(kafka_bootstrap, topics["detections"])), "detections", proc, log_path)
        proc.kill()
        proc.wait(10)
        produce(kafka_bootstrap, topics, items[half:])
        proc = start()
        inputs = [topics["windows"], topics["cip"], topics["allocations"], owners_topic(app_id), topics["detections"]]
        wait_for(lambda: lag(kafka_bootstrap, app_id, inputs) == 0, "consumer lag 0", proc, log_path, 2 * DEADLINE_S)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()

    # The reference: the same folder in process, in this process's own chDB path.
    InProcessPipeline(store, load_policy("demo")).run(read_folder(folder))
    expected = case_rows(store)
    assert expected, "the demo scenario opens cases"
    feed = read_topic(kafka_bootstrap, topics["cases"])
    # The worker's store: a subprocess, since chDB allows one path per process.
    script = ("import sys, orjson; from pipeline.store import Store\n"
              "s = Store.connect(sys.argv[1], sys.argv[2])\n"
              "cs = [[c.case_id, c.status, c.reason, c.beneficial_owner_id or c.account_id, c.knowledge_at]"
              " for c in s.list_cases()]\n"
              "ev = s.query('SELECT count() n, uniqExact(event_id) u, groupArray(event_id) ids FROM case_events')[0]\n"
              "print(orjson.dumps({'cases': cs, 'n': ev['n'], 'u': ev['u'], 'ids': ev['ids']}).decode())\n")
    got = orjson.loads(subprocess.run([sys.executable, "-c", script, env["TRAINWATCH_CLICKHOUSE_DSN"], db],
                                      cwd=REPO, capture_output=True, check=True, timeout=60).stdout)
    assert {tuple(c) for c in got["cases"]} == expected, log_path.read_text(errors="replace")[-3000:]
    assert got["n"] == got["u"], "a case event was written twice"
    assert {m["message_id"] for m in feed} == set(got["ids"]), "feed (after dedup) != case events"


def test_owner_accounts_on_different_partitions_are_summed(tmp_path: Path, kafka_bootstrap: str, unique_topic,
                                                          store) -> None:
    """The demo's split owner (own-shared-7: acct-split-a and acct-split-b, each below the threshold alone) with its
    accounts on different partitions of 2-partition inputs: the owner case still opens; every other case equals the
    in-process runner's."""
    folder = simulate("demo", tmp_path / "demo")
    topics = {s: unique_topic(f"fo-{s}", partitions=2) for s in ("windows", "cip", "allocations")}
    topics |= {s: unique_topic(f"fo-{s}") for s in ("detections", "cases")}
    placed = {b"acct-split-a": 0, b"acct-split-b": 1}
    p = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for stream, key, value in delivery_order(folder):
        p.produce(topics[stream], value, key, partition=placed.get(key, zlib.crc32(key) % 2))
        p.poll(0)
    # Bad input on every input topic: a tombstone (null value) and broken JSON must be dead-lettered, not stop it.
    for stream in ("windows", "cip", "allocations"):
        p.produce(topics[stream], None, b"acct-x", partition=0)
        p.produce(topics[stream], b"{not json", b"acct-x", partition=1)
    assert p.flush(30) == 0
    app_id, db = f"fo-{uuid.uuid4().hex[:10]}", f"faust_{uuid.uuid4().hex[:10]}"
    dsn = f"chdb://{tmp_path / 'worker-store'}"
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "TRAINWATCH_POLICY": "demo",
           "TRAINWATCH_CLICKHOUSE_DSN": dsn, "TRAINWATCH_DATABASE": db, "TRAINWATCH_DATA_DIR": str(tmp_path / "var"),
           **{f"TRAINWATCH_TOPICS__{s.upper()}": t for s, t in topics.items()}}
    env.pop("TRAINWATCH_CONFIG", None)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stage", "detect", "--app-id", app_id],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            chain = [topics["windows"], topics["cip"], topics["allocations"], owners_topic(app_id),
                     topics["detections"]]
            wait_for(lambda: lag(kafka_bootstrap, app_id, chain) == 0, "consumer lag 0", proc, log_path,
                     2 * DEADLINE_S)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    InProcessPipeline(store, load_policy("demo")).run(read_folder(folder))
    expected = case_rows(store)
    script = ("import sys, orjson; from pipeline.store import Store\n"
              "s = Store.connect(sys.argv[1], sys.argv[2])\n"
              "print(orjson.dumps({'cases': [[c.case_id, c.status, c.reason, c.beneficial_owner_id or c.account_id,"
              " c.knowledge_at] for c in s.list_cases()], 'dead': sorted([d.topic, d.reason, d.raw.decode()]"
              " for d in s.dead_letters())}).decode())\n")
    worker = orjson.loads(subprocess.run([sys.executable, "-c", script, dsn, db], cwd=REPO, capture_output=True,
                                         check=True, timeout=60).stdout)
    got = {tuple(c) for c in worker["cases"]}
    tail = log_path.read_text(errors="replace")[-3000:]
    assert worker["dead"] == sorted([topics[s], "malformed_json", raw] for s in ("windows", "cip", "allocations")
                                    for raw in ("", "{not json")), tail

    def owner_case(rows: set[tuple]) -> list[tuple]:
        return [r for r in rows if r[2] == "owner_aggregate" and r[3] == "own-shared-7"]

    (want,) = owner_case(expected)
    (have,) = owner_case(got)  # absent when only each partition's own accounts were summed
    assert have[:4] == want[:4], tail
    # The owners agent decides in event time (contributions held until every member partition's watermark has
    # passed them), so the knowledge time is the in-process one, to within one window (60 s).
    print("owner case knowledge_at: kafka", have[4], "in process", want[4])
    assert abs(have[4] - want[4]) <= 60.0, (have, want)
    assert got - {have} == expected - {want}, tail
