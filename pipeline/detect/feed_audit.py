"""The case feed's gap check: case events the store holds that the feed topic lacks (a crash between the store
write and the publish), republished by the faust app's `cases` agent at start. Consumers dedup on message_id."""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, TopicPartition

from pipeline.cases.core import holds_event
from pipeline.cases.feed import CaseFeedMessage, feed_messages
from pipeline.settings import Settings
from pipeline.store import Store
from schemas.case import CaseEvent
from schemas.policy import Policy
from schemas.serde import loads

log = logging.getLogger(__name__)


def _published_ids(settings: Settings, topic: str, timeout_s: float = 30.0) -> set[str]:
    """message_ids already on the feed topic (read from the beginning to the high watermark)."""
    c = Consumer(settings.kafka.client_config(**{"group.id": "trainwatch-feed-audit", "enable.auto.commit": False}))
    try:
        meta = c.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            return set()
        ends: dict[int, int] = {}
        for p in meta.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if hi > lo:
                ends[p] = hi
        if not ends:
            return set()
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        seen: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            for m in c.consume(1000, 1.0):
                if m.error() is not None:
                    continue
                if m.offset() + 1 >= ends.get(m.partition(), 0):
                    ends.pop(m.partition(), None)
                try:
                    seen.add(loads(m.value())["message_id"])
                except Exception:  # a foreign message on the feed: not ours to republish
                    continue
        if ends:
            raise TimeoutError(f"{topic}: could not read the feed to its end within {timeout_s} s")
        return seen
    finally:
        c.close()


def unpublished(settings: Settings, store: Store, policy: Policy,
                have: set[str] | None = None) -> list[CaseFeedMessage]:
    """Feed messages for case events in the store that the feed topic does not hold (`have`: the feed's message ids,
    read here when not given; the faust app reads them in a thread, off its event loop)."""
    have = _published_ids(settings, settings.topics.cases) if have is None else have
    rows = store.query("SELECT DISTINCT case_id, event_id FROM case_events")
    missing: dict[str, set[str]] = {}
    for r in rows:
        if r["event_id"] not in have:
            missing.setdefault(r["case_id"], set()).add(r["event_id"])
    out: list[CaseFeedMessage] = []
    for cid, ids in missing.items():
        case = store.get_case(cid)
        if case is None:  # a crash after a new case's first events: the re-read input opens it, and publishes them
            continue
        # Not those the stored case does not reflect yet (the same crash on a case already stored): published here
        # with the case as it was, they came again from the re-read input with the case that holds them, under the
        # same message id (a duplicate on the feed in the quick chaos run, Dec 5; consumers keep the first).
        held: list[CaseEvent] = []
        orphans: list[CaseEvent] = []
        for e in store.case_events(cid):
            if e.event_id in ids:
                (held if holds_event(case, e) else orphans).append(e)
        if orphans:
            log.warning("feed audit: %s: %d event(s) not in the stored case yet, left to the re-read input: %s",
                        cid, len(orphans), [e.event_id for e in orphans])
        out += feed_messages([case], held, policy)
    return out
