"""A fatal consumer error stops the ingest stage (and `run --stage all` with it) instead of leaving it polling a dead
consumer: on the real broker, a static member fenced by another member with its group.instance.id (what a
coordinator failover did to the chaos run's worker) raises out of `step`, and a stage thread that raises stops the
worker for its supervisor to restart."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException

from pipeline.commands.run_cmd import _or_stop
from pipeline.ingest import synth
from pipeline.ingest.kafka_stage import KafkaIngestStage
from pipeline.settings import KafkaSettings, Settings, TopicSettings
from tests.test_ingest_kafka import SPECS, T0, produce


@pytest.mark.kafka
def test_a_fenced_static_member_raises_out_of_step(kafka_bootstrap: str, unique_topic) -> None:
    tel, out, dlq = unique_topic("telemetry"), unique_topic("windows"), unique_topic("dlq")
    produce(kafka_bootstrap, tel, synth.native(synth.samples(SPECS, T0, 60, 10.0)))
    inst, group = f"inst-{uuid.uuid4().hex[:8]}", f"ingest-{uuid.uuid4().hex}"
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap, group_instance_id=inst),
                        topics=TopicSettings(telemetry=tel, windows=out, dlq=dlq))
    stage = KafkaIngestStage(settings, group_id=group)
    stage.subscribe()
    deadline = time.monotonic() + 30
    while not stage.consumer.assignment():
        assert time.monotonic() < deadline, "the stage never got its partition"
        stage.step(0.5)
    other = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "group.instance.id": f"{inst}-ingest",
                      "enable.auto.commit": False})
    other.subscribe([tel])
    try:
        with pytest.raises(KafkaException) as err:
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                other.poll(0.2)
                stage.step(0.2)
        assert err.value.args[0].code() == KafkaError._FATAL, err.value
    finally:
        other.close()
        stage.consumer.close()


def test_a_stage_thread_that_raises_stops_the_worker() -> None:
    got: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    failed: list[str] = []

    def ingest() -> None:
        raise KafkaException("fenced")

    def thread() -> None:
        with pytest.raises(KafkaException):
            _or_stop(ingest, (), failed)

    try:
        t = threading.Thread(target=thread)
        t.start()
        t.join(10)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler runs in the main thread, between bytecodes
    finally:
        signal.signal(signal.SIGTERM, before)
    assert failed == ["ingest"] and got == [signal.SIGTERM]
