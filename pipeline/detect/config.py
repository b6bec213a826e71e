"""The faust app's settings from trainwatch Settings (pure: tests/test_faust_security.py, test_recovery_config.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.detect.security import faust_credentials
from pipeline.settings import Settings

#: `memory` forces the in-memory table store (a restart replays every changelog in full): the recovery benchmark's
#: baseline, and a way out should the local RocksDB be unwanted.
STORE_ENV = "TRAINWATCH_TABLE_STORE"
LOCAL_STORE = "trainwatch-local"


def table_store(settings: Settings, app_id: str) -> tuple[str, Path | None]:
    """faust's table store URL and table directory.

    A worker with a stable identity (`kafka.group_instance_id`: static membership, one running worker per id)
    keeps its tables in a local RocksDB per partition under `<data_dir>/<app_id>-data/tables-<id>`
    (pipeline/detect/local_store.py), so a restart replays only the changelogs' tail. The directory is per worker
    id: two workers of one app on a host never share (or wait on the LOCK of) a DB. Without an id (dynamic
    membership, e.g. two test workers of one app) the tables stay in memory and a restart replays the changelogs
    in full."""
    iid = settings.kafka.group_instance_id
    if not iid or os.environ.get(STORE_ENV, "").lower() == "memory":
        return "memory://", None
    from faust.stores import STORES

    STORES.aliases.setdefault(LOCAL_STORE, "pipeline.detect.local_store:LocalStore")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in iid)
    return f"{LOCAL_STORE}://", settings.data_dir / f"{app_id}-data" / f"tables-{safe}"


def faust_config(settings: Settings, app_id: str, partitions: int) -> dict[str, Any]:
    """Keyword arguments of `faust.App(app_id, ...)`: at-least-once, no web server, topics as provisioned."""
    kafka = settings.kafka
    store, tabledir = table_store(settings, app_id)
    return dict(
        broker=[f"kafka://{b.strip()}" for b in kafka.bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(kafka), store=store,
        datadir=str(settings.data_dir / f"{app_id}-data"), processing_guarantee="at_least_once",
        **({"tabledir": str(tabledir)} if tabledir is not None else {}),
        web_enabled=False, autodiscover=False, topic_partitions=partitions,
        topic_replication_factor=settings.topic_config.replication_factor, topic_allow_declare=True,
        consumer_auto_offset_reset="earliest", broker_commit_interval=1.0, stream_wait_empty=False,
        table_standby_replicas=0,
        # A killed worker's partitions move after the session timeout; with a group instance id (static
        # membership) a restarted worker takes them back at once.
        broker_session_timeout=kafka.session_timeout_s, broker_heartbeat_interval=min(3.0, kafka.session_timeout_s / 3),
        # One message may be as large as the topics accept (settings.topic_config.max_message_bytes, 8 MiB; faust's
        # own default is 1,000,000 bytes): a table entry or output the producer refused would stop the worker.
        producer_max_request_size=settings.topic_config.max_message_bytes,
        consumer_group_instance_id=f"{kafka.group_instance_id}-detect" if kafka.group_instance_id else None,
    )
