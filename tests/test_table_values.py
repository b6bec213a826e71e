"""A large run never makes a message the broker refuses (a refused changelog write or output stops the detect worker,
and it would be refused again after every restart: a stage stopped for good by the runs it exists to find).

An account's engine entry grows with its run's workloads and the windows it remembers: table values longer than
`PACK_ABOVE` are written compressed, and read back as written; a detection lists at most `WORKLOAD_IDS_K` workloads
and counts the rest."""

from __future__ import annotations

import hashlib
import json

import pytest

from benchmarks.large_run import workload_window
from detectors.base import DetectContext, Detector
from detectors.foreign_person import determine
from detectors.state import WORKLOAD_IDS_K
from pipeline.detect import tables
from pipeline.detect.batch import Msg, feed_partition
from pipeline.detect.tables import PACK_ABOVE, MemoryTable, StageTables, dumps, pack, unpack
from pipeline.settings import Settings
from schemas.detection import Detection
from schemas.serde import encode
from schemas.windows import WindowAggregate
from tests.detector_builders import T0, cip, demo

#: faust's default producer request size: a plain value over it was refused before values were compressed
PRODUCER_DEFAULT = 1_000_000


def test_values_round_trip_short_ones_plain_long_ones_compressed() -> None:
    small = {"watermark": float("-inf"), "held": [1, 2]}
    assert pack(small) == dumps(small) and unpack(pack(small)) == small  # entries written before read as they were
    big = {"seen": {f"wl-{i}|{T0 + i}": [1e17, 9e16, 2e17] for i in range(2000)}, "w": float("inf")}
    raw, packed = dumps(big), pack(big)
    assert len(raw) > PACK_ABOVE and packed[:1] == b"Z" and len(packed) < len(raw) / 4
    assert unpack(packed) == big


def _window(wid: str, i: int) -> WindowAggregate:
    return workload_window(wid, i, "acct-x", T0)


def test_a_large_runs_account_entry_fits_one_message_and_restores() -> None:
    """64 workloads with 600-character ids (the schema allows 1024) over 24 windows: as JSON the account entry is
    over the producer's default request size; as written it is far below, and a restart restores the same engine."""
    settings, topics = Settings(model_path="rule"), Settings().topics
    engine, partials = MemoryTable(), MemoryTable()
    tabs = StageTables(engine, partials, settings, demo(), None)
    ids = [(f"pod-{n:03d}-" + hashlib.sha256(str(n).encode()).hexdigest() * 10)[:600] for n in range(64)]
    off = iter(range(10**6))
    st = feed_partition(tabs, 0, [Msg(topics.cip, 0, next(off), encode(cip("acct-x")))], topics, at=0.0).stage
    for i in range(24):
        msgs = [Msg(topics.windows, 0, next(off), encode(_window(wid, i))) for wid in ids]
        st = feed_partition(tabs, 0, msgs, topics, at=0.0).stage
        tabs.save(0, st)
    entry = engine.data[b"0|a|acct-x"]
    assert len(dumps(unpack(entry))) > PRODUCER_DEFAULT  # what was refused
    assert max(len(v or b"") for _, _, v in engine.sent) < PRODUCER_DEFAULT / 4
    restored, _ = StageTables(MemoryTable(engine.data), MemoryTable(partials.data), settings, demo(), None).stage(0)
    assert json.dumps(restored.engine.to_dict(), sort_keys=True) == json.dumps(st.engine.to_dict(), sort_keys=True)


def _state(st: object) -> str:
    return json.dumps(st.engine.to_dict(), sort_keys=True)  # type: ignore[attr-defined]


