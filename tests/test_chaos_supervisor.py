"""The chaos run's supervisor (benchmarks/chaos.py Worker.supervise) restarts a worker that exited on its own as a
real supervisor would: a worker exiting right after its start waits longer before each restart (crash-loop back-off)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks import chaos


def _supervise_until(w: chaos.Worker, starts: int, within_s: float) -> float:
    t0 = time.monotonic()
    while w.starts < starts and time.monotonic() - t0 < within_s:
        w.supervise()
        time.sleep(0.01)
    return time.monotonic() - t0


def test_a_worker_exiting_at_once_is_restarted_after_a_growing_delay(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(chaos, "SUPERVISOR_FIRST_S", 0.2)
    w = chaos.Worker([sys.executable, "-c", "import sys; sys.exit(3)"], {}, tmp_path / "w.log")
    w.start()
    w.proc.wait(30)
    first = _supervise_until(w, 2, 10)
    w.proc.wait(30)
    second = _supervise_until(w, 3, 10)
    w.proc.wait(30)  # the third start, reaped here rather than left to the garbage collector
    assert w.starts == 3
    assert [e["rc"] for e in w.own_exits] == [3, 3]
    assert [e["restart_after_s"] for e in w.own_exits] == [0.2, 0.4]
    assert 0.2 <= first < 2 and 0.4 <= second < 3


def test_a_worker_that_ran_a_while_is_restarted_at_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(chaos, "SUPERVISOR_RESET_S", 0.0)  # every run counts as long
    w = chaos.Worker([sys.executable, "-c", "import sys; sys.exit(1)"], {}, tmp_path / "w.log")
    w.start()
    w.proc.wait(30)
    w.supervise()
    assert w.starts == 2 and w.own_exits[0]["restart_after_s"] == 0.0
    w.proc.wait(30)


def test_the_results_table_says_how_many_store_outages_and_how_long() -> None:
    assert chaos._outages(0, 30.0) == "-"
    assert chaos._outages(1, 30.0) == "30 s"
    assert chaos._outages(3, 12.0) == "3 x 12 s"


def test_reading_a_topic_retries_a_log_end_a_moved_leader_refused(monkeypatch) -> None:
    import pytest
    from confluent_kafka import KafkaError, KafkaException

    monkeypatch.setattr(chaos.time, "sleep", lambda s: None)

    class Refusing:
        def __init__(self, refusals: int) -> None:
            self.refusals = refusals

        def get_watermark_offsets(self, tp, timeout):
            if self.refusals:
                self.refusals -= 1
                raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))
            return (0, 42)

    assert chaos._log_end(Refusing(2), "t", 0) == 42
    with pytest.raises(KafkaException):
        chaos._log_end(Refusing(20), "t", 0, tries=3)
