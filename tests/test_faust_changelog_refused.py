"""A changelog write the broker refuses, on a real worker: it stops with the reason, commits nothing past the state it
could not save, and once the topic takes the writes a restart ends with the replay's cases.

The fault is the broker's own: the engine table's changelog is created with a `max.message.bytes` smaller than an
engine state, so such writes come back MESSAGE_TOO_LARGE (not retried). faust only logs a failed send: before
pipeline/detect/changelog_writes.py the worker went on and committed (~2,600 refused writes in 10 s). Now the write
is recorded, the worker stops and the offset commit refuses to move past it (`fetch_guard.commit_after_state`).

Written to exercise that, this test found a second loss: the restarted worker never read its CIP and allocation
partitions (no offset committed on them: faust dropped their first fetch and nothing sought them back), 2 runs in 4;
fetch_guard.redeliver_dropped seeks such records back.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

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
    reap,
    rule,
    stage_topics,
    worker_cases,
    worker_env,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SMALL = "300"  # bytes: below any engine state of the demo (a few KB), above nothing the worker must write first


@pytest.mark.parametrize("table_store", ["memory", "local"])
def test_a_refused_changelog_write_stops_the_worker_and_loses_nothing(tmp_path: Path, kafka_bootstrap: str,
                                                                      unique_topic, store, table_store: str) -> None:
    """On either table store: in memory (no group instance id, the default) and the local RocksDB copy (a stable
    worker id), whose restart loads what its DB holds and replays the changelog's tail."""
    folder = simulate("demo", tmp_path / "demo")
    app_id, db = f"fr-{uuid.uuid4().hex[:10]}", f"faust_{uuid.uuid4().hex[:10]}"
    topics = stage_topics(unique_topic, kafka_bootstrap, "fr", app_id)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    engine_log = f"{app_id}-engine-changelog"  # faust keeps a changelog topic it finds (its configs included)
    small = {"cleanup.policy": "compact", "max.message.bytes": SMALL}
    admin.create_topics([NewTopic(engine_log, 1, 1, config=small)])[engine_log].result(30)
    produce(kafka_bootstrap, topics, delivery_order(folder))
    env = worker_env(kafka_bootstrap, tmp_path, db, topics)
    if table_store == "local":
        env["TRAINWATCH_KAFKA__GROUP_INSTANCE_ID"] = app_id
    cmd = [sys.executable, "-m", "pipeline", "run", "--stage", "detect", "--app-id", app_id]
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(180)
            text = log_path.read_text(errors="replace")
            assert code != 0, f"the worker went on past a state it could not save:\n{text[-3000:]}"
            assert "changelog write of table engine failed" in text and "MessageSizeTooLarge" in text, text[-3000:]
            # The operator's fix: the topic takes engine states again. The restart reads from the last commit.
            big = ConfigResource("topic", engine_log, incremental_configs=[_set("max.message.bytes", "1048588")])
            admin.incremental_alter_configs([big])[big].result(30)
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            assert drain_and_stop(kafka_bootstrap, app_id, topics, proc, log_path) == 0
        finally:
            reap(proc)

    InProcessPipeline(store, load_policy("demo"), rule()).run(read_folder(folder))
    expected = case_rows(store)
    assert expected, "the demo scenario opens cases"
    got = worker_cases(env["TRAINWATCH_CLICKHOUSE_DSN"], db)
    assert {tuple(c) for c in got["cases"]} == expected, log_path.read_text(errors="replace")[-3000:]
    assert got["n"] == got["u"], "a case event was written twice"


def _set(name: str, value: str) -> ConfigEntry:
    return ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
