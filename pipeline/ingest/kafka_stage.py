"""The ingest stage on Kafka (confluent-kafka): consume a batch, run the core, write, flush, THEN commit.

Delivery: at-least-once with deterministic window ids, so effectively once downstream (sinks dedup by window_id).
- Offsets are committed only after the producer has flushed every aggregate and dead letter of the batch (commit
  after write: a crash before the flush re-reads the batch instead of losing it).
- The committed offset of a partition is the core's safe point (WindowAggregator.commit_points): below every row
  still held in an unemitted window, and never inside an emitted window. Its commit metadata records the max
  event time seen before that offset, so a restarted stage rebuilds the same windows with the same ids.
- Shutdown (graceful or not) leaves open windows to be re-read; it never emits them early (an early emission
  would share its window_id with the complete one that a restart rebuilds).
- Backpressure: buffers are one consume batch; when the producer's queue passes `max_queued` the assigned
  partitions are paused until it drains, so a slow broker slows consumption instead of growing memory.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from wsgiref.simple_server import WSGIServer

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from pipeline.ingest.aggregate import Progress, WindowConfig
from pipeline.ingest.decoders import LabelMap
from pipeline.ingest.dlq import DeadLetter
from pipeline.ingest.inventory import Inventory
from pipeline.ingest.stage import IngestCore
from pipeline.settings import Settings
from schemas.serde import dumps, encode, loads

log = logging.getLogger(__name__)
LAG_EVERY_S = 1.0  # how often the consumer lag (for the metrics endpoint) is refreshed
#: Outputs refused because their topic is missing are written again this often (a topic deleted by mistake comes
#: back when recreated).
HELD_RETRY_S = 10.0
#: Beyond this many bytes of held outputs the stage reads nothing more until they are written (backpressure).
MAX_HELD_BYTES = 256 * 1024 * 1024
#: What a missing topic looks like to the producer: the broker's answer, or librdkafka's once it knows.
MISSING_TOPIC = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC)


def commit_metadata(progress: Progress | float) -> str:
    """What a commit records beside its offset: the partition's event-time state before it (`max_ts`, the
    watermark basis, null: none yet; and the top-two trackers a restart continues from)."""
    if not isinstance(progress, Progress):
        return dumps({"max_ts": progress if math.isfinite(progress) else None}).decode()
    return dumps(progress.to_json()).decode()


def metadata_progress(metadata: str | None) -> Progress | None:
    """The event-time state a commit recorded (None: none). Raises ValueError on metadata that is not ours."""
    if not metadata:
        return None
    try:
        d = loads(metadata)
    except Exception as exc:
        raise ValueError(f"not trainwatch commit metadata: {metadata!r}") from exc
    try:
        return Progress.from_json(d)
    except ValueError as exc:
        raise ValueError(f"not trainwatch commit metadata: {metadata!r}") from exc


def metadata_max_ts(metadata: str | None) -> float | None:
    """The watermark basis a commit recorded (None: none). Raises ValueError on metadata that is not ours."""
    pr = metadata_progress(metadata)
    return None if pr is None or not math.isfinite(pr.max_ts) else pr.max_ts


def tune_gc() -> None:
    """For a process that runs the stage: each batch allocates ~10 objects per sample (decoded JSON) that die
    within the batch, and the stage holds no reference cycles, so frequent cyclic collections only cost time
    (about a quarter of the per-sample CPU at the default thresholds). Freeze what exists, collect rarely."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(200_000, 50, 1000)


def labels_from_settings(settings: Settings) -> LabelMap:
    return LabelMap(workload=tuple(settings.ingest.workload_labels), account=tuple(settings.ingest.account_labels))


@dataclass
class StageStats:
    batches: int = 0
    messages: int = 0
    windows: int = 0
    dead_letters: int = 0
    commits: int = 0
    pauses: int = 0
    #: outputs (windows, dead letters) whose topic is missing, kept and written again: offsets wait for them
    outputs_held: int = 0
    last_commit: dict[str, int] = field(default_factory=dict)


