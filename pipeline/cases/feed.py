"""The `compliance.cases` feed: one message per case change (the case after it, the change, the draft report),
and the confluent-kafka producer that publishes it keyed by account, so one account's changes stay in order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

from confluent_kafka import KafkaError, Producer
from confluent_kafka import Message as KafkaMessage
from pydantic import Field

from pipeline.cases.report import draft_report
from pipeline.settings import KafkaSettings
from schemas import serde
from schemas.base import Message
from schemas.case import Case, CaseEvent
from schemas.errors import TrainwatchError
from schemas.policy import Policy


class FeedError(TrainwatchError):
    """The feed could not be published (delivery failed or timed out)."""


class CaseFeedMessage(Message):
    TOPIC_KEY: ClassVar[str] = "cases"

    schema_version: Literal[1] = 1
    message_id: str = Field(description="= the change's event_id: consumers dedup on it")
    case: Case
    change: CaseEvent
    report: dict[str, Any] = Field(description="the draft report (pipeline.cases.report.draft_report)")

    @property
    def key(self) -> bytes:
        return self.case.account_id.encode()


def feed_messages(cases: Iterable[Case], events: Iterable[CaseEvent], policy: Policy | None) -> list[CaseFeedMessage]:
    """One message per event, each carrying its case's latest state in `cases` and that case's draft report."""
    by_id = {c.case_id: c for c in cases}
    reports: dict[str, dict[str, Any]] = {}
    out = []
    for ev in events:
        case = by_id.get(ev.case_id)
        if case is None:
            continue
        if case.case_id not in reports:
            reports[case.case_id] = draft_report(case, policy)
        out.append(CaseFeedMessage(message_id=ev.event_id, case=case, change=ev, report=reports[case.case_id]))
    return out


class CaseFeedProducer:
    """Publishes feed messages and waits for every delivery (commit-after-write: callers commit after publish)."""

    def __init__(self, kafka: KafkaSettings, topic: str, *, flush_timeout_s: float = 30.0):
        # Idempotent producer: a retried send never duplicates within a session; consumers dedup on message_id.
        self._producer = Producer(kafka.client_config(**{"enable.idempotence": True, "linger.ms": 20}))
        self.topic = topic
        self.flush_timeout_s = flush_timeout_s

    def publish(self, messages: Sequence[CaseFeedMessage]) -> int:
        errors: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: KafkaMessage) -> None:
            if err is not None:
                errors.append(str(err))

        for m in messages:
            self._producer.produce(self.topic, key=m.key, value=serde.encode(m), on_delivery=on_delivery)
            self._producer.poll(0)
        left = self._producer.flush(self.flush_timeout_s)
        if left:
            raise FeedError(f"{self.topic}: {left} feed message(s) not delivered within {self.flush_timeout_s} s")
        if errors:
            raise FeedError(f"{self.topic}: {len(errors)} feed message(s) failed: {errors[0]}")
        return len(messages)

    def close(self) -> None:
        self._producer.flush(self.flush_timeout_s)
