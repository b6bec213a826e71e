"""A stopping `trainwatch run` exits within its budget even when something it waits on never returns
(pipeline/shutdown.py): the stacks are logged, and the exit code says whether every stage had stopped in order."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A process whose exit hangs the way a librdkafka close can: a non-daemon thread that never returns, which
# interpreter exit joins. argv: budget, "clean" (every stage stopped) or "mid-stop", "hang" or "exit".
SCRIPT = """
import sys, threading, time
from pipeline.shutdown import StopWatchdog

def stuck_in_close():
    time.sleep(600)

w = StopWatchdog(float(sys.argv[1]))
w.arm("SIGTERM")
if sys.argv[2] == "clean":
    w.stopped()
if sys.argv[3] == "hang":
    threading.Thread(target=stuck_in_close, name="stuck").start()
"""


def _run(*args: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stderr, time.monotonic() - t0


@pytest.mark.parametrize(("state", "code"), [("clean", 0), ("mid-stop", 1)])
def test_a_hung_stop_exits_within_its_budget_with_the_stacks(state: str, code: int) -> None:
    rc, err, took = _run("1.5", state, "hang")
    assert rc == code, err
    assert took < 30, f"took {took:.1f} s"  # the stuck thread sleeps 600 s: only the watchdog ends it
    assert "still running 2 s after SIGTERM" in err
    assert "stuck_in_close" in err, err  # the stack of what it waited on
    assert ("a library's teardown hung" in err) is (state == "clean")


def test_a_process_that_stops_by_itself_is_left_alone() -> None:
    rc, err, took = _run("30", "mid-stop", "exit")
    assert rc == 0 and "still running" not in err, err
    assert took < 25


def test_the_faust_workers_stop_signals_arm_the_watchdog(tmp_path: Path) -> None:
    # mode installs the worker's own methods as the loop's signal handlers, and make_worker extends them: if mode
    # renamed them, a detect worker's stop would silently go unbounded
    import inspect
    import signal
    import uuid

    import faust
    import mode

    from pipeline.detect.worker import make_worker

    src = inspect.getsource(mode.Worker)
    for sig, name in (("SIGTERM", "_on_sigterm"), ("SIGINT", "_on_sigint")):
        assert f"add_signal_handler(signal.{sig}, self.{name})" in src
    got: list = []
    app = faust.App(f"t-{uuid.uuid4().hex[:8]}", broker="kafka://127.0.0.1:1", store="memory://", datadir=tmp_path)
    worker = make_worker(app, "WARNING", got.append)
    worker._schedule_shutdown = lambda sig: got.append(sig)  # what mode's handler does next: stop the worker
    worker._on_sigterm()
    worker._on_sigint()
    assert got == ["SIGTERM", signal.SIGTERM, "SIGINT", signal.SIGINT]  # ours first, then faust's stop
