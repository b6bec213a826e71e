"""The ingest stage on the real broker: every decoder end to end, dead letters, late data, duplicates, kill -9."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from detectors.catalog import resolve
from pipeline.ingest import synth
from pipeline.ingest.aggregate import WindowConfig
from pipeline.ingest.kafka_stage import KafkaIngestStage
from pipeline.ingest.stage import IngestCore, SourceMessage
from pipeline.settings import IngestSettings, KafkaSettings, Settings, TopicSettings
from schemas.serde import decode, encode
from schemas.windows import WindowAggregate

pytestmark = pytest.mark.kafka

DEADLINE_S = 60.0
REPO = Path(__file__).resolve().parent.parent
T0 = math.floor(time.time() / 60) * 60 - 3600.0  # an hour ago, on a window boundary
SPECS = [synth.WorkloadSpec("wl-a", nodes=3, gpus_per_node=4), synth.WorkloadSpec("wl-b", nodes=2, gpus_per_node=2,
                                                                                  account_id="acct-2")]


def produce(bootstrap: str, topic: str, pairs: list[tuple[bytes | None, bytes]], partition: int | None = None) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for k, v in pairs:
        while True:
            try:
                if partition is None:
                    p.produce(topic, v, k)
                else:
                    p.produce(topic, v, k, partition=partition)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    assert p.flush(30) == 0


def close_windows(bootstrap: str, topic: str, partitions: int, after: float, fmt: str = "native") -> int:
    """Samples of a 'tick' workload on two nodes per partition, far enough ahead that the watermark passes every
    window (the watermark follows the time two nodes confirm: one node alone does not move it)."""
    n = 0
    for part in range(partitions):
        ticks = [{"ts": after + 120.0, "node": f"tick-{part}-{k}", "device": f"tick-{part}-{k}", "workload_id": "tick",
                  "accelerator": "tick", "gpu_util": 0.0} for k in range(2)]
        msgs = getattr(synth, fmt)(ticks)
        produce(bootstrap, topic, msgs, partition=part)
        n += len(msgs)
    return n


def read_all(bootstrap: str, topic: str) -> list:
    """Every message now in `topic` (up to the high watermarks), with a deadline."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        highs = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        got, pos = [], dict.fromkeys(parts, 0)
        deadline = time.monotonic() + DEADLINE_S
        while any(pos[p] < highs[p] for p in parts):
            assert time.monotonic() < deadline, f"read {len(got)} of {sum(highs.values())} from {topic}"
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    got.append(m)
                    pos[m.partition()] = m.offset() + 1
        return got
    finally:
        c.close()


def windows(bootstrap: str, topic: str) -> list[WindowAggregate]:
    return [decode(WindowAggregate, m.value()) for m in read_all(bootstrap, topic)]


def totals(wins: list[WindowAggregate]) -> dict:
    by_id = {w.window_id: w for w in wins if w.workload_id != "tick"}
    out = {k: sum(getattr(w, k) for w in by_id.values()) for k in ("flop", "flop_high", "device_seconds",
                                                                    "sample_count")}
    out["interval_unknown"] = sum(w.sums.get("samples.interval_unknown", 0.0) for w in by_id.values())
    return out


def reference(values: list[bytes], decoder: str) -> dict:
    core = IngestCore(WindowConfig(), decoder=decoder)
    core.process("ref", 0, [SourceMessage(i, v) for i, v in enumerate(values)], time.time())
    return totals(core.drain())


def make_settings(bootstrap: str, telemetry: str, out: str, dlq: str, decoder: str = "native",
                  batch: int = 500) -> Settings:
    return Settings(kafka=KafkaSettings(bootstrap_servers=bootstrap),
                    topics=TopicSettings(telemetry=telemetry, windows=out, dlq=dlq),
                    ingest=IngestSettings(decoder=decoder, batch_size=batch))


