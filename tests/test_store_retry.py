"""The stages' retry loop (pipeline/detect/store_retry.py): transient store errors are waited out with capped
backoff, an error that says the call is wrong is raised at once."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from pipeline.detect import store_retry
from pipeline.detect.store_retry import backoff, stored


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    assert list(itertools.islice(backoff(0.2, 1.0), 6)) == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_stored_retries_an_unreachable_store_until_it_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    monkeypatch.setattr(store_retry.asyncio, "sleep", sleep)
    calls = iter([OperationalError("down"), ConnectionError("reset"), "rows"])

    def call() -> str:
        x = next(calls)
        if isinstance(x, Exception):
            raise x
        return x

    assert asyncio.run(stored("windows", call, first_delay_s=0.1, max_delay_s=0.15)) == "rows"
    assert slept == [0.1, 0.15]


def test_stored_raises_an_error_that_a_retry_would_not_cure() -> None:
    def call() -> None:
        raise DatabaseError("Code: 60. Unknown table")

    with pytest.raises(DatabaseError):
        asyncio.run(stored("windows", call))