class KafkaIngestStage:
    def __init__(self, settings: Settings, *, group_id: str = "trainwatch-ingest", decoder: str | None = None,
                 clock: Callable[[], float] = time.time, max_queued: int = 100_000,
                 consumer_overrides: dict | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.batch_size = settings.ingest.batch_size
        self.max_wait_s = settings.ingest.max_wait_s
        self.clock = clock  # the reference clock for the future-skew check: wall clock in production
        self.max_queued = max_queued
        self.core = IngestCore(WindowConfig.from_settings(settings), decoder or settings.ingest.decoder,
                               Inventory.load(settings.ingest.inventory_path), labels_from_settings(settings),
                               max_message_bytes=settings.ingest.max_message_bytes,
                               dlq_max_value_bytes=settings.ingest.dlq_max_value_bytes)
        self.stats = StageStats()
        self._delivery_errors: list[KafkaError] = []
        # Outputs whose topic is missing, in order: (topic, key, value, headers), written again every HELD_RETRY_S.
        # The stage goes on (a missing DLQ never stops the windows of good data); no offset is committed while any is
        # held (a restart re-reads from the last commit and makes them again).
        self._held: list[tuple[str, bytes | None, bytes, list | None]] = []
        self._held_topics: set[str] = set()
        self._held_bytes = 0
        self._held_since: float | None = None
        self._held_retried = -math.inf
        self._held_logged = -math.inf
        self._held_error: KafkaError | None = None
        self._paused = False
        self._last_commit: dict[tuple[str, int], TopicPartition] = {}
        #: messages behind each assigned partition's end, refreshed every LAG_EVERY_S (read by the metrics endpoint)
        self.lag: dict[tuple[str, int], int] = {}
        self._lag_at = -math.inf
        self._metrics: WSGIServer | None = None
        kafka = settings.kafka
        self.consumer = Consumer(kafka.client_config(**{
            "group.id": group_id,
            # Static membership (settings.kafka.group_instance_id): a restarted worker gets its partitions back
            # at once; otherwise a killed member's partitions wait for its session timeout.
            **({"group.instance.id": f"{kafka.group_instance_id}-ingest"} if kafka.group_instance_id else {}),
            "session.timeout.ms": int(kafka.session_timeout_s * 1000),
            # Commit after write: offsets are committed by hand once the outputs are flushed.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 8 * 1024 * 1024,  # columnar messages are large: fewer fetch round trips
            **(consumer_overrides or {}),
        }))
        self.producer = Producer(kafka.client_config(**{
            # Idempotent producer: broker-side retries cannot duplicate or reorder our outputs.
            "enable.idempotence": True,
            "linger.ms": 20,
            "compression.type": "lz4",
            # As large a message as the topics take (`trainwatch topics create`: 8 MiB). librdkafka's own default,
            # 1,000,000 bytes before compression, refused the window of a 24,576-GPU workload (its device list),
            # and the stage stopped on it after every restart (tests/test_ingest_kafka.py).
            "message.max.bytes": settings.topic_config.max_message_bytes,
            # A topic the broker does not know is taken as missing after 5 s (librdkafka's default waits 30 s, for
            # topics just created): its outputs are then held, not the batch (`_hold`).
            "topic.metadata.propagation.max.ms": 5000,
        }))

    # --- partition ownership: restore the watermark recorded with the committed offset --------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in consumer.committed(partitions, timeout=30):
            progress = None
            try:
                progress = metadata_progress(tp.metadata)
            except ValueError:  # foreign metadata: start without a watermark (more data counts as on time)
                log.warning("ignoring commit metadata %r on %s[%d]", tp.metadata, tp.topic, tp.partition)
            self.core.assign(tp.topic, tp.partition, progress)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The new owner replays from our last safe commit; our open windows and held fragments are dropped.
        for tp in partitions:
            self.core.revoke(tp.topic, tp.partition)

    def subscribe(self) -> None:
        self.consumer.subscribe([self.topics.telemetry], on_assign=self._on_assign, on_revoke=self._on_revoke)

    # --- one batch -----------------------------------------------------------------------------------------------
    def step(self, timeout: float = 1.0) -> int:
        """Consume one batch, process, write, flush, commit. Returns the number of messages consumed."""
        if self._held_bytes > MAX_HELD_BYTES:  # backpressure: read nothing more until their topics take them
            self._flush()
            self._commit()
            time.sleep(timeout)
            return 0
        msgs = self.consumer.consume(self.batch_size, timeout)
        by_part: dict[tuple[str, int], list] = {}
        parts = [(m.topic(), m.partition()) for m in msgs]
        if len(set(parts)) == 1:  # one partition in this batch (common): no regrouping
            by_part[parts[0]] = msgs
        else:
            for key, m in zip(parts, msgs, strict=True):
                part = by_part.get(key)
                if part is None:
                    part = by_part[key] = []
                part.append(m)
        now = self.clock()
        dead: list[DeadLetter] = []
        for (topic, part), ms in by_part.items():
            if topic is None or any(m.error() is not None for m in ms):  # errors are rare: filter only then
                for m in ms:
                    if m.error() is not None and (m.error().fatal() or m.error().code() == KafkaError._FATAL):
                        # e.g. a static member fenced after a coordinator failover: this consumer is done for good,
                        # nothing is read any more. Out: the process restarts and replays from the last commit.
                        raise KafkaException(m.error())
                    if m.error() is not None and m.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consume error: %s", m.error())
                ms = [m for m in ms if m.error() is None]
                if topic is None or not ms:
                    continue
            # arrival = the record's Kafka timestamp (CreateTime, or LogAppendTime when the topic says so); a
            # sample further ahead of it than max_clock_skew_s is a bad clock (type 0: no timestamp, not checked)
            arrival = [t[1] / 1000.0 if t[0] else math.nan for t in (m.timestamp() for m in ms)]
            dead += self.core.process_raw(topic, part, [m.value() for m in ms], [m.offset() for m in ms], now,
                                          key_of=lambda i, ms=ms: ms[i].key(), arrival=arrival,
                                          headers_of=lambda i, ms=ms: ms[i].headers())
        windows = self.core.ready()
        for w in windows:
            self._produce(self.topics.windows, (w.account_id or w.workload_id).encode(), encode(w))
        for d in dead:  # keyed by the letter's own id: a replay re-emits the same key (store dedup)
            self._produce(self.topics.dlq, d.letter_key(), d.raw, d.headers())
        self._flush()
        self._commit()
        self.stats.batches += 1
        self.stats.messages += len(msgs)
        self.stats.windows += len(windows)
        self.stats.dead_letters += len(dead)
        self._refresh_lag()
        return len(msgs)

    def _refresh_lag(self) -> None:
        """Lag from the high watermarks the fetcher already holds (cached: no broker round trip)."""
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        lag = {}
        for tp in self.consumer.position(self.consumer.assignment()):
            high = self.consumer.get_watermark_offsets(tp, cached=True)[1]
            if tp.offset >= 0 and high >= 0:  # negative: nothing consumed or no fetch yet
                lag[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        self.lag = lag

    def _produce(self, topic: str, key: bytes | None, value: bytes, headers: list | None = None) -> None:
        if topic in self._held_topics:  # behind outputs held for this topic: after them, in order
            self._hold(topic, key, value, headers, self._held_error)
            return
        while True:
            try:
                # a delivery report carries no headers: a letter's (its provenance) are kept for writing it again
                report = self._delivered if headers is None else partial(self._delivered, headers=headers)
                self.producer.produce(topic, value, key, headers=headers, on_delivery=report)
                break
            except BufferError:  # local queue full: serve delivery reports until there is room
                self._pause()
                self.producer.poll(0.1)
            except KafkaException as exc:
                if exc.args and exc.args[0].code() in MISSING_TOPIC:  # refused at once (known missing): held
                    self._hold(topic, key, value, headers, exc.args[0])
                    break
                if exc.args and exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    # not a record to skip (a window is data): stop with what to change, never commit past it
                    raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, (
                        f"a {len(value)}-byte message for {topic} is over message.max.bytes="
                        f"{self.settings.topic_config.max_message_bytes}: raise topic_config.max_message_bytes and "
                        "the topic's max.message.bytes"))) from exc
                raise
        if len(self.producer) > self.max_queued:
            self._pause()
        self.producer.poll(0)

    def _pause(self) -> None:
        if not self._paused:
            self.consumer.pause(self.consumer.assignment())
            self._paused = True
            self.stats.pauses += 1

    def _delivered(self, err: KafkaError | None, msg: Any, headers: list | None = None) -> None:
        if err is None:
            return
        if msg is not None and err.code() in MISSING_TOPIC:
            self._hold(msg.topic(), msg.key(), msg.value() or b"", headers, err)
            return
        self._delivery_errors.append(err)

    def _hold(self, topic: str, key: bytes | None, value: bytes, headers: list | None, err: Any) -> None:
        """An output whose topic is missing (deleted, or a misconfigured DLQ): held and written again, so that the
        stage goes on (dead letters never stop the windows of good data). Offsets wait for it (`_commit`)."""
        self._held.append((topic, key, value, headers))
        self._held_topics.add(topic)
        self._held_bytes += len(value)
        self._held_since = self._held_since or time.monotonic()
        self._held_error = err

    def _held_again(self, now: float) -> None:
        """The held outputs written again, in order (at most every HELD_RETRY_S); a refused one comes back held,
        and so do the ones after it for its topic."""
        if not self._held or now - self._held_retried < HELD_RETRY_S:
            return
        self._held_retried = now
        again, self._held, self._held_topics, self._held_bytes = self._held, [], set(), 0
        for topic, key, value, headers in again:
            self._produce(topic, key, value, headers)

    def _report_held(self, now: float) -> None:
        self.stats.outputs_held = len(self._held)
        if not self._held:
            if self._held_since is not None:
                log.warning("every held output written: offsets are committed again")
            self._held_since = None
            return
        if now - self._held_logged >= 60.0:
            self._held_logged = now
            log.warning("topic(s) %s missing (%s): %d output(s) held (%d bytes) for %.0f s, written again every "
                        "%.0f s; the stage goes on, no offset is committed until they are written",
                        ", ".join(sorted(self._held_topics)), self._held_error, len(self._held), self._held_bytes,
                        now - (self._held_since or now), HELD_RETRY_S)

    def _flush(self) -> None:
        self._held_again(time.monotonic())
        remaining = self.producer.flush(60)
        if remaining or self._delivery_errors:
            # Not written => not committed: raising here makes a supervisor restart us and re-read the batch.
            errs, self._delivery_errors = self._delivery_errors, []
            raise KafkaException(f"{remaining} outputs unflushed, delivery errors: {errs[:3]}")
        if self._paused:
            self.consumer.resume(self.consumer.assignment())
            self._paused = False

    def _commit(self) -> None:
        self._report_held(time.monotonic())
        if self._held:  # commit-after-write: a held output is not written yet
            return
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        offsets = []
        for (topic, part), (off, max_ts) in self.core.commit_points().items():
            key = f"{topic}:{part}"
            if (topic, part) not in assigned or self.stats.last_commit.get(key) == off:
                continue
            offsets.append(TopicPartition(topic, part, off, metadata=commit_metadata(max_ts)))  # a Progress
        if offsets:
            # Asynchronous is still commit-after-write: the outputs are flushed already. A lost commit only means
            # a longer replay, which the deterministic window ids make harmless; the next commit supersedes it.
            self.consumer.commit(offsets=offsets, asynchronous=True)
            self.stats.commits += 1
            for tp in offsets:
                self.stats.last_commit[f"{tp.topic}:{tp.partition}"] = tp.offset
                self._last_commit[(tp.topic, tp.partition)] = tp

    # --- loop ----------------------------------------------------------------------------------------------------
    def run(self, *, idle_exit_s: float | None = None, max_seconds: float | None = None,
            stop: Callable[[], bool] | None = None) -> StageStats:
        """Run until `stop()`, or no message for `idle_exit_s`, or `max_seconds` passed."""
        self.subscribe()
        port = self.settings.ingest.metrics_port
        if port is not None:
            from pipeline.ingest.metrics import serve

            self._metrics = serve(self, port, self.settings.ingest.metrics_addr)
            log.info("metrics on http://%s:%d/metrics", self.settings.ingest.metrics_addr, self._metrics.server_port)
        start = time.monotonic()
        last_data = None  # idle time counts from the first assignment (joining a group can take a while)
        try:
            while not (stop and stop()):
                n = self.step(self.max_wait_s)
                now = time.monotonic()
                if n or (last_data is None and self.consumer.assignment()):
                    last_data = now
                elif idle_exit_s is not None and last_data is not None and now - last_data >= idle_exit_s:
                    break
                if max_seconds is not None and now - start >= max_seconds:
                    break
        finally:
            self.close()
        return self.stats

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint listens on (while `run` runs), or None."""
        return self._metrics.server_port if self._metrics is not None else None

    def close(self) -> None:
        # Open windows are left to be re-read from the committed offset (see module docstring).
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None
        self.producer.flush(30)
        if self._last_commit:
            try:  # make the last asynchronous commit durable before leaving the group
                self.consumer.commit(offsets=list(self._last_commit.values()), asynchronous=False)
            except KafkaException as exc:
                log.warning("final commit failed (a restart replays a little more): %s", exc)
        self.consumer.close()
