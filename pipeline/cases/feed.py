"""The `compliance.cases` feed: one message per case change (the case after it, the change, the draft report),
and the confluent-kafka producer that publishes it keyed by account, so one account's changes stay in order.

PII travels once per message and only where a report needs it: `identity` holds the foreign person's identity
for a reportable case (REPORTABLE_STATUSES) and is None otherwise (a monitored U.S.-person run, a dismissed case);
`case.identity` is always empty and the report's `foreign_person` points at `identity` (report.identity_reference).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka import Message as KafkaMessage
from pydantic import Field

from pipeline.cases.report import draft_report, identity_block
from pipeline.settings import KafkaSettings, Settings
from schemas import serde
from schemas.base import Message
from schemas.case import REPORTABLE_STATUSES, Case, CaseEvent
from schemas.errors import TrainwatchError
from schemas.policy import Policy

if TYPE_CHECKING:
    from pipeline.store import Store


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

    def __init__(self, kafka: KafkaSettings, topic: str, *, flush_timeout_s: float = 30.0,
                 max_message_bytes: int = 8 * 1024 * 1024):
        # Idempotent producer: a retried send never duplicates within a session; consumers dedup on message_id. A
        # message may be as large as the topic takes (settings.topic_config.max_message_bytes; librdkafka's own
        # default is 1,000,000 bytes): a case carries its evidence and draft report.
        self._producer = Producer(kafka.client_config(**{"enable.idempotence": True, "linger.ms": 20,
                                                         "message.max.bytes": max_message_bytes}))
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


@dataclass(frozen=True, slots=True)
class FeedOutcome:
    """What became of case changes made outside the worker (CLI actions): how many messages went to which topic,
    or why none did; `line` says it for people."""

    published: int
    topic: str | None
    line: str
    message_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"published": self.published, "topic": self.topic, "message_ids": list(self.message_ids),
                "note": self.line}


def publish_case_changes(settings: Settings, store: Store, case_ids: Iterable[str],
                         policy_for: Callable[[Case], Policy | None], *, timeout_s: float = 30.0) -> FeedOutcome:
    """Put every stored change of `case_ids` that the feed topic lacks on it, in event order, in the worker's format
    (the same `feed_messages` the faust app's feed audit republishes: the case's latest state, its draft report).

    Idempotent: message ids (= event ids) already on the topic are skipped, so the action's own change goes out
    once however often this runs, and an earlier change the worker never sent goes first. With `cases_feed` "off"
    nothing is sent and the outcome says where the changes are. Raises FeedError when the feed cannot be read or
    written (the changes stay in the store; running it again sends them)."""
    from pipeline.detect.feed_audit import _published_ids  # the audit's reader; lazy: the audit imports this module

    ids = sorted(set(case_ids))
    topic = settings.topics.cases
    if settings.cases_feed != "kafka":
        return FeedOutcome(0, None, f"feed: not published (cases_feed = {settings.cases_feed}): the change is in "
                                    f"case_events of database {store.database}; with TRAINWATCH_CASES_FEED=kafka it "
                                    f"goes to {topic} at {settings.kafka.bootstrap_servers} (`trainwatch cases "
                                    f"publish` sends what is missing)")
    try:
        have = _published_ids(settings, topic, timeout_s)
    except (KafkaException, TimeoutError) as exc:
        raise FeedError(f"feed: NOT published: cannot read {topic} at {settings.kafka.bootstrap_servers} ({exc}); "
                        "the change is stored: `trainwatch cases publish CASE` sends it") from exc
    messages: list[CaseFeedMessage] = []
    for cid in ids:
        case = store.get_case(cid)
        if case is None:
            continue
        missing = sorted((e for e in store.case_events(cid) if e.event_id not in have),
                         key=lambda e: (e.at, e.recorded_at, e.event_id))
        messages += feed_messages([case], missing, policy_for(case))
    if messages:
        producer = CaseFeedProducer(settings.kafka, topic, flush_timeout_s=timeout_s,
                                    max_message_bytes=settings.topic_config.max_message_bytes)
        try:
            producer.publish(messages)
        except FeedError as exc:
            raise FeedError(f"feed: NOT published: {exc}; the change is stored: `trainwatch cases publish CASE` "
                            "sends it") from exc
    n = len(messages)
    return FeedOutcome(n, topic, f"feed: {n} message(s) published to {topic}"
                                 + ("" if n else " (every change was already on it)"),
                       tuple(m.message_id for m in messages))
