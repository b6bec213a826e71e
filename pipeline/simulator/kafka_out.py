"""Produce a scenario to Kafka (confluent-kafka): telemetry keyed by node, allocations and CIP by account."""

from __future__ import annotations

import time

import numpy as np
from confluent_kafka import Producer

from pipeline.settings import Settings
from pipeline.simulator.scenario import Scenario
from schemas.errors import TrainwatchError
from schemas.serde import dumps

_FLUSH_TIMEOUT_S = 60.0


def _require_inputs(settings: Settings) -> None:
    """The three input topics must exist (the broker does not auto-create): one line instead of a produce that
    waits out its delivery timeout on an unknown topic."""
    from pipeline import topics

    t = settings.topics
    state = topics.check(settings, "ingest", configs=False).state
    for name in (t.telemetry, t.cip, t.allocations):
        if name not in state:
            raise TrainwatchError(f"topic {name!r}: missing; create the topics first: trainwatch topics create")


class KafkaOut:
    """A sink for `writer.write`: telemetry per block as it is generated, the records at the end.

    `rate` (samples/s) is the only place the simulator waits on the wall clock: pacing a live demo.
    """

    def __init__(self, settings: Settings, sc: Scenario, rate: float | None = None) -> None:
        self.topics, self.sc, self.rate = settings.topics, sc, rate
        _require_inputs(settings)
        # Idempotent (acks=all): a retried batch is neither duplicated nor reordered.
        self.p = Producer(settings.kafka.client_config(**{"linger.ms": 20, "compression.type": "lz4",
                                                          "enable.idempotence": True}))
        self.sent = 0
        self._t0 = time.monotonic()

    def _produce(self, topic: str, value: bytes, key: str) -> None:
        while True:
            try:
                self.p.produce(topic, value=value, key=key)
                return
            except BufferError:  # local queue full: let librdkafka drain it (backpressure, not loss)
                self.p.poll(0.1)

    def telemetry(self, lines: list[bytes], node: np.ndarray) -> None:
        names = self.sc.fleet.node_name[node].tolist()
        for line, key in zip(lines, names, strict=True):
            self._produce(self.topics.telemetry, line, key)
            self.sent += 1
            if self.rate and self.sent % 1000 == 0:
                ahead = self.sent / self.rate - (time.monotonic() - self._t0)
                if ahead > 0:
                    time.sleep(ahead)
        self.p.poll(0)

    def finish(self) -> None:
        for a in self.sc.accounts:
            self._produce(self.topics.cip, dumps(a.cip.model_dump(mode="json", exclude_none=True)), a.account_id)
        for e in self.sc.allocations:
            self._produce(self.topics.allocations, dumps(e.model_dump(mode="json", exclude_none=True)), e.account_id)
        left = self.p.flush(_FLUSH_TIMEOUT_S)
        if left:
            raise RuntimeError(f"{left} messages not delivered to Kafka within {_FLUSH_TIMEOUT_S:.0f} s")
