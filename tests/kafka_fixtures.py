"""Pytest fixtures for tests that need a real Kafka broker.

Bring your own broker with ``TRAINWATCH_TEST_KAFKA_BOOTSTRAP=host:port``; otherwise the project's local broker
on ``127.0.0.1:${TRAINWATCH_KAFKA_PORT:-9092}`` is used, and started with ``deploy/local/kafka.sh start`` if it is
not already listening (so plain ``pytest`` works without CI). A broker started here is left running for the
next run; ``deploy/local/kafka.sh stop`` stops it.

Load from ``tests/conftest.py`` with ``from tests.kafka_fixtures import *`` or ``pytest_plugins``; the ``kafka``
marker is registered in pyproject.toml.
Every wait below has a deadline, so a broken broker fails a test instead of hanging CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

# Only fixtures: no hooks, so ``import *`` in a conftest can never replace the conftest's own hooks.
__all__ = ["kafka_bootstrap", "unique_topic"]

_REPO = Path(__file__).resolve().parent.parent
_KAFKA_SH = _REPO / "deploy" / "local" / "kafka.sh"
_START_TIMEOUT_S = 300  # a first start may resolve the jars with Maven before the broker's own 90 s readiness wait
_TOPIC_TIMEOUT_S = 30.0


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap servers of a usable broker: the one named by the env var, else the local one (started if needed)."""
    external = os.environ.get("TRAINWATCH_TEST_KAFKA_BOOTSTRAP")
    if external:
        _provision_defaults(external)
        return external
    port = int(os.environ.get("TRAINWATCH_KAFKA_PORT", "9092"))
    if not _listening("127.0.0.1", port):
        # The script's readiness check needs confluent_kafka: give it this interpreter, which has it.
        env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
        try:
            proc = subprocess.run(
                ["bash", str(_KAFKA_SH), "start"],
                env=env,
                capture_output=True,
                text=True,
                timeout=_START_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{_KAFKA_SH} start did not finish within {_START_TIMEOUT_S}s")
        if proc.returncode != 0:
            pytest.fail(f"{_KAFKA_SH} start failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    bootstrap = f"127.0.0.1:{port}"
    _provision_defaults(bootstrap)
    return bootstrap


def _provision_defaults(bootstrap: str) -> None:
    """The local broker runs with auto.create.topics.enable=false, as production should: create the topics under
    their default names (what a test that overrides only some names falls back to, e.g. the DLQ), the way an
    operator does with `trainwatch topics create`. Tests' own topics come from ``unique_topic``."""
    from pipeline import topics
    from pipeline.settings import KafkaSettings, Settings, TopicSettings

    topics.create(Settings(kafka=KafkaSettings(bootstrap_servers=bootstrap), topics=TopicSettings()))


def _wait_for_leaders(admin: AdminClient, topic: str, partitions: int, deadline: float) -> None:
    # create_topics returns once the controller accepted the topic; wait until every partition has a leader so
    # the first produce/subscribe does not race metadata propagation.
    while time.monotonic() < deadline:
        meta = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if (
            meta is not None
            and meta.error is None
            and len(meta.partitions) == partitions
            and all(p.leader >= 0 for p in meta.partitions.values())
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {topic} has no leader for all {partitions} partitions after {_TOPIC_TIMEOUT_S}s")


@pytest.fixture
def unique_topic(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Factory: ``unique_topic("name", partitions=3)`` creates ``name-<uuid>`` and deletes it after the test."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def make(prefix: str = "test", partitions: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            operation_timeout=_TOPIC_TIMEOUT_S,
            request_timeout=_TOPIC_TIMEOUT_S,
        )
        futures[name].result(timeout=_TOPIC_TIMEOUT_S)
        created.append(name)
        _wait_for_leaders(admin, name, partitions, time.monotonic() + _TOPIC_TIMEOUT_S)
        return name

    yield make

    if created:
        futures = admin.delete_topics(created, operation_timeout=_TOPIC_TIMEOUT_S, request_timeout=_TOPIC_TIMEOUT_S)
        for name, future in futures.items():
            try:
                future.result(timeout=_TOPIC_TIMEOUT_S)
            except Exception as exc:  # a leftover uniquely named topic is harmless; don't fail the test on it
                warnings.warn(f"could not delete test topic {name}: {exc}", stacklevel=1)
