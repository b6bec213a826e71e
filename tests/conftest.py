"""Shared fixtures: the real Kafka broker (tests/kafka_fixtures.py) and the embedded chDB knowledge store."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.store import Store
from tests.kafka_fixtures import kafka_bootstrap, unique_topic  # noqa: F401  (fixtures, used by name)


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Workers' state (faust's table stores, demo folders) in a temp dir, not in the checkout's ./var; the
    workers the tests start as subprocesses inherit it through the environment."""
    path = tmp_path_factory.mktemp("data")
    old = os.environ.get("TRAINWATCH_DATA_DIR")
    os.environ["TRAINWATCH_DATA_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TRAINWATCH_DATA_DIR", None)
    else:
        os.environ["TRAINWATCH_DATA_DIR"] = old


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
