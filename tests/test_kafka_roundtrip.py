"""Smoke test of the real broker: keyed messages over several partitions come back exactly once."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import Consumer, KafkaError, Producer

pytestmark = pytest.mark.kafka

N_MESSAGES = 100
DEADLINE_S = 30.0


def test_keyed_messages_round_trip_exactly_once(kafka_bootstrap: str, unique_topic) -> None:
    topic = unique_topic("roundtrip", partitions=3)
    sent = {f"key-{i:03d}": f"value-{i:03d}" for i in range(N_MESSAGES)}

    delivery_errors: list[KafkaError] = []
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for key, value in sent.items():
        producer.produce(topic, key=key, value=value, on_delivery=lambda err, _msg: err and delivery_errors.append(err))
    assert producer.flush(DEADLINE_S) == 0, "messages still queued after the deadline"
    assert delivery_errors == []

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"roundtrip-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[tuple[str, str, int]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + DEADLINE_S
        while len(received) < N_MESSAGES and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            received.append((msg.key().decode(), msg.value().decode(), msg.partition()))
        # Keep polling briefly: a duplicate would arrive after the 100th message.
        extra_until = time.monotonic() + 1.0
        while time.monotonic() < extra_until:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                received.append((msg.key().decode(), msg.value().decode(), msg.partition()))
    finally:
        consumer.close()

    counts = Counter(key for key, _, _ in received)
    duplicates = sorted(key for key, count in counts.items() if count > 1)
    assert len(received) == N_MESSAGES, f"got {len(received)} messages; duplicated keys: {duplicates}"
    assert {key: value for key, value, _ in received} == sent
    assert len({partition for _, _, partition in received}) > 1, "keys should spread over the 3 partitions"
