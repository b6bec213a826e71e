"""Start the faust detect app in this process (from `trainwatch run`): topics first, then the worker.

The worker (mode's) handles SIGTERM and SIGINT itself: agents stop, offsets of finished batches are committed,
the producer is flushed. Unfinished batches are simply read again by the next start (at-least-once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.settings import Settings

log = logging.getLogger(__name__)


def ensure_topics(settings: Settings, partitions: int | None = None, timeout_s: float = 10.0,
                  app_id: str | None = None) -> int:
    """Check (never create) the detect app's topics; return the input topics' shared partition count.

    Topics are provisioned by `trainwatch topics create` (pipeline/topics.py). A missing topic or broken
    co-partitioning (inputs, the owners topic and the app's changelogs) is a one-line TrainwatchError here, before
    faust starts: faust would otherwise fail on every start ("Unrecognized partition"). `partitions` is accepted for
    the call site only: the existing topics decide the count."""
    from pipeline import topics

    return topics.require(settings, "detect", app_id or topics.DEFAULT_APP_ID, timeout_s=timeout_s)


def make_worker(app: Any, loglevel: str, on_stop_signal: Callable[[str], None] | None = None) -> Any:
    """The faust worker for `app`, quiet, on the CLI's logging; `on_stop_signal(name)` is called as SIGTERM / SIGINT
    arrives, before faust starts stopping (pipeline/shutdown.py bounds how long that may take)."""
    import faust

    class Worker(faust.Worker):
        # mode installs these as the loop's signal handlers itself; ours is called first
        def _on_sigterm(self) -> None:
            if on_stop_signal is not None:
                on_stop_signal("SIGTERM")
            super()._on_sigterm()

        def _on_sigint(self) -> None:
            if on_stop_signal is not None:
                on_stop_signal("SIGINT")
            super()._on_sigint()

    # override_logging=False: keep the CLI's structured handler (pipeline/log_setup.py); mode's own replaces it with
    # a colour handler on stdout and turns stderr writes (thread tracebacks) into one WARNING record per token.
    worker = Worker(app, loglevel=loglevel, quiet=True, override_logging=False)
    worker.spinner = None  # its progress spinner writes escape codes (ESC[?25h) to stdout, terminal or not
    return worker


def run_detect(settings: Settings, *, app_id: str = "trainwatch-detect", partitions: int = 1,
               loglevel: str = "WARNING", on_stop_signal: Callable[[str], None] | None = None) -> None:
    """Run the detect + cases app until SIGTERM/SIGINT (`on_stop_signal`: as `make_worker`)."""
    from pipeline.detect.startup import phase

    phase("detect-entry")
    import faust  # noqa: F401  (its import is the phase timed)

    from pipeline.detect.faust_app import make_app

    phase("imported")
    n = ensure_topics(settings, partitions, app_id=app_id)
    phase("topics-checked")
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # faust creates only its own folder in it
    app, rt = make_app(settings, app_id=app_id, partitions=n)
    if settings.detect.metrics_port is not None:
        from pipeline.stage_metrics import serve
        from pipeline.store import Store

        # The case gauges (per status, due within 3 days, overdue) read the store at scrape time through a client
        # of their own; an embedded chDB store belongs to the agents alone (one engine per process, not shared
        # across threads), so there the console's /metrics (`trainwatch serve`) serves them.
        gauges = None if settings.clickhouse_dsn.startswith("chdb") else Store.connect(settings.clickhouse_dsn,
                                                                                        settings.database)
        serve(settings.detect.metrics_port, settings.detect.metrics_addr, store=gauges, stage=rt.metrics)
    worker = make_worker(app, loglevel, on_stop_signal)
    log.info("detect app %s: %d partition(s), store %s/%s", app_id, n, settings.clickhouse_dsn, settings.database)
    try:
        worker.execute_from_commandline()
    finally:
        rt.close()
