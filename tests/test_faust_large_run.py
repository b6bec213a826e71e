"""A run large enough to matter goes through a real worker: its account's engine entry, over a megabyte as JSON, is
written (compressed, and under the request size the producer is given), the worker drains and stops cleanly, and its
cases are the in-process core's.

Before: faust's producer refused any message over 1,000,000 bytes (its default request size), the refused changelog
write stopped the worker (pipeline/detect/changelog_writes.py), and it was refused again after every restart."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.cases.core import CaseBook
from pipeline.detect.batch import Msg, feed_partition, flush_partition
from pipeline.detect.tables import MemoryTable, StageTables
from pipeline.settings import Settings
from schemas.case import REPORTABLE_STATUSES
from schemas.policy import load_policy
from schemas.serde import encode
from tests.detector_builders import cip
from tests.test_faust_detect import REPO, drain_and_stop, produce, reap, rule, stage_topics, worker_cases
from tests.test_table_values import _window

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_a_large_runs_state_is_saved_and_its_case_opens(tmp_path: Path, kafka_bootstrap: str, unique_topic) -> None:
    ids = [(f"pod-{n:03d}-" + hashlib.sha256(str(n).encode()).hexdigest() * 10)[:600] for n in range(64)]
    rec = cip("acct-x")
    items = [("cip", b"acct-x", encode(rec))]
    items += [("windows", b"acct-x", encode(_window(wid, i))) for i in range(24) for wid in ids]
    app_id, db = f"lr-{uuid.uuid4().hex[:10]}", f"faust_{uuid.uuid4().hex[:10]}"
    topics = stage_topics(unique_topic, kafka_bootstrap, "lr", app_id)
    produce(kafka_bootstrap, topics, items)
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "TRAINWATCH_POLICY": "demo",
           "TRAINWATCH_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'worker-store'}", "TRAINWATCH_DATABASE": db,
           "TRAINWATCH_DATA_DIR": str(tmp_path / "var"), "TRAINWATCH_MODEL_PATH": "rule",
           **{f"TRAINWATCH_TOPICS__{s.upper()}": t for s, t in topics.items()}}
    env.pop("TRAINWATCH_CONFIG", None)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stage", "detect", "--app-id", app_id],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert drain_and_stop(kafka_bootstrap, app_id, topics, proc, log_path) == 0
        finally:
            reap(proc)
    text = log_path.read_text(errors="replace")
    assert "MessageSizeTooLarge" not in text and "changelog write" not in text, text[-3000:]

    # the reference: the same messages through the pure core, in one process
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
    expected = {(c.case_id, c.status, c.reason, c.account_id, c.knowledge_at)
                for c in CaseBook(policy).apply(dets, {"acct-x": rec}, 0.0).cases}
    assert expected and all(c[1] in REPORTABLE_STATUSES for c in expected), expected  # features-less: needs_review
    got = worker_cases(env["TRAINWATCH_CLICKHOUSE_DSN"], db)
    assert {tuple(c) for c in got["cases"]} == expected, text[-3000:]
