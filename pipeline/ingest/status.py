"""Where an ingest consumer group stands, read from the broker: committed offset, end, lag and event-time progress
per partition. Works while the stage runs elsewhere (it only reads the group's commits), and after it stopped."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from confluent_kafka import Consumer, TopicPartition

from pipeline.ingest.kafka_stage import metadata_max_ts
from pipeline.settings import Settings
from schemas.errors import ConfigError


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    topic: str
    partition: int
    committed: int | None  # next offset the group will read; None: nothing committed yet
    end: int  # the partition's high watermark
    lag: int  # messages not yet covered by a commit
    #: newest event time the stage had seen before the committed offset (its commit metadata): what a restart
    #: resumes from; None when unknown
    event_time: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _event_time(metadata: str | None) -> float | None:
    try:
        return metadata_max_ts(metadata)
    except ValueError:  # another client's metadata: not ours to read
        return None


def group_status(settings: Settings, group: str, timeout_s: float = 10.0) -> list[PartitionStatus]:
    """One row per partition of the telemetry topic, in partition order."""
    topic = settings.topics.telemetry
    c = Consumer(settings.kafka.client_config(**{"group.id": group, "enable.auto.commit": False}))
    try:
        meta = c.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ConfigError(f"topic {topic!r} does not exist on {settings.kafka.bootstrap_servers}")
        rows = []
        for tp in c.committed([TopicPartition(topic, p) for p in sorted(meta.partitions)], timeout=timeout_s):
            low, high = c.get_watermark_offsets(tp, timeout=timeout_s)
            committed = tp.offset if tp.offset >= 0 else None
            rows.append(PartitionStatus(topic, tp.partition, committed, high,
                                        high - (committed if committed is not None else low), _event_time(tp.metadata)))
        return rows
    finally:
        c.close()
