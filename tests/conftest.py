"""Shared fixtures: the real Kafka broker (tests/kafka_fixtures.py) and the embedded chDB knowledge store."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.ingest.aggregate import WindowConfig
from pipeline.ingest.stage import IngestCore, SourceMessage
from pipeline.simulator import simulate
from pipeline.sources import read_folder
from pipeline.store import Store
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.errors import InvalidMessage
from schemas.serde import decode
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


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Any]]:
    """The demo scenario's detect inputs in delivery order: windows as ingest closes them, CIP, allocations (the
    demo's deliberately bad records left out). Shared by the engine and fuzz tests."""
    folder = simulate("demo", tmp_path_factory.mktemp("demo") / "demo", seed=0)
    ingest = IngestCore(WindowConfig(), "native")
    out: list[tuple[str, Any]] = []
    telemetry: list[SourceMessage] = []
    now = 4e9  # processing time after the simulated period: nothing depends on when the test runs

    def flush() -> None:
        if telemetry:
            ingest.process("gpu.telemetry", 0, telemetry, now=now)
            telemetry.clear()
            out.extend(("win", w) for w in ingest.ready())

    for rec in read_folder(folder):
        if rec.stream == "telemetry":
            telemetry.append(SourceMessage(rec.offset, rec.value))
            if len(telemetry) >= 5000:
                flush()
            continue
        flush()
        try:
            out.append(("cip", decode(CipRecord, rec.value)) if rec.stream == "cip"
                       else ("alloc", decode(AllocationEvent, rec.value)))
        except InvalidMessage:
            continue  # the demo's deliberately bad records
    flush()
    out.extend(("win", w) for w in ingest.drain())
    return out
