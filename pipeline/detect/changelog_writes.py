"""The first changelog write of the detect app's tables that did not reach the changelog, on every table store.

faust sends a table write to its changelog and only logs a send that fails (`Topic._on_published`): the table in
memory holds the value, the changelog does not, and the next offset commit would cover input whose state a restart
cannot recover. Met on a real worker (tests/test_faust_changelog_refused.py): an engine changelog whose
`max.message.bytes` is below an engine state was refused ~2,600 times in 10 s while the worker went on and committed.
A write refused so is recorded here, the worker stops (`on_failure`: the app's crash), and the offset commit refuses
to move past it (fetch_guard.commit_after_state reads `failed`): a restart reads that input again.

It was the local RocksDB store's job (`LocalStore`) until then, so a worker on the in-memory store (no group instance
id: the default, and every chaos run) had no such guard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("trainwatch.startup")  # shown at the CLI's default level


class ChangelogWrites:
    """Watches each table's `send_changelog` futures; `failed` is the first that completed with an error."""

    def __init__(self, on_failure: Callable[[BaseException], None]) -> None:
        self.failed: BaseException | None = None
        self.refused = 0  # writes that failed, the first and any after it (only the first is logged)
        self._on_failure = on_failure

    def watch(self, table: Any) -> None:
        send: Callable[..., Any] = table.send_changelog
        name = getattr(table, "name", "?")

        def send_changelog(*args: Any, **kwargs: Any) -> Any:
            fut = send(*args, **kwargs)
            fut.add_done_callback(lambda f: self._done(name, f))
            return fut

        table.send_changelog = send_changelog

    def _done(self, table: str, fut: Any) -> None:
        if fut.cancelled():  # the producer stopping: the commit on the way out waits for the buffer (or stops)
            return
        exc = fut.exception()
        if exc is None:
            return
        self.refused += 1
        if self.failed is None:
            self.failed = exc
            log.error("changelog write of table %s failed (%r): no offset is committed from now on; stopping the "
                      "worker (a restart reads this input again once the changelog takes the writes)", table, exc)
            self._on_failure(exc)
