"""Fault injection for chaos runs (benchmarks/chaos.py): the ClickHouse store made unavailable for a while.

`trainwatch run --fault-store-down-file PATH` wraps the store's client: while PATH exists, every call raises the
driver's own OperationalError, as an unreachable ClickHouse server would; once PATH is gone calls go through
again. Nothing else changes, so what the stages do with a failing store is what they would do in production.
Off (no wrapper at all) unless the option is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The calls that reach the server; attributes (database, ...) pass through untouched.
_CALLS = frozenset({"command", "query", "query_arrow", "query_df", "query_np", "raw_query", "insert", "raw_insert",
                    "insert_arrow", "insert_df", "query_rows", "query_column_block_stream", "query_row_block_stream"})


class _FlakyClient:
    def __init__(self, client: Any, down_file: Path) -> None:
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_down", down_file)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in _CALLS or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._down.exists():
                from clickhouse_connect.driver.exceptions import OperationalError

                raise OperationalError(f"store unavailable (fault injection: {self._down} exists)")
            return attr(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._client, name, value)


def store_down_while(down_file: Path) -> None:
    """From now on, every Store this process opens fails its calls while `down_file` exists."""
    from pipeline.store import Store

    if getattr(Store.__init__, "_trainwatch_fault", False):
        return
    original = Store.__init__

    def __init__(self: Store, client: Any, database: str, applied: list[str]) -> None:
        original(self, _FlakyClient(client, down_file), database, applied)

    __init__._trainwatch_fault = True  # type: ignore[attr-defined]
    Store.__init__ = __init__  # type: ignore[method-assign]
