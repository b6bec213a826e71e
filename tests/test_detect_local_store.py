"""The detect app's local RocksDB table store (pipeline/detect/local_store.py) on the real broker: a worker holding
state is killed -9; its DB is readable at once (the LOCK went with the process) and equals the changelogs up to the
offset it records; the restart loads it, replays only the tail and gives the in-process runner's cases, once."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import rocksdict
from confluent_kafka import Consumer, TopicPartition

from pipeline.detect.config import table_store
from pipeline.detect.faust_app import owners_topic
from pipeline.detect.local_store import OFFSET_KEY, SYNCED_KEY
from pipeline.runner import InProcessPipeline
from pipeline.settings import KafkaSettings, Settings
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from pipeline.topics import changelog_topics
from schemas.policy import load_policy
from tests.test_faust_detect import (
    DEADLINE_S,
    REPO,
    case_rows,
    delivery_order,
    lag,
    produce,
    read_topic,
    reap,
    rule,
    stage_topics,
    stop,
    wait_for,
    worker_cases,
)


def test_store_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAINWATCH_TABLE_STORE", raising=False)
    assert table_store(Settings(data_dir=tmp_path), "a") == ("memory://", None)  # no worker identity: in memory
    url, tabledir = table_store(Settings(data_dir=tmp_path, kafka=KafkaSettings(group_instance_id="w/1")), "a")
    assert url == "trainwatch-local://" and tabledir == tmp_path / "a-data" / "tables-w_1"
    monkeypatch.setenv("TRAINWATCH_TABLE_STORE", "memory")  # the benchmark's baseline
    assert table_store(Settings(data_dir=tmp_path, kafka=KafkaSettings(group_instance_id="w")), "a")[0] == "memory://"


def changelog_state(bootstrap: str, topic: str, upto: int | None = None) -> dict[bytes, bytes]:
    """The compacted view of a 1-partition changelog (last value per key, tombstones removed), to offset `upto`."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}", "enable.auto.commit": False})
    try:
        _, hi = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        end = hi if upto is None else upto + 1
        state: dict[bytes, bytes] = {}
        if end == 0:
            return state
        c.assign([TopicPartition(topic, 0, 0)])
        pos = -1
        while pos < end - 1:
            for m in c.consume(500, 1.0):
                if m.error() is None and m.offset() < end:
                    if m.value() is None:
                        state.pop(m.key(), None)
                    else:
                        state[m.key()] = m.value()
                    pos = max(pos, m.offset())
        return state
    finally:
        c.close()


