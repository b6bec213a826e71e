"""A run large enough to matter goes through a real worker: its account's engine entry, over a megabyte as JSON, is
written (compressed, and under the request size the producer is given), the worker drains and stops cleanly, and its
cases are the in-process core's.

Before: faust's producer refused any message over 1,000,000 bytes (its default request size), the refused changelog
write stopped the worker (pipeline/detect/changelog_writes.py), and it was refused again after every restart."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from pipeline.cases.core import CaseBook
from pipeline.detect.batch import Msg, feed_partition, flush_partition
from pipeline.detect.tables import MemoryTable, StageTables
from pipeline.ingest import synth
from pipeline.ingest.aggregate import WindowConfig
from pipeline.ingest.stage import IngestCore, SourceMessage
from pipeline.settings import Settings
from schemas.case import REPORTABLE_STATUSES
from schemas.policy import load_policy
from schemas.serde import encode
from tests.detector_builders import T0, cip
from tests.test_faust_detect import REPO, drain_and_stop, reap, rule, stage_topics, worker_cases, worker_env
from tests.test_table_values import _window

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _through_worker(tmp_path: Path, bootstrap: str, unique_topic, items: list[tuple[str, bytes, bytes]]
                    ) -> tuple[str, dict]:
    """`items` through a real detect worker (in-memory tables, the rule classifier) until drained, then stopped: its
    log, and its cases."""
    app_id, db = f"lr-{uuid.uuid4().hex[:10]}", f"faust_{uuid.uuid4().hex[:10]}"
    topics = stage_topics(unique_topic, bootstrap, "lr", app_id)
    # as `trainwatch topics create` makes it (8 MiB), and written as the ingest stage writes (its request size)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource("topic", topics["windows"], incremental_configs=[
        ConfigEntry("max.message.bytes", str(8 << 20), incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([res])[res].result(30)
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "compression.type": "lz4",
                  "message.max.bytes": 8 << 20})
    for stream, key, value in items:
        p.produce(topics[stream], value, key)
        p.poll(0)
    assert p.flush(30) == 0
    env = worker_env(bootstrap, tmp_path, db, topics)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stage", "detect", "--app-id", app_id],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert drain_and_stop(bootstrap, app_id, topics, proc, log_path) == 0
        finally:
            reap(proc)
    text = log_path.read_text(errors="replace")
    assert "MessageSizeTooLarge" not in text and "changelog write" not in text, text[-3000:]
    return text, worker_cases(env["TRAINWATCH_CLICKHOUSE_DSN"], db)


def _reference(items: list[tuple[str, bytes, bytes]], cips: dict) -> set[tuple]:
    """The cases of the same messages through the pure core, in one process, in batches as the worker takes them."""
    policy, names = load_policy("demo"), Settings().topics
    tabs = StageTables(MemoryTable(), MemoryTable(), Settings(model_path="rule"), policy, rule())
    topic_of = {"cip": names.cip, "windows": names.windows}
    msgs = [Msg(topic_of[s], 0, off, v) for off, (s, _k, v) in enumerate(items)]
    dets = []
    for at in range(0, len(msgs), 100):
        b = feed_partition(tabs, 0, msgs[at:at + 100], names, at=0.0)
        dets += b.out.detections
        tabs.save(0, b.stage)
    if (b := flush_partition(tabs, 0)) is not None:  # the worker's quiet-partition timer does this at the end
        dets += b.out.detections
    return {(c.case_id, c.status, c.reason, c.account_id, c.knowledge_at)
            for c in CaseBook(policy).apply(dets, cips, 0.0).cases}


def test_a_large_runs_state_is_saved_and_its_case_opens(tmp_path: Path, kafka_bootstrap: str, unique_topic) -> None:
    """64 workloads with 600-character ids over 24 windows: the account's engine entry is 1.08 MB as JSON."""
    ids = [(f"pod-{n:03d}-" + hashlib.sha256(str(n).encode()).hexdigest() * 10)[:600] for n in range(64)]
    rec = cip("acct-x")
    items = [("cip", b"acct-x", encode(rec))]
    items += [("windows", b"acct-x", encode(_window(wid, i))) for i in range(24) for wid in ids]
    text, got = _through_worker(tmp_path, kafka_bootstrap, unique_topic, items)
    expected = _reference(items, {"acct-x": rec})
    assert expected and all(c[1] in REPORTABLE_STATUSES for c in expected), expected  # features-less: needs_review
    assert {tuple(c) for c in got["cases"]} == expected, text[-3000:]


def test_the_window_of_a_24k_gpu_workload_goes_through(tmp_path: Path, kafka_bootstrap: str, unique_topic) -> None:
    """One workload on 3,072 nodes x 8 GPUs: its window (the ingest stage's, 1.7 MB: its device list) is read,
    kept in the partials table and applied; the worker ends with the core's cases."""
    spec = synth.WorkloadSpec("pretrain-" + "x" * 40, account_id="acct-x", nodes=3072, gpus_per_node=8)
    core = IngestCore(WindowConfig(), "native")
    core.process("telemetry", 0, [SourceMessage(i, v) for i, (_k, v) in
                                  enumerate(synth.native(synth.samples([spec], T0, 120, 30.0)))], now=time.time())
    wins = core.drain()
    assert max(len(encode(w)) for w in wins) > 1_000_000
    rec = cip("acct-x")
    items = [("cip", b"acct-x", encode(rec))] + [("windows", b"acct-x", encode(w)) for w in wins]
    # a small workload's later windows (far below any threshold) move the partition's event time on: the big
    # windows settle and are applied (the worker flushes what still settles only after its input has been idle)
    tick = {"account_id": "acct-t", "flop": 1e9}
    items += [("windows", b"acct-t", encode(_window("tick", i).model_copy(update=tick))) for i in range(3, 8)]
    text, got = _through_worker(tmp_path, kafka_bootstrap, unique_topic, items)
    assert {tuple(c) for c in got["cases"]} == _reference(items, {"acct-x": rec}), text[-3000:]