def run_stage(settings: Settings, n_messages: int, group: str | None = None) -> KafkaIngestStage:
    stage = KafkaIngestStage(settings, group_id=group or f"ingest-{uuid.uuid4().hex}")
    stage.run(max_seconds=DEADLINE_S, stop=lambda: stage.stats.messages >= n_messages)
    assert stage.stats.messages == n_messages
    return stage


@pytest.fixture
def topics(unique_topic):
    return unique_topic("telemetry", partitions=3), unique_topic("windows", partitions=2), unique_topic("dlq")


@pytest.mark.parametrize("fmt", ["native", "columnar", "otlp", "prometheus"])
def test_each_decoder_end_to_end(kafka_bootstrap: str, topics, fmt: str) -> None:
    tel, out, dlq = topics
    rows = synth.samples(SPECS, T0, 240, 10.0, with_interval=fmt in ("native", "columnar"))
    pairs = getattr(synth, fmt)(rows)
    decoder = {"otlp": "otlp_json", "prometheus": "prometheus_json"}.get(fmt, "native")
    produce(kafka_bootstrap, tel, pairs)
    ticks = close_windows(kafka_bootstrap, tel, 3, T0 + 240, fmt)
    stage = run_stage(make_settings(kafka_bootstrap, tel, out, dlq, decoder), len(pairs) + ticks)
    wins = windows(kafka_bootstrap, out)
    got, want = totals(wins), reference([v for _, v in pairs], decoder)
    if got["interval_unknown"] or want["interval_unknown"]:
        # no interval_s: a device's first sample takes the gap to its next one in the same batch; batches differ
        # here, so some first samples have no known interval (0 s in the point, max_interval_s in the high)
        assert got["device_seconds"] + 10.0 * got["interval_unknown"] == pytest.approx(
            want["device_seconds"] + 10.0 * want["interval_unknown"])
        assert fmt in ("otlp", "prometheus") and got["interval_unknown"] <= sum(s.nodes * s.gpus_per_node
                                                                                for s in SPECS)
        if not want["interval_unknown"]:  # widened, never invented
            assert got["flop"] <= want["flop"] * (1 + 1e-9) and want["flop"] <= got["flop_high"]
    else:
        assert got == pytest.approx(want, rel=1e-9)
    assert got["sample_count"] == len(rows)
    if fmt in ("native", "columnar"):  # intervals given: the per-sample formula exactly
        peak = resolve(SPECS[0].accelerator).peak(None)
        assert got["flop"] == pytest.approx(sum(10.0 * peak * r["tensor_active"] for r in rows), rel=1e-9)
    assert {w.account_id for w in wins if w.workload_id != "tick"} == {"acct-1", "acct-2"}
    assert read_all(kafka_bootstrap, dlq) == []
    assert stage.stats.commits >= 1


def test_dead_letters_carry_reason_and_provenance(kafka_bootstrap: str, topics) -> None:
    tel, out, dlq = topics
    rows = synth.samples(SPECS[:1], T0, 30, 10.0)
    cols = [orjson.loads(v) for _, v in synth.columnar(rows)]
    cols[0]["metrics"]["gpu_util"][0] = 250.0
    bad = [b"\x00garbage", orjson.dumps(cols[0]), orjson.dumps(dict(rows[0], ts=time.time() + 5 * 86_400)),
           orjson.dumps({k: v for k, v in rows[1].items() if k != "workload_id"}),
           orjson.dumps(dict(rows[2], surprise=1))]
    produce(kafka_bootstrap, tel, [(b"n", v) for v in bad], partition=1)
    stage = run_stage(make_settings(kafka_bootstrap, tel, out, dlq), len(bad))
    letters = read_all(kafka_bootstrap, dlq)
    got = sorted((dict(m.headers())["dlq.reason"].decode(), int(dict(m.headers())["dlq.offset"])) for m in letters)
    assert got == sorted([("malformed_json", 0), ("out_of_range", 1), ("future_timestamp", 2), ("missing_id", 3),
                          ("schema_violation", 4)])
    for m in letters:
        h = {k: v.decode() for k, v in m.headers()}
        assert h["dlq.topic"] == tel and h["dlq.partition"] == "1" and h["dlq.detail"]
        if h["dlq.reason"] == "malformed_json":
            assert m.value() == b"\x00garbage"
        if h["dlq.reason"] == "out_of_range":
            assert h["dlq.row"] == "0" and orjson.loads(m.value())["gpu_util"] == 250.0
    assert stage.core.counters["dlq.out_of_range"] == 1 and stage.core.counters["dlq.malformed_json"] == 1


