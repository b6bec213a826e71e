"""Start the faust detect app in this process (from `trainwatch run`): topics first, then the worker.

The worker (mode's) handles SIGTERM and SIGINT itself: agents stop, offsets of finished batches are committed,
the producer is flushed. Unfinished batches are simply read again by the next start (at-least-once).
"""

from __future__ import annotations

import logging
import time

from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.detect.topics import derived_topics
from pipeline.settings import Settings
from schemas.errors import TrainwatchError

log = logging.getLogger(__name__)


def ensure_topics(settings: Settings, partitions: int, timeout_s: float = 30.0, app_id: str | None = None) -> int:
    """Create missing stage topics; return the input topics' shared partition count (they must be co-partitioned).

    Existing input topics decide the count; `partitions` is used only when none exists yet. With `app_id`, the
    app's derived topics (topics.derived_topics: the owners repartition topic) are created with that same count;
    an existing one with another count is an error (the `owners` table is partitioned like it)."""
    t = settings.topics
    admin = AdminClient(settings.kafka.client_config())
    meta = admin.list_topics(timeout=timeout_s).topics
    inputs = (t.windows, t.cip, t.allocations)
    counts = {name: len(meta[name].partitions) for name in inputs if name in meta}
    n = next(iter(counts.values()), partitions)
    if any(c != n for c in counts.values()):
        raise TrainwatchError(f"input topics are not co-partitioned: {counts} (they must share a partition count)")
    derived = derived_topics(app_id) if app_id else ()
    wrong = {name: len(meta[name].partitions) for name in derived if name in meta and len(meta[name].partitions) != n}
    if wrong:
        raise TrainwatchError(f"derived topics {wrong} do not have the input topics' {n} partition(s)")
    names = (*inputs, t.detections, t.cases, *derived)
    missing = [name for name in names if name not in meta]
    if missing:
        futures = admin.create_topics([NewTopic(m, num_partitions=n, replication_factor=1) for m in missing],
                                      operation_timeout=timeout_s, request_timeout=timeout_s)
        for fut in futures.values():
            try:
                fut.result(timeout=timeout_s)
            except Exception as exc:  # created meanwhile by someone else is fine
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    # Wait until every partition has a leader, so the worker's first fetch does not race metadata.
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(timeout=timeout_s).topics
        if all(x in meta and meta[x].error is None and meta[x].partitions
               and all(p.leader >= 0 for p in meta[x].partitions.values()) for x in names):
            return n
        if time.monotonic() > deadline:
            raise TrainwatchError(f"topics {names} not ready within {timeout_s} s")
        time.sleep(0.2)


def run_detect(settings: Settings, *, app_id: str = "trainwatch-detect", partitions: int = 1,
               loglevel: str = "WARNING") -> None:
    """Run the detect + cases app until SIGTERM/SIGINT."""
    import faust

    from pipeline.detect.faust_app import make_app

    n = ensure_topics(settings, partitions, app_id=app_id)
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # faust creates only its own folder in it
    app, rt = make_app(settings, app_id=app_id, partitions=n)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    log.info("detect app %s: %d partition(s), store %s/%s", app_id, n, settings.clickhouse_dsn, settings.database)
    try:
        worker.execute_from_commandline()
    finally:
        rt.close()
