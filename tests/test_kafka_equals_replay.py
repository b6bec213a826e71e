"""The production path gives the replay's answer: the demo through `trainwatch run --stage all` on the real broker,
with 1, 2 and 4 partitions, against the in-process replay of the same folder.

Asserted per partition count: the same (policy, subject, reason, run) cases with the same status and case id (case
ids are content ids, so two runs giving the same set give identical ids); knowledge_at within one window (60 s);
due_at = knowledge_at + 15 days; no extra case. Owner cases may be decided by another account of the owner when
the accounts sit on different partitions (docs/faust.md): their subject, reason and id must still agree, and
their knowledge_at is held to the same one-window bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from detectors.owner_aggregate import ALL_OWNERS, QUIET
from pipeline.runner import InProcessPipeline
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from schemas.policy import load_policy
from tests.test_faust_detect import lag, reap, rule, stage_topics, stop, wait_for
from tests.test_run_all import _produce_scenario

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
W = 60.0
IDLE_S = 12.0  # detect.owner_idle_s: held records and owners of quiet partitions are released after this


def _cases_by_key(rows: list[list]) -> dict[tuple, dict]:
    return {(r[0], r[1], r[2], r[3]): {"case_id": r[4], "status": r[5], "knowledge_at": r[6], "due_at": r[7],
                                       "account_id": r[8]} for r in rows}


_DUMP = ("import sys, orjson; from pipeline.store import Store\n"
         "s = Store.connect(sys.argv[1], sys.argv[2])\n"
         "print(orjson.dumps([[c.policy_id, c.beneficial_owner_id or c.account_id, c.reason, c.run_id, c.case_id,"
         " c.status, c.knowledge_at, c.due_at, c.account_id] for c in s.list_cases()]).decode())\n")


def high_watermarks(bootstrap: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"hw-{uuid.uuid4().hex}"})
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions)
    finally:
        c.close()


def all_quiet(bootstrap: str, owners: str, partitions: int) -> bool:
    """Whether the latest partition mark of every source partition on owners partition 0 is QUIET (marks go to
    every owners partition, in order after the messages they cover)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"marks-{uuid.uuid4().hex}", "enable.auto.commit": False})
    try:
        hi = c.get_watermark_offsets(TopicPartition(owners, 0), timeout=10)[1]
        c.assign([TopicPartition(owners, 0, 0)])
        latest: dict[int, float] = {}
        pos, deadline = 0, time.monotonic() + 30
        while pos < hi and time.monotonic() < deadline:
            for m in c.consume(1000, 1.0):
                if m.error() is not None:
                    continue
                pos = m.offset() + 1
                if m.key() == ALL_OWNERS.encode():
                    d = orjson.loads(m.value())
                    latest[d["partition"]] = d["wm"]
        return pos >= hi and all(latest.get(p) == QUIET for p in range(partitions))
    finally:
        c.close()