def test_late_data_corrections_sum_to_the_in_order_run(kafka_bootstrap: str, topics) -> None:
    tel, out, dlq = topics
    rows = synth.samples(SPECS, T0, 480, 10.0)
    pairs = synth.native(rows)
    late = pairs[: len(pairs) // 5]
    shuffled = pairs[len(pairs) // 5 : len(pairs) // 2] + late + pairs[len(pairs) // 2 :]
    produce(kafka_bootstrap, tel, shuffled)
    ticks = close_windows(kafka_bootstrap, tel, 3, T0 + 480)
    run_stage(make_settings(kafka_bootstrap, tel, out, dlq, batch=200), len(pairs) + ticks)
    wins = windows(kafka_bootstrap, out)
    assert any(w.revision > 0 for w in wins)
    assert totals(wins) == pytest.approx(reference([v for _, v in pairs], "native"), rel=1e-9)


def test_duplicates_are_counted_once(kafka_bootstrap: str, topics) -> None:
    tel, out, dlq = topics
    rows = synth.samples(SPECS, T0, 240, 10.0)
    pairs = synth.native(rows)
    resent = pairs + pairs[50:350]  # an at-least-once producer retried a stretch
    produce(kafka_bootstrap, tel, resent)
    ticks = close_windows(kafka_bootstrap, tel, 3, T0 + 240)
    stage = run_stage(make_settings(kafka_bootstrap, tel, out, dlq), len(resent) + ticks)
    assert stage.core.counters["duplicates"] == 300
    assert totals(windows(kafka_bootstrap, out)) == pytest.approx(reference([v for _, v in pairs], "native"),
                                                                  rel=1e-9)


def kill_9_once_committed(cmd: list[str], env: dict[str, str], bootstrap: str, group: str, topic: str,
                          partitions: int, at_least: float, deadline_s: float = 40.0) -> None:
    """Start the ingest stage `cmd`, wait (with a deadline) until its group committed `at_least` messages of `topic`,
    then kill -9 it."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + deadline_s
        while _committed(bootstrap, group, topic, partitions) < at_least:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, f"the stage did not commit {at_least:g} messages"
            time.sleep(0.05)  # polling interval of a wait that has a deadline
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(tp.offset, 0) for tp in tps)
    finally:
        c.close()


def test_killed_and_restarted_stage_loses_nothing_and_counts_nothing_twice(kafka_bootstrap: str, topics) -> None:
    tel, out, dlq = topics
    rows = synth.samples(SPECS, T0, 1200, 5.0)
    pairs = synth.native(rows)
    late = pairs[200:500]
    pairs_sent = pairs[:200] + pairs[500:3000] + late + pairs[3000:]  # late data across the kill, too
    produce(kafka_bootstrap, tel, pairs_sent)
    close_windows(kafka_bootstrap, tel, 3, T0 + 1200)
    group = f"ingest-kill-{uuid.uuid4().hex}"
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "TRAINWATCH_TOPICS__TELEMETRY": tel,
           "TRAINWATCH_TOPICS__WINDOWS": out, "TRAINWATCH_TOPICS__DLQ": dlq, "TRAINWATCH_INGEST__BATCH_SIZE": "40",
           # static membership: the restarted process takes over the killed one's partitions without waiting for
           # its session to expire
           "TRAINWATCH_KAFKA__EXTRA": '{"group.instance.id": "ingest-0", "session.timeout.ms": "10000"}'}
    cmd = [sys.executable, "-m", "pipeline", "ingest", "run", "--group", group]
    kill_9_once_committed(cmd, env, kafka_bootstrap, group, tel, 3, 600, DEADLINE_S)  # some batches committed
    assert _committed(kafka_bootstrap, group, tel, 3) < len(pairs_sent), "killed too late to test anything"
    second = subprocess.run([*cmd, "--idle-exit", "3", "--max-seconds", str(DEADLINE_S)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=DEADLINE_S + 30)
    assert second.returncode == 0, second.stderr[-2000:]
    wins = windows(kafka_bootstrap, out)
    by_id: dict[str, WindowAggregate] = {}
    for w in wins:
        if w.window_id in by_id:  # a re-emitted window is the same window
            prev = by_id[w.window_id]
            assert (w.sample_count, w.flop) == pytest.approx((prev.sample_count, prev.flop))
        by_id[w.window_id] = w
    assert totals(wins) == pytest.approx(reference([v for _, v in pairs], "native"), rel=1e-9)
    assert read_all(kafka_bootstrap, dlq) == []


def test_a_5mb_message_is_dead_lettered_cut_and_ingest_commits_past_it(kafka_bootstrap: str, unique_topic) -> None:
    """The poison pill of issue 13: a 5 MB message used to kill the stage (its raw bytes too large for the DLQ).
    Now it is lettered unread (size, hash, headers, a 64 KiB prefix), keyed by its own id, and the stage goes on
    and commits past it."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    tel = f"big-tel-{uuid.uuid4().hex[:12]}"
    fut = admin.create_topics([NewTopic(tel, num_partitions=1, replication_factor=1,
                                        config={"max.message.bytes": str(8 * 2**20)})])
    fut[tel].result(timeout=30)
    out, dlq = unique_topic("big-win"), unique_topic("big-dlq")  # the DLQ keeps the broker's default 1 MB limit
    try:
        rows = synth.samples(SPECS[:1], T0, 120, 10.0)
        pairs = synth.native(rows)
        big = b'{"ts": 1, "pad": "' + b"x" * (5 * 2**20) + b'"}'
        p = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 8 * 2**20})
        for k, v in pairs[:20]:
            p.produce(tel, v, k)
        p.produce(tel, big, b"node-x", headers=[("origin", b"exporter-7")])
        for k, v in pairs[20:]:
            p.produce(tel, v, k)
        assert p.flush(30) == 0
        ticks = close_windows(kafka_bootstrap, tel, 1, T0 + 120)
        n = len(pairs) + 1 + ticks
        group = f"big-{uuid.uuid4().hex}"
        stage = run_stage(make_settings(kafka_bootstrap, tel, out, dlq), n, group=group)
        letters = read_all(kafka_bootstrap, dlq)
        assert len(letters) == 1
        m = letters[0]
        h = dict(m.headers())
        assert h["dlq.reason"] == b"oversized" and int(h["dlq.offset"]) == 20
        assert int(h["dlq.size"]) == len(big) and h["dlq.sha256"].decode() == hashlib.sha256(big).hexdigest()
        assert h["src.origin"] == b"exporter-7" and h["dlq.key"] == b"node-x"
        assert m.value() == big[:65_536] and m.key() == f"{tel}:0:20:oversized".encode()
        assert totals(windows(kafka_bootstrap, out))["sample_count"] == len(rows)  # nothing else lost
        assert stage.core.counters["dlq.oversized"] == 1
        assert _committed(kafka_bootstrap, group, tel, 1) > 20  # past the poison pill
        # A second run over the same input (a restart without commits) re-emits the same letter under the same key.
        run_stage(make_settings(kafka_bootstrap, tel, out, dlq), n)
        again = read_all(kafka_bootstrap, dlq)
        assert len(again) == 2 and {x.key() for x in again} == {m.key()}
    finally:
        admin.delete_topics([tel])


