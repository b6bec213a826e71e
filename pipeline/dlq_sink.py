"""The dead-letter sink: `telemetry.dlq` -> the store's `dead_letters` (the Kafka path's counterpart of what the
in-process runner writes directly).

Ingest produces each letter with the original bytes (or the bad row) as VALUE and its provenance in headers
(pipeline/ingest/dlq.py: dlq.reason, dlq.detail, dlq.topic, dlq.partition, dlq.offset, dlq.row). The sink reads
them with a consumer group, inserts a batch, and commits the group's offsets only after the insert returned:
at-least-once, made exactly-once in effect by the store, whose letter id is a content hash of (source topic,
partition, offset, row, bytes): a letter ingest re-emits after a restart, or one the sink reads twice, lands on
its row again. Letters from a PII topic (the settings' CIP topic) keep their bytes only in the restricted
`dead_letter_payloads` (Store.insert_dead_letters). A message with no provenance headers is stored as
`unlabelled` with the DLQ topic's own coordinates, never dropped.

Started by `trainwatch run --stage dlq` (or as a thread of `--stage all`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import Message as KafkaMessage

from pipeline.detect.store_retry import TRANSIENT, backoff
from pipeline.settings import Settings
from pipeline.store import DeadLetter, Store, StoreError
from schemas.errors import TrainwatchError

log = logging.getLogger(__name__)

DEFAULT_GROUP = "trainwatch-dlq-sink"
FIRST_RETRY_S, MAX_RETRY_S = 0.2, 5.0  # backoff while the store is down (as the detect agents', store_retry.py)
UNLABELLED = "unlabelled"


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def letter_from(msg: KafkaMessage, now: float) -> DeadLetter:
    """A store letter from one DLQ record (headers as ingest writes them; missing ones fall back to the record)."""
    headers: dict[str, str] = {}
    for k, v in msg.headers() or []:
        if k.startswith("dlq.") and v is not None:
            headers[k] = v.decode("utf-8", "replace")
    labelled = "dlq.reason" in headers and "dlq.topic" in headers
    ts_type, ts_ms = msg.timestamp()
    partition = _int(headers.get("dlq.partition"))
    return DeadLetter(
        reason=headers.get("dlq.reason", UNLABELLED),
        detail=headers.get("dlq.detail", "" if labelled else f"no dlq.* headers on {msg.topic()}"),
        topic=headers["dlq.topic"] if labelled else msg.topic(),
        partition=(partition if partition is not None else 0) if labelled else msg.partition(),
        offset=_int(headers.get("dlq.offset")) if labelled else msg.offset(),
        row=_int(headers.get("dlq.row")),
        raw=msg.value() or b"",
        at=ts_ms / 1000.0 if ts_type != 0 and ts_ms > 0 else now,  # 0 = TIMESTAMP_NOT_AVAILABLE
    )


class DlqSink:
    """Consume the DLQ topic into the store. `step()` handles one batch; `run()` loops until `stop()`."""

    def __init__(self, settings: Settings, store: Store, *, group_id: str = DEFAULT_GROUP, batch_size: int = 1000,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.store = store
        self.topic = settings.topics.dlq
        self.batch_size = batch_size
        self.clock = clock
        self.stored = 0
        self._held: list[DeadLetter] | None = None  # a batch read but not yet stored (the store was down)
        self._down_since: float | None = None
        self._retry_s = FIRST_RETRY_S
        self.consumer = Consumer(settings.kafka.client_config(**{
            "group.id": group_id,
            "enable.auto.commit": False,  # commit after the insert
            "auto.offset.reset": "earliest",
        }))
        try:
            meta = self.consumer.list_topics(timeout=10)
        except KafkaException as exc:
            self.consumer.close()
            raise TrainwatchError(f"Kafka at {settings.kafka.bootstrap_servers} did not answer: "
                                  f"{exc.args[0].str() if exc.args else exc}") from exc
        if self.topic not in meta.topics or meta.topics[self.topic].error is not None:
            self.consumer.close()
            raise TrainwatchError(f"topic {self.topic!r} does not exist; create it with `trainwatch topics create`")
        self.consumer.subscribe([self.topic])

    def step(self, timeout: float = 1.0) -> int:
        """Read up to batch_size letters, store them, then commit. Returns how many were stored.

        A store outage must not cost letters or stop the sink (in `run --stage all` it is a thread that nothing
        restarts): the batch is held, uncommitted, and retried with capped backoff on the next steps; no new letter
        is read meanwhile. A commit that fails after the insert (the group rebalanced while the store was down) is
        logged: the letters are stored, and the ones read again land on their own rows (content-hash ids)."""
        if self._held is None:
            msgs = self.consumer.consume(self.batch_size, timeout)
            good = []
            for m in msgs:
                err = m.error()
                if err is None:
                    good.append(m)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s: consume error: %s", self.topic, err)
            if not good:
                return 0
            now = self.clock()
            self._held = [letter_from(m, now) for m in good]
        try:
            n = self.store.insert_dead_letters(self._held)
        except TRANSIENT as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("dlq sink: store unavailable, holding %d letter(s) until it answers: %s",
                            len(self._held), exc)
            time.sleep(self._retry_s)
            self._retry_s = min(MAX_RETRY_S, self._retry_s * 2)
            return 0
        if self._down_since is not None:
            log.warning("dlq sink: store back after %.1f s", time.monotonic() - self._down_since)
        self._held, self._down_since, self._retry_s = None, None, FIRST_RETRY_S
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as exc:
            log.warning("dlq sink: commit after insert failed (%s); re-read letters land on their own rows", exc)
        self.stored += n
        return n

    def run(self, *, stop: Callable[[], bool] | None = None, idle_exit_s: float | None = None) -> int:
        """Until `stop()` (or, for tests and one-off drains, no letter for `idle_exit_s`). Returns letters stored."""
        last = time.monotonic()
        try:
            while not (stop and stop()):
                if self.step():
                    last = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last >= idle_exit_s:
                    break
        finally:
            self.close()
        return self.stored

    def close(self) -> None:
        self.consumer.close()


def open_store_waiting(settings: Settings, stop: Callable[[], bool] | None = None, *, first_delay_s: float = 0.5,
                       max_delay_s: float = 5.0) -> Store | None:
    """The settings' store, waiting out an outage (an unreachable server: the driver's transient errors) with capped
    backoff; None if `stop()` turns true meanwhile. A store that answers with an error is raised at once. Without
    this a worker restarted during a store outage stopped at once, again and again (30 restarts in 30 s in a quick
    chaos run), where it should wait, as its stages do for a store that goes away later."""
    warned = False
    for delay in backoff(first_delay_s, max_delay_s):
        try:
            return Store.from_settings(settings)
        except StoreError as exc:
            if not isinstance(exc.__cause__, TRANSIENT):
                raise
            if not warned:
                log.warning("dlq sink: store unavailable at start, waiting until it answers: %s", exc)
                warned = True
        if stop is not None and stop():
            return None
        time.sleep(delay)
    raise AssertionError("unreachable: backoff() never ends")


def run_dlq_sink(settings: Settings, *, stop: Callable[[], bool] | None = None, group_id: str = DEFAULT_GROUP) -> int:
    """The `run --stage dlq` entry: the settings' store (waited for) and DLQ topic until `stop()`."""
    store = open_store_waiting(settings, stop)
    if store is None:
        return 0
    with store:
        sink = DlqSink(settings, store, group_id=group_id)
        log.info("dlq sink: %s -> %s/%s", sink.topic, settings.clickhouse_dsn, settings.database)
        return sink.run(stop=stop)
