"""The dead-letter sink on the real broker: ingest's letters reach the store's dead_letters, once each, CIP bytes
only in the restricted table."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.dlq_sink import UNLABELLED, DlqSink
from pipeline.faults import _FlakyClient
from pipeline.ingest.dlq import DeadLetter as IngestLetter
from pipeline.settings import Settings
from pipeline.store import Store
from schemas.errors import TrainwatchError
from tests.test_ingest_kafka import make_settings

pytestmark = pytest.mark.kafka


def _drain(settings: Settings, store: Store, group: str, expect: int) -> int:
    sink = DlqSink(settings, store, group_id=group)
    deadline = time.monotonic() + 45
    return sink.run(stop=lambda: sink.stored >= expect or time.monotonic() > deadline)


def test_ingest_letters_reach_the_store_once_each(kafka_bootstrap: str, unique_topic, store_path, store: Store
                                                  ) -> None:
    tel, dlq = "gpu.telemetry-x", unique_topic("dlq")
    settings = make_settings(kafka_bootstrap, tel, "windows-x", dlq)
    row = orjson.dumps({"ts": 1.7e9, "node": "n1", "device": "d1", "workload_id": "wl", "gpu_util": 1e308})
    cip_raw = b'{"account_id": "acct-x", "customer_name": "Jane Roe", "national_id": "123-45-6789"}'
    letters = [  # encoded the way ingest writes them (schemas/dead_letter.py)
        IngestLetter.of("malformed_json", "malformed JSON", tel, 1, 0, b"\x00garbage", b"n"),
        IngestLetter.of("out_of_range", "gpu_util 1e308", tel, 1, 1, row, b"n", row=0),
        IngestLetter.of("out_of_range", "gpu_util 1e308", tel, 1, 1, row, b"n", row=3),  # same bytes, another row
        IngestLetter.of("schema_violation", "CipRecord.updated_at: Field required", settings.topics.cip, 0, 42,
                        cip_raw),
    ]
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for _ in range(2):  # an ingest restart re-emits the same letters
        for d in letters:
            p.produce(dlq, d.raw, d.key, headers=d.headers())
    p.produce(dlq, b"stray bytes")  # no provenance headers
    assert p.flush(30) == 0

    with Store.connect(f"chdb://{store_path}", store.database, pii_topics={settings.topics.cip}) as sink_store:
        group = f"dlq-{uuid.uuid4().hex}"
        assert _drain(settings, sink_store, group, 9) == 9
        # Another group reading everything again lands on the same rows.
        assert _drain(settings, sink_store, f"dlq-{uuid.uuid4().hex}", 9) == 9

    rows_now = store.query("SELECT topic, reason, `offset`, detail, raw_restricted, toString(raw) AS raw "
                           "FROM dead_letters FINAL ORDER BY topic, `offset`, detail")
    assert [(r["topic"], r["reason"], r["offset"]) for r in rows_now] == sorted([
        (settings.topics.cip, "schema_violation", 42), (tel, "malformed_json", 0), (tel, "out_of_range", 1),
        (tel, "out_of_range", 1), (dlq, UNLABELLED, 8)])  # the 9th record of the DLQ topic
    assert [r["detail"][:6] for r in rows_now if r["reason"] == "out_of_range"] == ["row 0:", "row 3:"]
    cip_row = rows_now[0]
    assert cip_row["raw_restricted"] and cip_row["raw"] == "" and "Jane" not in cip_row["detail"]
    assert next(r for r in rows_now if r["reason"] == "malformed_json")["raw"] == "\x00garbage"
    assert {d.topic: d.raw for d in store.dead_letters(settings.topics.cip)} == {settings.topics.cip: cip_raw}


def test_missing_dlq_topic_is_one_line(kafka_bootstrap: str, store: Store) -> None:
    settings = make_settings(kafka_bootstrap, "t", "w", f"no-such-dlq-{uuid.uuid4().hex[:8]}")
    with pytest.raises(TrainwatchError, match="does not exist"):
        DlqSink(settings, store)


def test_a_store_outage_holds_the_letters_and_loses_none(kafka_bootstrap: str, unique_topic, store: Store,
                                                         tmp_path) -> None:
    """In `run --stage all` the sink is a thread nothing restarts: a store outage must hold its batch, uncommitted,
    and store it when the store answers (it used to raise, and the thread died for the rest of the run)."""
    tel, dlq = "gpu.telemetry-y", unique_topic("dlq")
    settings = make_settings(kafka_bootstrap, tel, "windows-y", dlq)
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for off in range(3):
        d = IngestLetter.of("malformed_json", "malformed JSON", tel, 0, off, b"\x00bad" + bytes([off]), b"n")
        p.produce(dlq, d.raw, d.key, headers=d.headers())
    assert p.flush(30) == 0
    down = tmp_path / "store-down"
    down.touch()
    flaky = Store(_FlakyClient(store.client, down), store.database, [])
    group = f"dlq-{uuid.uuid4().hex}"
    sink = DlqSink(settings, flaky, group_id=group)
    try:
        deadline = time.monotonic() + 30
        while sink._held is None and time.monotonic() < deadline:  # read, then the insert fails
            assert sink.step() == 0
        assert sink._held is not None and len(sink._held) == 3
        assert sink.step() == 0 and store.dead_letters(tel) == []  # still down: held, nothing stored
        down.unlink()
        assert sink.step() == 3
    finally:
        sink.close()
    assert sorted(d.offset for d in store.dead_letters(tel)) == [0, 1, 2]
    # committed after the insert: the group's offsets are past the three letters
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    try:
        parts = [TopicPartition(dlq, i) for i in c.list_topics(dlq, timeout=10).topics[dlq].partitions]
        assert sum(max(tp.offset, 0) for tp in c.committed(parts, timeout=10)) == 3
    finally:
        c.close()
