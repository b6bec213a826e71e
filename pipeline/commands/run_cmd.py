"""`trainwatch run [--stage ingest|detect|dlq|all]`: the streaming stages on Kafka until SIGTERM / Ctrl-C.

ingest: pipeline/ingest/kafka_stage.py (confluent-kafka). detect: the faust app (pipeline/detect/faust_app.py),
which also runs the cases stage. dlq: the dead-letter sink (pipeline/dlq_sink.py), DLQ topic -> the store's
dead_letters. `all` runs ingest and the sink in threads beside the faust worker (which owns the signals).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import typer

from pipeline.settings import Settings, load_settings
from pipeline.shutdown import StopWatchdog

log = logging.getLogger(__name__)


class StageName(StrEnum):
    ingest = "ingest"
    detect = "detect"
    dlq = "dlq"
    all = "all"


def _ingest(settings: Settings, group: str, stop: threading.Event) -> None:
    from pipeline.ingest.kafka_stage import KafkaIngestStage

    KafkaIngestStage(settings, group_id=group).run(stop=stop.is_set)


def _or_stop(stage: Callable[..., None], args: tuple, failed: list[str]) -> None:
    """A stage thread of `run --stage all`. One that raises (a fatal consumer error, outputs it could not deliver)
    stops the whole worker, which then exits 1 for its supervisor to restart: a process with a dead stage thread would
    otherwise go on looking alive (seen in the chaos run: ingest fenced after a broker kill, nothing ingested for
    minutes while detect ran on)."""
    try:
        stage(*args)
    except BaseException as exc:
        log.error("stage %s failed, stopping the worker (its supervisor restarts it): %s", stage.__name__, exc)
        failed.append(stage.__name__)
        os.kill(os.getpid(), signal.SIGTERM)  # faust's worker stops on it (agents, commits, producer flush)
        raise


def _dlq(settings: Settings, stop: threading.Event) -> None:
    from pipeline.dlq_sink import run_dlq_sink

    run_dlq_sink(settings, stop=stop.is_set)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        stage: StageName = typer.Option(StageName.all, "--stage", help="which stage(s) to run"),
        app_id: str = typer.Option("trainwatch-detect", "--app-id", help="faust app id (= its consumer group)"),
        ingest_group: str = typer.Option("trainwatch-ingest", "--ingest-group", help="ingest consumer group"),
        loglevel: str = typer.Option("WARNING", "--loglevel"),
        config: Path | None = typer.Option(None, "--config", help="settings TOML file"),
        shadow: str | None = typer.Option(
            None, "--shadow", help="with --stage detect: run this policy profile as a shadow beside the live worker "
            "(own group <app-id>-shadow-<id>-<version>, own detections topic; would-be cases only, no feed, no clock; "
            "provision with `trainwatch topics create --shadow POLICY`)"),
        fault_store_down_file: Path | None = typer.Option(
            None, "--fault-store-down-file", hidden=True,
            help="chaos runs only: the store fails every call while this file exists (pipeline/faults.py)"),
    ) -> None:
        """Run the stages over Kafka until SIGTERM or Ctrl-C."""
        if fault_store_down_file is not None:
            from pipeline.faults import store_down_while

            store_down_while(fault_store_down_file)
        if stage in (StageName.ingest, StageName.dlq):
            # `kill -USR1 PID` prints every thread's stack to stderr: what a stage that will not stop waits on. Not
            # for detect / all: faust's worker installs its own SIGUSR1 handler over it (mode's `cry`: every thread's
            # and task's stack, through its event loop); there the stop watchdog also dumps them at its deadline.
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger().setLevel(loglevel.upper())  # basicConfig is a no-op under the CLI's log_setup handler
        settings = load_settings(config)
        watchdog = StopWatchdog(settings.stop_timeout_s)
        if shadow is not None:
            from pipeline.policy_ops import run_shadow_detect, shadow_settings
            from schemas.errors import ConfigError

            if stage is not StageName.detect:
                raise ConfigError("--shadow runs a detect worker: use it with --stage detect")
            settings, shadow_id = shadow_settings(settings, shadow, app_id)
            run_shadow_detect(settings, app_id=shadow_id, loglevel=loglevel, on_stop_signal=watchdog.arm)
            watchdog.stopped()
            return
        stop = threading.Event()

        def on_signal(sig: int, _frame: object) -> None:
            watchdog.arm(signal.Signals(sig).name)
            stop.set()

        if stage is StageName.dlq:  # needs only the DLQ topic, which the sink checks itself (one line)
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            _dlq(settings, stop)
            watchdog.stopped()
            return
        # Every topic the stage(s) need must exist and be co-partitioned before anything starts (one line, exit 2);
        # `trainwatch topics create` provisions them. Under `all` ingest would otherwise start and write first.
        from pipeline import topics

        n = topics.require(settings, stage.value, app_id)
        if stage is StageName.ingest:
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            _ingest(settings, ingest_group, stop)
            watchdog.stopped()
            return
        from pipeline.detect.worker import run_detect

        threads: list[threading.Thread] = []
        failed: list[str] = []
        if stage is StageName.all:
            for name, target, args in (("ingest", _ingest, (settings, ingest_group, stop)),
                                       ("dlq", _dlq, (settings, stop))):
                threads.append(threading.Thread(target=_or_stop, args=(target, args, failed), name=name, daemon=True))
                threads[-1].start()
        try:
            run_detect(settings, app_id=app_id, partitions=n, loglevel=loglevel, on_stop_signal=watchdog.arm)
        finally:
            watchdog.arm("detect stopped")  # a stage thread that failed stops detect without a signal
            stop.set()
            t0 = time.monotonic()
            for thread in threads:  # each finishes its batch, commits and closes; the watchdog bounds the wait
                thread.join()
                if time.monotonic() - t0 > 10:
                    log.warning("the %s thread took %.1f s to stop after detect", thread.name, time.monotonic() - t0)
            if failed:  # a stage thread died: exit non-zero, whatever faust's stop returned
                raise SystemExit(1)
            watchdog.stopped()
