"""The `compliance.cases` feed: one message per case change (the case after it, the change, the draft report),
and the confluent-kafka producer that publishes it keyed by account, so one account's changes stay in order.

PII travels once per message and only where a report needs it: `identity` holds the foreign person's identity
for a reportable case (REPORTABLE_STATUSES) and is None otherwise (a monitored U.S.-person run, a dismissed case);
`case.identity` is always empty and the report's `foreign_person` points at `identity` (report.identity_reference).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

from confluent_kafka import KafkaError, Producer
from confluent_kafka import Message as KafkaMessage
from pydantic import Field

from pipeline.cases.report import draft_report, identity_block
from pipeline.settings import KafkaSettings
from schemas import serde
from schemas.base import Message
from schemas.case import REPORTABLE_STATUSES, Case, CaseEvent
from schemas.errors import TrainwatchError
from schemas.policy import Policy


class FeedError(TrainwatchError):
    """The feed could not be published (delivery failed or timed out)."""


class CaseFeedMessage(Message):
    TOPIC_KEY: ClassVar[str] = "cases"

    #: 2: identity moved out of `case` and `report` into `identity`, sent only for reportable cases.
    schema_version: Literal[2] = 2
    message_id: str = Field(description="= the change's event_id: consumers dedup on it")
    case: Case = Field(description="the case after the change, `identity` left empty")
    change: CaseEvent
    identity: dict[str, Any] | None = Field(
        default=None, description="the foreign person's identity (PII) for a reportable case; None otherwise")
    report: dict[str, Any] = Field(
        description="the draft report (pipeline.cases.report.draft_report), `foreign_person` referring to `identity`")

    @property
    def key(self) -> bytes:
        return self.case.account_id.encode()


def feed_messages(cases: Iterable[Case], events: Iterable[CaseEvent], policy: Policy | None) -> list[CaseFeedMessage]:
    """One message per event, each carrying its case's latest state in `cases` and that case's draft report."""
    by_id = {c.case_id: c for c in cases}
    parts: dict[str, tuple[Case, dict[str, Any] | None, dict[str, Any]]] = {}
    out = []
    for ev in events:
        case = by_id.get(ev.case_id)
        if case is None:
            continue
        if case.case_id not in parts:
            identity = identity_block(case) if case.status in REPORTABLE_STATUSES else None
            parts[case.case_id] = (case.model_copy(update={"identity": {}}), identity,
                                   draft_report(case, policy, identity=False))
        bare, identity, report = parts[case.case_id]
        out.append(CaseFeedMessage(message_id=ev.event_id, case=bare, change=ev, identity=identity, report=report))
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
