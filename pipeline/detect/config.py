"""The faust app's settings from trainwatch Settings (pure: tests/test_faust_security.py, test_recovery_config.py)."""

from __future__ import annotations

from typing import Any

from pipeline.detect.security import faust_credentials
from pipeline.settings import Settings


def faust_config(settings: Settings, app_id: str, partitions: int) -> dict[str, Any]:
    """Keyword arguments of `faust.App(app_id, ...)`: at-least-once, no web server, topics as provisioned."""
    kafka = settings.kafka
    return dict(
        broker=[f"kafka://{b.strip()}" for b in kafka.bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(kafka), store="memory://",
        datadir=str(settings.data_dir / f"{app_id}-data"), processing_guarantee="at_least_once",
        web_enabled=False, autodiscover=False, topic_partitions=partitions,
        topic_replication_factor=settings.topic_config.replication_factor, topic_allow_declare=True,
        consumer_auto_offset_reset="earliest", broker_commit_interval=1.0, stream_wait_empty=False,
        table_standby_replicas=0,
        # A killed worker's partitions move after the session timeout; with a group instance id (static
        # membership) a restarted worker takes them back at once.
        broker_session_timeout=kafka.session_timeout_s, broker_heartbeat_interval=min(3.0, kafka.session_timeout_s / 3),
        consumer_group_instance_id=f"{kafka.group_instance_id}-detect" if kafka.group_instance_id else None,
    )