def _kafka_run(tmp: Path, bootstrap: str, unique_topic, folder: Path, partitions: int) -> dict[tuple, dict]:
    app_id = f"kr{partitions}-{uuid.uuid4().hex[:8]}"
    topics = stage_topics(unique_topic, bootstrap, f"kr{partitions}", app_id, partitions)
    topics["telemetry"] = unique_topic(f"kr{partitions}-telemetry")
    db, dsn = f"kr_{uuid.uuid4().hex[:10]}", f"chdb://{tmp / f'store{partitions}'}"
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "TRAINWATCH_POLICY": "demo",
           "TRAINWATCH_CLICKHOUSE_DSN": dsn, "TRAINWATCH_DATABASE": db, "TRAINWATCH_DATA_DIR": str(tmp / "var"),
           "TRAINWATCH_MODEL_PATH": "rule", "TRAINWATCH_DETECT__OWNER_IDLE_S": str(IDLE_S),
           "TRAINWATCH_TOPIC_CONFIG__PARTITIONS": str(partitions), "TRAINWATCH_TOPIC_CONFIG__TELEMETRY_PARTITIONS": "1",
           **{f"TRAINWATCH_TOPICS__{s.upper()}": t for s, t in topics.items()}}
    env.pop("TRAINWATCH_CONFIG", None)
    _produce_scenario(bootstrap, topics, folder)
    log_path = tmp / f"run{partitions}.log"
    cmd = [sys.executable, "-m", "pipeline", "run", "--stage", "all", "--app-id", app_id,
           "--ingest-group", f"{app_id}-ingest"]
    chain = [topics["windows"], topics["cip"], topics["allocations"], f"{app_id}-owners-repartition",
             topics["detections"]]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            seen: list[tuple[int, float]] = []

            def settled() -> bool:
                """The app has consumed everything, and ingest has produced no window for 8 s (the last open
                windows of a finite input are never closed by ingest: no later telemetry moves its watermark)."""
                made = high_watermarks(bootstrap, topics["windows"])
                if not seen or seen[-1][0] != made:
                    seen.append((made, time.monotonic()))
                return time.monotonic() - seen[-1][1] >= 8.0 and lag(bootstrap, app_id, chain) == 0

            wait_for(settled, "all consumed", proc, log_path, 240.0)
            # Held records and held owners of quiet partitions go after IDLE_S of no input: the quiet-partitions
            # timer releases a partition's held records, carries their outputs, then marks it QUIET to the owners.
            # Once every source partition's latest mark is QUIET and the chain has no lag, all of it is applied.
            owners = f"{app_id}-owners-repartition"
            wait_for(lambda: all_quiet(bootstrap, owners, partitions) and lag(bootstrap, app_id, chain) == 0,
                     "every partition marked quiet and all consumed after the idle release", proc, log_path,
                     4 * IDLE_S + 60.0)
            stop(proc, 60)
        finally:
            reap(proc)
    rows = orjson.loads(subprocess.run([sys.executable, "-c", _DUMP, dsn, db], cwd=REPO, capture_output=True,
                                       check=True, timeout=60).stdout)
    return _cases_by_key(rows)


def test_kafka_with_1_2_4_partitions_gives_the_replays_cases(tmp_path: Path, kafka_bootstrap: str, unique_topic,
                                                               store) -> None:
    folder = simulate("demo", tmp_path / "demo")
    InProcessPipeline(store, load_policy("demo"), rule()).run(read_folder(folder))
    script_rows = [[c.policy_id, c.beneficial_owner_id or c.account_id, c.reason, c.run_id, c.case_id, c.status,
                    c.knowledge_at, c.due_at, c.account_id] for c in store.list_cases()]
    want = _cases_by_key(script_rows)
    assert len(want) >= 6
    report: list[str] = []
    failures: list[str] = []
    for n in (1, 2, 4):
        got = _kafka_run(tmp_path, kafka_bootstrap, unique_topic, folder, n)
        missing, extra = want.keys() - got.keys(), got.keys() - want.keys()
        if missing or extra:
            failures.append(f"{n} partition(s): missing {sorted(missing)}, extra {sorted(extra)}")
        for k in sorted(want.keys() & got.keys(), key=str):
            a, b = want[k], got[k]
            dk = (None if a["knowledge_at"] is None or b["knowledge_at"] is None
                  else b["knowledge_at"] - a["knowledge_at"])
            report.append(f"{n}p {k[1]:>14} {k[2]:<18} {b['status']:<12} replay {a['status']:<12} "
                          f"dk={dk if dk is None else round(dk, 2)} via {b['account_id']}")
            if (a["case_id"], a["status"]) != (b["case_id"], b["status"]):
                failures.append(f"{n}p {k}: {b['case_id']} {b['status']} != replay {a['case_id']} {a['status']}")
            if (a["knowledge_at"] is None) != (b["knowledge_at"] is None) or (dk is not None and abs(dk) > W):
                failures.append(f"{n}p {k}: knowledge_at {b['knowledge_at']} vs replay {a['knowledge_at']}")
            if b["knowledge_at"] is not None and b["due_at"] != pytest.approx(b["knowledge_at"] + 15 * 86400.0):
                failures.append(f"{n}p {k}: due_at {b['due_at']} is not knowledge + 15 days")
    print("\n".join(report))
    assert not failures, "\n".join(failures + report)
