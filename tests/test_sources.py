"""Delivery order of a scenario folder (pipeline/sources.py): side records follow the telemetry's event time."""

from __future__ import annotations

from pathlib import Path

import orjson

from pipeline.sources import Record, held_back, read_folder

T0 = 1_740_960_000.0


def _write(folder: Path, telemetry_ts: list[float], cip_at: float) -> None:
    (folder / "telemetry.jsonl").write_bytes(b"".join(orjson.dumps({"ts": t, "device": "d"}) + b"\n"
                                                      for t in telemetry_ts))
    (folder / "cip.jsonl").write_bytes(orjson.dumps({"account_id": "a", "updated_at": cip_at}) + b"\n")


def _cip_position(folder: Path) -> int:
    return [r.stream for r in read_folder(folder)].index("cip")


def test_one_line_far_ahead_does_not_release_side_records_early(tmp_path: Path) -> None:
    steady = [T0 + 10 * i for i in range(100)]
    _write(tmp_path, steady, T0 + 500)
    clean = _cip_position(tmp_path)
    _write(tmp_path, [T0 + 7200, *steady], T0 + 500)  # a bad clock on the first line
    assert _cip_position(tmp_path) == clean + 1  # same place among the good lines (one more line before it)


def test_a_jump_that_two_lines_confirm_is_taken(tmp_path: Path) -> None:
    ts = [T0 + 10 * i for i in range(10)] + [T0 + 7200 + 10 * i for i in range(10)]
    _write(tmp_path, ts, T0 + 3600)
    assert _cip_position(tmp_path) == 11  # released as the jump's second line comes, not held to the end


def test_held_back_delivers_one_stream_late_and_keeps_every_record() -> None:
    recs = [Record("telemetry", i, b"", 100.0 + 10 * i) for i in range(10)]
    recs[3:3] = [Record("allocations", 0, b"", 105.0), Record("allocations", 1, b"", None)]
    recs.insert(6, Record("cip", 0, b"", 120.0))
    recs.insert(0, Record("allocations", 2, b"", 40.0))  # dated long before the telemetry, came before any of it
    got = list(held_back(recs, "allocations", 30.0))
    assert sorted(got, key=id) == sorted(recs, key=id)
    order = [(r.stream, r.offset) for r in got]
    # 100 (the first time seen) + 30: just before the telemetry at 130 passes it (as read_folder releases side
    # records), not at once; the ones that came after the telemetry at 120 (dated 105, and without a time): 120 + 30,
    # before the telemetry at 150, in their order
    assert order.index(("allocations", 2)) == order.index(("telemetry", 3)) - 1
    assert order.index(("allocations", 0)) == order.index(("telemetry", 5)) - 2
    assert order.index(("allocations", 1)) == order.index(("telemetry", 5)) - 1
    assert [r.offset for r in got if r.stream == "telemetry"] == list(range(10))
    assert [r.stream for r in held_back(recs, "allocations", 1e9)][-3:] == ["allocations"] * 3
