"""A bound on how long `trainwatch run` takes to stop once it is asked to (SIGTERM / SIGINT).

Stopping is ordered and normally takes seconds: faust's agents stop and commit, the producer flushes, the ingest
and dead-letter threads finish their batch, commit and close. But some of it waits on things outside our code: a
librdkafka `close()` or handle destroy that never returns while the broker is unwell (confluent-kafka-python issues
#1573 and #1667), an executor thread in the middle of a 30 s broker call that interpreter exit joins. A worker that
hangs there looks alive to its supervisor and holds its partitions until it is killed.

So the first stop signal arms a timer. If the process is still here `budget_s` later, every thread's stack goes to
stderr (what it was waiting on), then the process exits: 0 when every stage had already stopped in order (only a
library's teardown hung: nothing is lost), else 1. Either way nothing is lost that a restart does not read again:
every stage commits its input only after its outputs are written (at-least-once, idempotent downstream).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


class StopWatchdog:
    """Exits the process `budget_s` after `arm()` unless it has exited by itself; `stopped()` records that every
    stage stopped in order (the exit code is then 0)."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self._timer: threading.Timer | None = None
        self._lock = threading.RLock()  # arm() runs in signal handlers: a second signal may arrive inside it
        self._clean = False
        self.why = ""

    def arm(self, why: str) -> None:
        """Start the countdown (once; later calls keep the first deadline)."""
        with self._lock:
            if self._timer is not None:
                return
            self.why = why
            self._timer = threading.Timer(self.budget_s, self._fire)
            self._timer.name = "stop-watchdog"
            self._timer.daemon = True  # never what keeps the process alive
            self._timer.start()

    def stopped(self) -> None:
        """Every stage stopped in order: what is left is the interpreter's own exit."""
        self._clean = True

    def _fire(self) -> None:
        code = 0 if self._clean else 1
        log.error("still running %.0f s after %s (%s); exiting %d without waiting further, every thread's stack "
                  "follows. A restart reads again whatever was not committed.", self.budget_s, self.why,
                  "every stage had stopped, a library's teardown hung" if self._clean else "a stage had not stopped",
                  code)
        for h in logging.getLogger().handlers:
            h.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(code)
