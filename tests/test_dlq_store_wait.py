"""run --stage dlq (a thread of --stage all) waits for a store that is down at its start instead of stopping the
worker: a worker restarted during a store outage crash-looped (30 restarts in 30 s in a quick chaos run)."""

from __future__ import annotations

from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import OperationalError

from pipeline import dlq_sink
from pipeline.settings import Settings
from pipeline.store import StoreError


def _failing(times: int, cause: BaseException, calls: list[int]) -> Any:
    def from_settings(settings: Settings) -> Any:
        calls.append(1)
        if len(calls) <= times:
            raise StoreError("ClickHouse store down") from cause
        return "store"

    return from_settings


def test_an_unreachable_store_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(dlq_sink.Store, "from_settings", _failing(3, OperationalError("unreachable"), calls))
    assert dlq_sink.open_store_waiting(Settings(), first_delay_s=0.01) == "store" and len(calls) == 4


def test_a_store_that_answers_with_an_error_is_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(dlq_sink.Store, "from_settings", _failing(3, ValueError("bad migration"), calls))
    with pytest.raises(StoreError):
        dlq_sink.open_store_waiting(Settings(), first_delay_s=0.01)
    assert len(calls) == 1


def test_a_stop_while_waiting_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(dlq_sink.Store, "from_settings", _failing(100, OperationalError("unreachable"), calls))
    assert dlq_sink.open_store_waiting(Settings(), lambda: len(calls) >= 2, first_delay_s=0.01) is None
    assert len(calls) == 2