def db_state(path: Path) -> tuple[dict[bytes, bytes], int]:
    db = rocksdict.Rdict(str(path))  # raises if a LOCK were still held
    try:
        items = {k: v for k, v in db.items() if k not in (OFFSET_KEY, SYNCED_KEY)}
        return items, int(db[OFFSET_KEY])
    finally:
        db.close()


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("handover", [False, True], ids=["restart", "moved-away-and-back"])
def test_kill_9_keeps_a_consistent_local_store_and_the_restart_uses_it(tmp_path: Path, kafka_bootstrap: str,
                                                                        unique_topic, store, handover: bool) -> None:
    """restart: worker A holding state is killed -9 and restarted. moved-away-and-back: while A is dead, worker B
    (another id, no DB: a full replay) takes the partition and moves the tables on (tombstones included); A restarts
    on its older DB, replays from its offset and must end equal to the changelog (nothing stale left)."""
    folder = simulate("demo", tmp_path / "demo")
    items = delivery_order(folder)
    app_id = f"ls-{uuid.uuid4().hex[:10]}"
    topics = stage_topics(unique_topic, kafka_bootstrap, "ls", app_id)
    db = f"ls_{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "TRAINWATCH_POLICY": "demo",
           "TRAINWATCH_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'worker-store'}", "TRAINWATCH_DATABASE": db,
           "TRAINWATCH_MODEL_PATH": "rule", "TRAINWATCH_DATA_DIR": str(tmp_path / "var"),
           "TRAINWATCH_KAFKA__GROUP_INSTANCE_ID": app_id, "TRAINWATCH_KAFKA__SESSION_TIMEOUT_S": "6",
           **{f"TRAINWATCH_TOPICS__{s.upper()}": t for s, t in topics.items()}}
    env.pop("TRAINWATCH_CONFIG", None)
    env.pop("TRAINWATCH_TABLE_STORE", None)
    tables = tmp_path / "var" / f"{app_id}-data" / f"tables-{app_id}"
    cmd = [sys.executable, "-m", "pipeline", "run", "--stage", "detect", "--app-id", app_id]
    log_path = tmp_path / "worker.log"
    log = log_path.open("wb")
    inputs = [topics["windows"], topics["cip"], topics["allocations"], owners_topic(app_id), topics["detections"]]

    def start(worker_id: str = app_id) -> subprocess.Popen:
        log.write(f"===== start {worker_id}\n".encode())
        log.flush()
        return subprocess.Popen(cmd, env={**env, "TRAINWATCH_KAFKA__GROUP_INSTANCE_ID": worker_id}, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)

    half = len(items) // (3 if handover else 2)
    produce(kafka_bootstrap, topics, items[:half])
    proc = start()
    try:
        wait_for(lambda: lag(kafka_bootstrap, app_id, inputs) == 0, "first half consumed", proc, log_path,
                 2 * DEADLINE_S)
        proc.kill()  # SIGKILL, holding state
        proc.wait(10)
        held = {}
        for name in changelog_topics(app_id):
            table = name.removeprefix(f"{app_id}-").removesuffix("-changelog")
            got, offset = db_state(tables / f"{table}-0.rocks")
            assert got == changelog_state(kafka_bootstrap, name, offset), f"{table}: DB != changelog to {offset}"
            held[table] = len(got)
        assert held["engine"] > 0 and held["partials"] > 0, held
        if handover:
            produce(kafka_bootstrap, topics, items[half:2 * half])
            proc = start(f"{app_id}-b")
            wait_for(lambda: lag(kafka_bootstrap, app_id, inputs) == 0, "B consumed", proc, log_path, 2 * DEADLINE_S)
            proc.kill()
            proc.wait(10)
            log_b = log_path.read_text(errors="replace").rsplit("===== start", 1)[-1]
            assert "local store engine-0: 0 entries" in log_b, "B has no DB of its own: a full replay"
            after = changelog_state(kafka_bootstrap, f"{app_id}-partials-changelog")
            assert set(db_state(tables / "partials-0.rocks")[0]) - set(after), "B deleted nothing A holds"
            half *= 2
        produce(kafka_bootstrap, topics, items[half:])
        proc = start()
        wait_for(lambda: lag(kafka_bootstrap, app_id, inputs) == 0, "consumer lag 0", proc, log_path, 2 * DEADLINE_S)
        assert stop(proc, 30) is not None
    finally:
        reap(proc)
        log.close()
    restart = log_path.read_text(errors="replace").rsplit("===== start", 1)[-1]
    assert f"local store engine-0: {held['engine']} entries" in restart, restart[-3000:]
    for name in changelog_topics(app_id):  # after a clean stop: the DB is the whole changelog
        table = name.removeprefix(f"{app_id}-").removesuffix("-changelog")
        assert db_state(tables / f"{table}-0.rocks")[0] == changelog_state(kafka_bootstrap, name), table

    InProcessPipeline(store, load_policy("demo"), rule()).run(read_folder(folder))
    expected = case_rows(store)
    assert expected, "the demo scenario opens cases"
    feed = read_topic(kafka_bootstrap, topics["cases"])
    got = worker_cases(env["TRAINWATCH_CLICKHOUSE_DSN"], db)
    assert {tuple(c) for c in got["cases"]} == expected, restart[-3000:]
    assert got["n"] == got["u"], "a case event was written twice"
    assert {m["message_id"] for m in feed} == set(got["ids"]), "feed (after dedup) != case events"