def test_an_entry_too_large_for_one_message_is_written_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine entry longer than PIECE_BYTES (here 4 KiB, so a test-sized run has some: the account's, the
    partition's shared entry with its settling windows, journal steps) goes as pieces, then the entry naming them,
    then the tombstones of the pieces it named before: no message is longer than a piece, a restart restores the
    same engine, and a kill -9 after any message of a save restores the state before or after it (copy-on-write);
    the pieces a kill leaves over are tombstoned by the next save. Before, an entry was one message: one account's
    run near 20,000 workloads passed the topic's 8 MiB and the refused write stopped the worker after every restart."""
    monkeypatch.setattr(tables, "PIECE_BYTES", 4096)
    settings, topics = Settings(model_path="rule"), Settings().topics
    engine, partials = MemoryTable(), MemoryTable()
    tabs = StageTables(engine, partials, settings, demo(), None)
    ids = [f"pod-{n:04d}-" + hashlib.sha256(str(n).encode()).hexdigest() for n in range(120)]
    off = iter(range(10**6))
    st = feed_partition(tabs, 0, [Msg(topics.cip, 0, next(off), encode(cip("acct-x")))], topics, at=0.0).stage
    cuts = 0
    for i in range(6):
        before, sent = dict(engine.data), len(engine.sent)
        msgs = [Msg(topics.windows, 0, next(off), encode(_window(wid, i))) for wid in ids]
        st = feed_partition(tabs, 0, msgs, topics, at=0.0).stage
        tabs.save(0, st)
        save = engine.sent[sent:]
        assert all(len(v or b"") <= 4096 for _, _, v in save)
        keys = [k for _, k, _ in save]
        if b"0|a|acct-x" not in keys or not any(k.endswith(b"|a|acct-x") and k.startswith(b"0|c|") for k in keys):
            continue
        # the account's new pieces, then its entry, then its old pieces' tombstones
        mine = [n for n, (_, k, _) in enumerate(save) if k.startswith(b"0|c|") and k.endswith(b"|a|acct-x")]
        entry_at = keys.index(b"0|a|acct-x")
        new = [n for n in mine if save[n][2] is not None]
        assert new and max(new) < entry_at and all(n > entry_at for n in mine if save[n][2] is None)
        was, now = _logical(before, settings), _logical(engine.data, settings)
        for k in range(len(save) + 1):  # a kill after any message of the save: each entry whole, old or new
            cut = MemoryTable(MemoryTable.after(before, save[:k]))
            got = _logical(cut.data, settings)
            assert all(v in (was.get(e), now.get(e)) for e, v in got.items()), k
            assert set(got) <= set(was) | set(now), k
            again = StageTables(cut, MemoryTable(partials.data), settings, demo(), None)
            again.save(0, again.stage(0)[0])  # restores; the next save leaves no piece that no entry names
            assert {x for x in cut.data if x.startswith(b"0|c|")} == _named(cut.data), k
            cuts += 1
    assert cuts and any(x.startswith(b"0|c|") for x in engine.data)
    assert {x for x in engine.data if x.startswith(b"0|c|")} == _named(engine.data)
    again = StageTables(MemoryTable(engine.data), MemoryTable(partials.data), settings, demo(), None)
    assert unpack(engine.data[b"0|shared"]).get(tables._PIECES)  # the shared entry too (its settling windows)
    assert again.recovered_watermarks() == {0: st.applied_to}
    restored, _ = again.stage(0)
    assert _state(restored) == _state(st)


def _logical(data: dict[bytes, bytes], settings: Settings) -> dict[bytes, bytes]:
    """The engine entries of partition 0 as the stage wrote them (pieces put together)."""
    return StageTables(MemoryTable(data), MemoryTable(), settings, demo(), None)._entries(b"0|")


def _named(data: dict[bytes, bytes]) -> set[bytes]:
    """The pieces the entries in `data` name."""
    out = set()
    for k, v in data.items():
        if not k.startswith(b"0|c|") and v.startswith(b'{"' + tables._PIECES.encode()):
            crc, n = unpack(v)[tables._PIECES]
            out |= {tables.StageTables._piece_key(k, crc, i) for i in range(n)}
    return out


class _Any(Detector):
    id = "test_any"

    def detect(self, state: DetectContext, event: object) -> list:
        return []


def _detection(ids: list[str], total: int | None = None) -> Detection:
    policy = demo()
    ctx = DetectContext(policy, 60.0, "acct-x", determine(cip("acct-x"), policy), cip("acct-x"))
    return _Any().detection(ctx, outcome="reportable", reason="compute_used", event_time=T0, summary="s",
                            evidence={}, run_id="run-big", workload_ids=ids, workloads_total=total)


def test_a_detection_lists_the_first_workloads_and_counts_them_all() -> None:
    ids = [f"pod-{n:05d}" for n in range(WORKLOAD_IDS_K + 50)]
    det = _detection(ids)
    assert det.workload_ids == ids[:WORKLOAD_IDS_K] and det.evidence["workload_ids_total"] == len(ids)
    few = _detection(ids[:3])
    assert few.workload_ids == ids[:3] and "workload_ids_total" not in few.evidence
    # an owner's runs list their first workloads only: the count the caller knows is kept
    assert _detection(ids[:3], total=900).evidence["workload_ids_total"] == 900
