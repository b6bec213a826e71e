"""Compute totals are exact after kill -9 of the ingest stage on the real broker, with re-delivered samples (issue 12).

The stream carries what the simulator makes: samples delivered twice 1-120 s apart and late samples. The stage is
killed (SIGKILL) three times mid-stream and restarted from its commit; the windows it wrote, kept by window id as
the store keeps them (the latest emission), must give the uninterrupted in-process run's totals per account, and a
re-emitted window must equal its first emission. Before the commit point held recently emitted windows, a
duplicate read after a restart was counted again or replaced its whole window by a one-row window.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline.ingest import synth
from pipeline.ingest.stage import IngestCore, SourceMessage
from schemas.windows import WindowAggregate
from tests.test_ingest_kafka import T0, close_windows, kill_9_once_committed, produce, read_all, windows

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 40.0
PARTITIONS = 2


def redelivered_stream(seed: int = 5) -> list[tuple[bytes, bytes]]:
    """(node key, sample) in arrival order: 5 % delivered again 1-120 s later, 2 % arriving 2-5 min late."""
    specs = [synth.WorkloadSpec("wl-a", nodes=3, gpus_per_node=4, account_id="acct-a"),
             synth.WorkloadSpec("wl-b", nodes=2, gpus_per_node=2, account_id="acct-b")]
    rows = synth.samples(specs, T0, 1500, 10.0, seed=seed)
    rng = random.Random(seed)
    timed = []
    for r, pair in zip(rows, synth.native(rows), strict=True):
        timed.append((r["ts"] + (rng.uniform(120, 300) if rng.random() < 0.02 else 0.0), pair))
        if rng.random() < 0.05:
            timed.append((r["ts"] + rng.uniform(1, 120), pair))
    timed.sort(key=lambda x: x[0])
    return [pair for _, pair in timed]


def per_account(wins: list[WindowAggregate]) -> dict[str, float]:
    by_id = {w.window_id: w for w in wins if w.workload_id != "tick"}  # the store keeps the latest by window id
    out: dict[str, float] = defaultdict(float)
    for w in by_id.values():
        out[w.account_id or ""] += w.flop
    return dict(out)


def test_kill_9_mid_stream_keeps_totals_per_account_exact(kafka_bootstrap: str, unique_topic) -> None:
    tel, out, dlq = unique_topic("telemetry", partitions=PARTITIONS), unique_topic("windows"), unique_topic("dlq")
    pairs = redelivered_stream()
    produce(kafka_bootstrap, tel, pairs)
    close_windows(kafka_bootstrap, tel, PARTITIONS, T0 + 1500)
    group = f"ingest-kill9-{uuid.uuid4().hex}"
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "TRAINWATCH_TOPICS__TELEMETRY": tel,
           "TRAINWATCH_TOPICS__WINDOWS": out, "TRAINWATCH_TOPICS__DLQ": dlq, "TRAINWATCH_INGEST__BATCH_SIZE": "40",
           "TRAINWATCH_KAFKA__EXTRA": '{"group.instance.id": "ingest-k9", "session.timeout.ms": "10000"}'}
    cmd = [sys.executable, "-m", "pipeline", "ingest", "run", "--group", group]
    total = len(pairs)
    for share in (0.25, 0.5, 0.75):  # kill -9 once the stage has committed this share of the stream
        kill_9_once_committed(cmd, env, kafka_bootstrap, group, tel, PARTITIONS, share * total, DEADLINE_S)
    last = subprocess.run([*cmd, "--idle-exit", "3", "--max-seconds", str(DEADLINE_S)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=DEADLINE_S + 30)
    assert last.returncode == 0, last.stderr[-2000:]
    wins = windows(kafka_bootstrap, out)
    first: dict[str, WindowAggregate] = {}
    for w in wins:
        if w.window_id in first:  # a re-emitted window is the same window
            assert w.sample_count == first[w.window_id].sample_count
            assert w.flop == pytest.approx(first[w.window_id].flop, rel=1e-12)
        first.setdefault(w.window_id, w)
    # reference: every partition's messages in offset order, uninterrupted (the windows the ticks close)
    by_part: dict[int, list[bytes]] = defaultdict(list)
    for m in read_all(kafka_bootstrap, tel):
        by_part[m.partition()].append(m.value())
    core = IngestCore()
    ref: list[WindowAggregate] = []
    for p, values in sorted(by_part.items()):
        for i in range(0, len(values), 40):
            core.process(tel, p, [SourceMessage(i + j, v) for j, v in enumerate(values[i:i + 40])], time.time())
            ref += core.ready()
    assert core.counters["duplicates"] > 50
    want, got = per_account(ref), per_account(wins)
    assert got.keys() == want.keys()
    for acct, flop in want.items():
        assert got[acct] == pytest.approx(flop, rel=1e-12), acct
