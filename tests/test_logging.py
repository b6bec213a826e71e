"""Structured logs: formats, one record per traceback, rate-limited repeats, no escape codes off a terminal."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import log_setup
from pipeline.log_setup import RepeatLimiter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = threading.excepthook, sys.excepthook
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    threading.excepthook, sys.excepthook = hooks
    logging.captureWarnings(False)


def _boom() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("t.boom").exception("it broke: %s", "why")


def test_json_lines_one_record_per_traceback(restore_logging: None) -> None:
    out = io.StringIO()
    log_setup.configure("json", "INFO", stream=out)
    logging.getLogger("t.a").info("hello %s", "world")
    _boom()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "hello world" and first["level"] == "INFO" and first["logger"] == "t.a"
    assert first["ts"].endswith("Z")
    assert second["msg"] == "it broke: why" and "ZeroDivisionError" in second["exc"]
    assert second["exc"].startswith("Traceback") and second["exc"].count("\n") >= 3


def test_logfmt_escapes_and_keeps_one_line(restore_logging: None) -> None:
    out = io.StringIO()
    log_setup.configure("logfmt", "INFO", stream=out)
    logging.getLogger("t.b").warning('quote " and\nnewline')
    _boom()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("ts=") and ' level=WARNING logger=t.b msg="quote \\" and\\nnewline"' in lines[0]
    assert 'exc="Traceback' in lines[1] and "ZeroDivisionError" in lines[1]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_escape_codes_off_a_terminal(restore_logging: None) -> None:
    painted = "\x1b[31mred\x1b[0m text"
    for fmt in log_setup.FORMATS:
        out = io.StringIO()
        log_setup.configure(fmt, "INFO", stream=out)
        logging.getLogger("t.c").error(painted)
        assert "\x1b" not in out.getvalue() and "red text" in out.getvalue(), fmt
    tty = _Tty()
    log_setup.configure("text", "INFO", stream=tty)
    logging.getLogger("t.c").error("plain")
    assert "\x1b[31m" in tty.getvalue()  # colour only for people at a terminal


def test_thread_crash_is_one_error_record(restore_logging: None) -> None:
    out = io.StringIO()
    log_setup.configure("json", "WARNING", stream=out)

    def die() -> None:
        raise RuntimeError("ingest thread exploded")

    t = threading.Thread(target=die, name="ingest")
    t.start()
    t.join()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == 1
    r = records[0]
    assert r["level"] == "ERROR" and "thread ingest died" in r["msg"] and "RuntimeError" in r["exc"]


def test_repeats_are_rate_limited_with_a_count() -> None:
    now = [0.0]
    limiter = RepeatLimiter(burst=3, every_s=10.0, clock=lambda: now[0])
    out = io.StringIO()
    handler = log_setup.make_handler("json", out, limiter)
    log = logging.getLogger("t.flood")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        for i in range(1000):  # a broker outage: the same line with changing numbers
            now[0] += 0.005
            log.warning("connect to 127.0.0.1:%d failed after %d ms", 9092, i)
        log.warning("a different problem")
        now[0] += 10.0
        log.warning("connect to 127.0.0.1:%d failed after %d ms", 9092, 1000)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == 5  # 3 at once, the different one, one after the pause
    assert records[3]["msg"] == "a different problem"
    assert records[4]["suppressed"] == 997 and limiter.unreported() == 0


_LIBRDKAFKA = """
import sys, time
from pipeline import log_setup
from pipeline.settings import KafkaSettings
from confluent_kafka import Consumer
if sys.argv[1] == "structured":
    log_setup.configure("json", "INFO")
    conf = KafkaSettings(bootstrap_servers="127.0.0.1:1").client_config(**{"group.id": "g"})
else:
    conf = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}
c = Consumer({**conf, "reconnect.backoff.ms": 10, "reconnect.backoff.max.ms": 50})
c.subscribe(["t"])
end = time.monotonic() + 4
while time.monotonic() < end:
    c.poll(0.1)
c.close()
"""


def test_librdkafka_lines_are_structured_and_limited() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(mode: str) -> list[str]:
        p = subprocess.run([sys.executable, "-c", _LIBRDKAFKA, mode], capture_output=True, text=True, timeout=60,
                           env=env)
        assert p.returncode == 0, p.stderr
        return [line for line in p.stderr.splitlines() if line.strip()]

    raw, structured = run("raw"), run("structured")
    records = [json.loads(line) for line in structured]  # every line is a JSON record
    assert records and all(r["logger"] == "librdkafka" or r["logger"] == "trainwatch" for r in records)
    assert len(records) < len(raw), (len(records), len(raw))
    print(f"4 s against a dead broker: {len(raw)} raw librdkafka lines, {len(records)} structured records")