def test_the_window_of_a_24k_gpu_workload_is_written(kafka_bootstrap: str, unique_topic) -> None:
    """One workload on 3,072 nodes x 8 GPUs, one telemetry partition: its window lists 24,576 devices, over 1 MB. The
    topics `trainwatch topics create` makes take 8 MiB; librdkafka's producer refused anything over 1,000,000 bytes
    (MSG_SIZE_TOO_LARGE at produce), so the stage stopped on the run that matters most, again after every restart."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    out = f"huge-win-{uuid.uuid4().hex[:12]}"
    admin.create_topics([NewTopic(out, num_partitions=1, replication_factor=1,
                                  config={"max.message.bytes": str(8 * 2**20)})])[out].result(timeout=30)
    tel, dlq = unique_topic("huge-tel"), unique_topic("huge-dlq")
    try:
        spec = synth.WorkloadSpec("pretrain-" + "x" * 40, nodes=3072, gpus_per_node=8)
        pairs = synth.columnar(synth.samples([spec], T0, 60, 30.0))
        produce(kafka_bootstrap, tel, pairs)
        n = len(pairs) + close_windows(kafka_bootstrap, tel, 1, T0 + 60, "columnar")
        stage = run_stage(make_settings(kafka_bootstrap, tel, out, dlq, batch=5000), n)
        big = [w for w in windows(kafka_bootstrap, out) if w.workload_id == spec.workload_id]
        assert [w.device_count for w in big] == [24_576] and len(encode(big[0])) > 1_000_000
        assert stage.stats.dead_letters == 0 and read_all(kafka_bootstrap, dlq) == []
    finally:
        admin.delete_topics([out])


def test_a_missing_dlq_holds_the_letters_not_the_windows(kafka_bootstrap: str, unique_topic) -> None:
    """The DLQ topic is missing (deleted by mistake, or misnamed) and one message is bad: the stage reads on and writes
    every window of the good data, holds the letter and commits nothing past it; once the topic exists the letter is
    written and the offsets move past it. Before: the batch's flush raised after 30 s and the stage stopped on it
    (again after every restart), 100 of 963 messages read."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    tel, out, dlq = unique_topic("held-tel"), unique_topic("held-win"), f"held-dlq-{uuid.uuid4().hex[:12]}"
    pairs = synth.native(synth.samples(SPECS, T0, 600, 10.0))
    pairs = [*pairs[:100], (b"node-x", b"{not json"), *pairs[100:]]
    produce(kafka_bootstrap, tel, pairs)
    n = len(pairs) + close_windows(kafka_bootstrap, tel, 1, T0 + 600)
    group = f"held-{uuid.uuid4().hex}"
    stage = KafkaIngestStage(make_settings(kafka_bootstrap, tel, out, dlq, batch=50), group_id=group)
    created = threading.Event()

    def done() -> bool:
        return created.is_set() and stage.stats.outputs_held == 0 and stage.stats.last_commit.get(f"{tel}:0", 0) > 101

    runner = threading.Thread(target=stage.run, kwargs={"max_seconds": DEADLINE_S, "stop": done})
    runner.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while stage.stats.messages < n and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stage.stats.messages == n and stage.stats.outputs_held == 1
        want = reference([v for _, v in pairs], "native")
        assert totals(windows(kafka_bootstrap, out)) == pytest.approx(want, rel=1e-9)  # every window of good data
        assert _committed(kafka_bootstrap, group, tel, 1) <= 100  # nothing past the held letter
        admin.create_topics([NewTopic(dlq, num_partitions=1, replication_factor=1)])[dlq].result(timeout=30)
        created.set()
        runner.join(DEADLINE_S)
        assert not runner.is_alive() and done(), stage.stats
        letters = read_all(kafka_bootstrap, dlq)
        assert [dict(m.headers())["dlq.offset"] for m in letters] == [b"100"]
        assert _committed(kafka_bootstrap, group, tel, 1) > 101  # past the letter (open windows hold the rest back)
    finally:
        created.set()
        runner.join(DEADLINE_S)
        admin.delete_topics([dlq])
