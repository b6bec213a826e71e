"""Shared fixtures: the real Kafka broker (tests/kafka_fixtures.py) and the embedded chDB knowledge store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.store import Store
from tests.kafka_fixtures import kafka_bootstrap, unique_topic  # noqa: F401  (fixtures, used by name)


@pytest.fixture(scope="session")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one chDB engine path of this test process (chDB allows one path per process)."""
    return tmp_path_factory.mktemp("chdb") / "store"


@pytest.fixture
def store(store_path: Path) -> Iterator[Store]:
    """A migrated store on a fresh, uniquely named database, dropped after the test."""
    s = Store.connect(f"chdb://{store_path}", f"test_{uuid.uuid4().hex[:12]}")
    try:
        yield s
    finally:
        try:
            s.drop_database()
        finally:
            s.close()
