"""Store writes from the faust agents wait out a ClickHouse outage instead of crashing the worker.

An agent that raises on a failed store call stops the worker; its batch is re-read after a restart, but what the
agent had already applied in memory (engine state, held owners) runs ahead of what the store holds, and the chaos
run measured reportable cases lost that way. So a store call that fails with a connection-level error is retried
with capped backoff, awaiting (the event loop keeps heartbeating, the consumer stops taking input: backpressure)
until the store answers. Errors that say the call itself is wrong are not retried: they would never pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from clickhouse_connect.driver.exceptions import OperationalError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Transient: the server is unreachable or went away mid-call (clickhouse-connect raises OperationalError for
#: both, and for the fault injection in pipeline/faults.py); OSError covers sockets failing below the driver.
TRANSIENT = (OperationalError, ConnectionError, TimeoutError, OSError)


def backoff(first_s: float, max_s: float) -> Iterator[float]:
    """Delays between retries: `first_s`, doubling, capped at `max_s` (every retry loop of the stages)."""
    delay = first_s
    while True:
        yield delay
        delay = min(max_s, delay * 2)


async def stored(what: str, call: Callable[[], T], *, first_delay_s: float = 0.2, max_delay_s: float = 5.0) -> T:
    """`call()`, retried while the store is unreachable. Calls must be idempotent (the store's are: ids are
    content hashes, tables replace by id, case events carry insert dedup tokens)."""
    down_since, attempts = None, 0
    for delay in backoff(first_delay_s, max_delay_s):
        try:
            out = call()
        except TRANSIENT as exc:
            attempts += 1
            if down_since is None:
                down_since = time.monotonic()
                log.warning("store unavailable during %s, retrying until it answers: %s", what, exc)
            await asyncio.sleep(delay)
            continue
        if down_since is not None:
            log.warning("store back for %s after %.1f s (%d retries)", what, time.monotonic() - down_since, attempts)
        return out
