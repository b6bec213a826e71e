"""The re-decide journal survives a restart (issue #12, "Faults lose nothing"): an engine restored from its per-account
serialised state (split -> JSON -> from_split, as the faust tables keep it) in the middle of a stream, then handed a
correction of a window applied before the save, re-decides exactly as an engine that never stopped: the same
detections (ids and content, in order) and the same state."""

from __future__ import annotations

import json

import pytest

from detectors.classifier_base import RuleClassifier
from detectors.engine import DetectEngine
from detectors.snapshot import from_split, split
from pipeline.detect.tables import MemoryTable, StageTables, unpack
from pipeline.settings import Settings
from schemas.detection import Detection
from schemas.windows import WindowAggregate
from tests.detector_builders import T0, W, alloc, cip, demo, window
from tests.test_detectors_engine import _half, feed


def _restored(eng: DetectEngine, classifier: RuleClassifier | None = None) -> DetectEngine:
    """The engine as a restart finds it: its split state through JSON (the changelog's bytes) and back."""
    shared, parts = split(eng)
    shared, parts = json.loads(json.dumps(shared)), json.loads(json.dumps(parts))
    return from_split(shared, parts, demo(), classifier)


def _dump(dets: list[Detection]) -> list[dict]:
    return [d.model_dump(mode="json") for d in dets]


Classifiers = tuple[RuleClassifier, RuleClassifier]


def _stream(restart_at: int | None, late: int = 3, n: int = 9,
            classifiers: Classifiers | None = None) -> tuple[DetectEngine, list[Detection]]:
    """Account acct-c (foreign) runs n windows of 3e17 (crossing T inside window 3); window `late` first comes
    half-merged and its rest two windows later, with an allocation of acct-c and a CIP update of acct-o between.
    With `restart_at`, the engine is restored from its split state before window `restart_at` (after the partial
    window was applied: its correction then needs the journal from before the restart). `classifiers`: the
    engine's before and after the restart (default: the rule)."""
    before, after = classifiers or (None, None)
    eng = DetectEngine(demo(), before)
    out = eng.on_cip(cip("acct-c")) + eng.on_cip(cip("acct-o"))
    for i in range(n):
        if i == restart_at:
            eng = _restored(eng, after)
        w = window("wl-c", "acct-c", i, flop=3e17)
        out += feed(eng, [_half(w) if i == late else w, window("wl-o", "acct-o", i, flop=1e16)])
        if i == late + 1:
            out += eng.on_allocation(alloc("acct-c", "reserved", T0 + i * W + W, reserved_until=T0 + 7200))
            out += eng.on_cip(cip("acct-o", updated_at=T0 + i))
        if i == late + 2:
            out += feed(eng, [window("wl-c", "acct-c", late, flop=3e17)])  # the late rows, merged: the whole window
    return eng, out


def test_a_restored_engine_re_decides_a_correction_of_a_window_applied_before_the_restart():
    never, never_dets = _stream(None)
    assert never.redecided["corrections"] == 1 and never.redecided["superseded"] == 1
    for restart_at in (4, 5):  # before the allocation of acct-c, and after it (the journal holds both kinds)
        eng, dets = _stream(restart_at)
        assert eng.redecided["corrections"] == 1 and eng.redecided["too_old"] == 0
        assert _dump(dets) == _dump(never_dets)
        assert eng.to_dict() == never.to_dict()
        # The journal itself survives: a second restart right after the first re-decides the same way.
        again = _restored(eng)
        assert split(again) == split(eng)


class _Counting(RuleClassifier):
    """The rule, counting its verdicts; `memo_id` as a loaded artifact has one (its sha256), or none."""

    def __init__(self, memo_id: str | None) -> None:
        super().__init__()
        self.calls = 0
        if memo_id:
            self.memo_id = memo_id

    def predict(self, history):
        self.calls += 1
        return super().predict(history)


def _stream_counting(memo_id: str | None) -> tuple[DetectEngine, list[Detection], int]:
    """`_stream` restored at window 5 with a fresh counting classifier (a new process): the verdicts the restored
    engine asked for (the correction at window 5 rebuilds the journal from its base)."""
    after = _Counting(memo_id)
    eng, out = _stream(5, classifiers=(_Counting(memo_id), after))
    return eng, out, after.calls


def test_a_restored_journal_keeps_its_verdicts_and_a_rebuild_does_not_classify_its_inputs_again():
    """The first correction after a restart rebuilds the journal from its base, applying its inputs again; with a
    model that has a content id, their verdicts come from the journal (a restart's first batch spent up to 8.5 of
    9.7 s classifying them again in the chaos run), and the outcome is the same as classifying them."""
    never, never_dets = _stream(None)
    kept, kept_dets, kept_calls = _stream_counting("sha256:test-model")
    redone, redone_dets, redone_calls = _stream_counting(None)
    assert kept.redecided["corrections"] == redone.redecided["corrections"] == 1
    assert _dump(kept_dets) == _dump(redone_dets) == _dump(never_dets)
    assert kept.to_dict() == redone.to_dict() == never.to_dict()
    # the rebuild replays acct-c's windows 0-2 (before the corrected one) from the journal's verdicts: 14 -> 11
    assert redone_calls - kept_calls == 3, (kept_calls, redone_calls)


def test_a_restored_engine_restored_again_before_the_journal_is_rebuilt_keeps_it():
    """Restored twice before the correction (the rebuilt-on-demand journal is saved again as it was loaded)."""
    never, never_dets = _stream(None)
    eng = DetectEngine(demo())
    out = eng.on_cip(cip("acct-c")) + eng.on_cip(cip("acct-o"))
    for i in range(9):
        if i in (4, 5):
            eng = _restored(eng)
        w = window("wl-c", "acct-c", i, flop=3e17)
        out += feed(eng, [_half(w) if i == 3 else w, window("wl-o", "acct-o", i, flop=1e16)])
        if i == 4:
            out += eng.on_allocation(alloc("acct-c", "reserved", T0 + i * W + W, reserved_until=T0 + 7200))
            out += eng.on_cip(cip("acct-o", updated_at=T0 + i))
        if i == 5:
            out += feed(eng, [window("wl-c", "acct-c", 3, flop=3e17)])
    assert _dump(out) == _dump(never_dets)
    assert eng.to_dict() == never.to_dict()


_Table = MemoryTable  # pipeline/detect/tables.py


def _partial(i: int, part: int, flop: float, account: str = "acct-c", workload: str = "wl-c") -> WindowAggregate:
    """Telemetry partition `part`'s half of window i (4 of the workload's 8 devices)."""
    start = T0 + i * W
    return WindowAggregate(window_id=f"{workload}-{i}-{part}", workload_id=workload, account_id=account,
                           partition=part, window_start=start, window_end=start + W, sample_count=24,
                           device_count=4, node_count=1, devices=[f"{workload}-{part}-{d}" for d in range(4)],
                           nodes=[f"{workload}-n{part}"], device_seconds=240.0, flop=flop, flop_low=flop * 0.9,
                           flop_high=flop * 2, basis="tensor_active", accelerators={"H100": 4},
                           features=dict(window("x", "x", 0).features or {}))


def _batch(tabs: StageTables, items: list) -> list[Detection]:
    """One detect batch of partition 0 through the tables, as batch.feed_partition runs it, then saved."""
    st, _ = tabs.stage(0)
    st.begin_batch()
    out: list[Detection] = []
    for x in items:
        if isinstance(x, WindowAggregate):
            tabs.before_window(0, st, x)
            out.extend(st.on_window(x))
        else:
            out.extend(st.on_cip(x))
    out.extend(st.end_batch())
    out.extend(st.on_time())
    tabs.save(0, st)
    return out


def _stage_stream(restart_at: int | None) -> tuple[list[Detection], StageTables]:
    """The faust detect path without Kafka (StageTables over dict tables, one batch per window): acct-c's windows
    come from telemetry partitions 0 and 1; partition 1's half of window 3 comes late, after window 5 (a
    correction). With `restart_at`, the tables are reloaded into a fresh StageTables (a worker restart) before
    window `restart_at`: the journal's windows are rebuilt from the partials table."""
    settings = Settings(model_path="rule")
    tabs = StageTables(_Table(), _Table(), settings, demo(), None)
    out: list[Detection] = []

    def batch(items: list) -> None:
        out.extend(_batch(tabs, items))

    batch([cip("acct-c", updated_at=T0 - 10), cip("acct-o", updated_at=T0 - 10)])
    for i in range(10):
        if i == restart_at:
            tabs = StageTables(_Table(tabs.engine.data), _Table(tabs.partials.data), settings, demo(), None)
        items: list = [_partial(i, 0, 1.5e17), _partial(i, 2, 5e15, "acct-o", "wl-o")]
        if i != 3:
            items.append(_partial(i, 1, 1.5e17))
        if i == 6:
            items.append(_partial(3, 1, 1.5e17))  # the late half of window 3
        batch(items)
    st, _ = tabs.stage(0)
    out.extend(st.flush())
    return out, tabs


def test_a_restarted_detect_stage_re_decides_from_the_journal_it_saved():
    never, _ = _stage_stream(None)
    ct = [d for d in never if d.detector_id == "compute_threshold"]
    assert len(ct) >= 2 and len({d.detection_id for d in ct}) == 1  # re-decided: the crossing superseded
    for restart_at in (5, 6):
        dets, tabs = _stage_stream(restart_at)
        assert _dump(dets) == _dump(never)
        st, _ = tabs.stage(0)
        assert st.engine.redecided["corrections"] == 1 and st.engine.redecided["too_old"] == 0
    # What the changelog holds: per account its journal's base and steps, each step's windows as partial ids.
    steps = {k: v for k, v in tabs.engine.data.items() if k.startswith(b"0|s|acct-c|")}
    assert len(steps) >= 5 and all(b'"ref":1' in v for v in steps.values())
    assert any(k.startswith(b"0|j|acct-c|") for k in tabs.engine.data)
    assert not any(b'"sums"' in v for v in steps.values())  # references, not the merged windows


def test_a_journal_whose_entries_do_not_match_is_dropped():
    """A kill between the entries of one save can leave a step entry that is not the one the account's entry lists:
    the restored journal is dropped (never replayed wrong: a correction then replaces figures only)."""
    settings = Settings(model_path="rule")
    _, tabs = _stage_stream(None)
    data = dict(tabs.engine.data)
    assert StageTables(_Table(data), _Table(tabs.partials.data), settings, demo(), None).stage(0)[0].engine._journal
    key = min(k for k in data if k.startswith(b"0|s|acct-c|"))
    data[key] = data[key].replace(b'"ref":1', b'"ref":2')
    st, _ = StageTables(_Table(data), _Table(tabs.partials.data), settings, demo(), None).stage(0)
    assert "acct-c" not in st.engine._journal and "acct-o" in st.engine._journal


def test_a_kill_between_any_two_messages_of_a_save_leaves_a_journal_that_restores():
    """Copy-on-write journal entries (pipeline/detect/tables.py): whichever prefix of a save's changelog messages
    reached the broker before a kill -9, the restored account keeps a journal, so a later correction re-decides.
    Written in place, a kill between a step entry and the account's entry dropped it (chaos run h-61: a crossing
    computed without its late rows stood, acct-resold dated 124 s late)."""
    settings = Settings(model_path="rule")
    tabs = StageTables(_Table(), _Table(), settings, demo(), None)

    def batch(items: list) -> None:
        _batch(tabs, items)

    batch([cip("acct-c", updated_at=T0 - 10)])
    cuts = 0
    for i in range(45):  # past the re-decide horizon (steps dropped) and a rebase (a new base entry)
        before, sent = dict(tabs.engine.data), len(tabs.engine.sent)
        late = [_partial(i - 4, 1, 1e16).model_copy(update={"window_id": f"late-{i}"})] if i % 5 == 4 else []
        batch([_partial(i, 0, 1e16), _partial(i, 1, 1e16), *late])  # late rows of a window 4 back: a correction
        msgs = tabs.engine.sent[sent:]
        journals = []
        for k in range(len(msgs) + 1):
            data = _Table.after(before, msgs[:k])
            st, _ = StageTables(_Table(data), _Table(tabs.partials.data), settings, demo(), None).stage(0)
            journals.append("acct-c" in st.engine._journal)
        if journals[0]:  # a journal saved before this save survives a kill anywhere in it
            assert all(journals), (i, journals, [m[1] for m in msgs])
            cuts += len(journals)
    assert cuts >= 150
    # what a save leaves over after a kill (entries no account lists) is tombstoned by the next save
    st, _ = tabs.stage(0)
    listed = {key for key in tabs.engine.data if key.startswith((b"0|s|", b"0|j|"))}
    assert len(listed) == len(unpack(tabs.engine.data[b"0|a|acct-c"])["journal"]) + 1


def test_a_restored_journal_whose_partials_are_gone_replaces_figures_only():
    """A window reference that can no longer be merged again (its partials gone from the table): the account's
    journal is dropped and the correction counted as one past the horizon, once; nothing is rolled back."""
    eng = DetectEngine(demo())
    eng.window_source = lambda ref: None  # windows persisted as references to partials that will be gone
    eng.on_cip(cip("acct-c"))
    for i in range(6):
        w = window("wl-c", "acct-c", i, flop=3e17)
        feed(eng, [_half(w) if i == 3 else w])
    shared, parts = split(eng)
    wins = [x for s in parts["acct-c"]["journal"]["steps"] for kind, x in s["in"] if kind == "win"]
    assert len(wins) == 6 and all(x["ref"] == 1 for x in wins)
    restored = from_split(json.loads(json.dumps(shared)), json.loads(json.dumps(parts)), demo())
    restored.window_source = lambda ref: None
    before = restored.runs.copy()
    feed(restored, [window("wl-c", "acct-c", 3, flop=3e17)])
    assert restored.errors["journal_unresolved"] == 1 and restored.redecided["too_old"] == 1
    assert restored.redecided["corrections"] == 0 and "acct-c" in restored._journal  # a fresh journal from here
    (run,) = restored.runs.values()
    assert set(before) == set(restored.runs) and run.used == eng.runs[run.run_id].used + 1.5e17


def test_partials_a_journal_holds_outlive_the_lateness_until_the_journal_goes():
    """The partials table drops a window's partials an allowed lateness behind the partition's watermark, unless a
    journal still holds the window (an account lagging the others): a restart must be able to merge it again."""
    _, tabs = _stage_stream(None)
    st, _ = tabs.stage(0)
    lateness = tabs.settings.ingest.allowed_lateness_s
    held = {k for k in tabs.partials.data if k.startswith(b"0|wl-c|")}
    assert held and st.engine.journal_oldest_window() == T0
    st.watermark += lateness + 10 * W  # the partition moved on; acct-c's journal is younger than REPLACE_HORIZON_S
    tabs.save(0, st)
    assert held <= set(tabs.partials.data)
    st.engine.on_time(st.watermark + lateness)  # now idle past the horizon: the journals go, then their partials
    tabs.save(0, st)
    assert not st.engine._journal and not held & set(tabs.partials.data)


def _sums(tabs: StageTables) -> dict[str, tuple[float, float | None]]:
    st, _ = tabs.stage(0)
    return {r.run_id: (r.used, (r.crossed or {}).get("at")) for r in st.engine.runs.values()}


def test_a_kill_anywhere_in_a_save_restarts_to_the_runs_sums_and_detections_of_no_kill():
    """Whatever prefix of one save's changelog messages reached the broker before a kill -9 (the engine table's and
    the partials table's, independently: two topics), a restart re-reading that batch's input ends with every run's
    sum, crossing and detection as a worker never killed. Windows settle two batches after they come (settle_s), so a
    save applies windows read in an earlier batch, whose offsets are committed. With the stage's shared entry (what
    waits to settle) written before the accounts, a kill between them restored a stage that had released two windows
    its accounts never got: lost from the run's sum for good (chaos runs: a crossing dated 117 s late, an owner's
    case lost)."""
    settings = Settings(model_path="rule")
    n = 12

    def items(i: int) -> list:
        out: list = [_partial(i, 0, 1.5e17), _partial(i, 1, 1.5e17), _partial(i, 2, 5e15, "acct-o", "wl-o")]
        return out + ([_partial(i - 3, 1, 1e16).model_copy(update={"window_id": f"late-{i}"})] if i == 7 else [])

    def run(tabs: StageTables, batches: range, out: list[Detection]) -> None:
        for i in batches:
            out += _batch(tabs, items(i))
        out += tabs.stage(0)[0].flush()

    ref_out: list[Detection] = [*_batch(ref := StageTables(_Table(), _Table(), settings, demo(), None),
                                        [cip("acct-c", updated_at=T0 - 10), cip("acct-o", updated_at=T0 - 10)])]
    run(ref, range(n), ref_out)
    want = {d.detection_id: _dump([d]) for d in ref_out}
    assert _sums(ref) and any(at is not None for _, at in _sums(ref).values())  # acct-c crosses
    cases = 0
    for kill in range(2, 9):
        tabs = StageTables(_Table(), _Table(), settings, demo(), None)
        out = _batch(tabs, [cip("acct-c", updated_at=T0 - 10), cip("acct-o", updated_at=T0 - 10)])
        for i in range(kill):
            out += _batch(tabs, items(i))
        engine, partials = dict(tabs.engine.data), dict(tabs.partials.data)
        e0, p0 = len(tabs.engine.sent), len(tabs.partials.sent)
        out += _batch(tabs, items(kill))  # outputs acked before its state is saved; its input is read again
        em, pm = tabs.engine.sent[e0:], tabs.partials.sent[p0:]
        for ce in range(len(em) + 1):
            for cp in sorted({0, len(pm) // 2, len(pm)}):
                restarted = StageTables(_Table(_Table.after(engine, em[:ce])), _Table(_Table.after(partials, pm[:cp])),
                                        settings, demo(), None)
                got = list(out)
                for i in range(kill, n):
                    got += _batch(restarted, items(i))
                got += restarted.stage(0)[0].flush()
                assert _sums(restarted) == _sums(ref), (kill, ce, cp)
                assert {d.detection_id: _dump([d]) for d in got} == want, (kill, ce, cp)
                cases += 1
    assert cases >= 60


def test_a_partial_re_read_past_the_lateness_does_not_replace_its_window_with_a_fraction():
    """A restart whose state had gone further than the allowed lateness past the committed offset re-reads partials
    of windows whose other partials it has forgotten (merger and partials table drop them past the lateness). One
    merged alone would replace the window counted whole with a fraction of it (the kill fuzz: a run 1.19e16 FLOP
    short after a late one-sample partial came again alone). The engine leaves the window as counted: the delivery
    holds less than counted, an incomplete merge (a window's merge only grows as its partials arrive)."""
    settings = Settings(model_path="rule")
    tabs = StageTables(_Table(), _Table(), settings, demo(), None)
    _batch(tabs, [cip("acct-c", updated_at=T0 - 10)])
    late = _partial(2, 0, 1e15).model_copy(update={"window_id": "late-2", "sample_count": 1, "revision": 3})
    for i in range(6):
        _batch(tabs, [_partial(i, 0, 1.5e17), *([late] if i == 4 else [])])
    lateness = settings.ingest.allowed_lateness_s
    for i in range(6, 8 + int(lateness // W)):  # the stream goes on past the lateness
        _batch(tabs, [_partial(i, 0, 1.5e17)])
    restarted = StageTables(_Table(tabs.engine.data), _Table(tabs.partials.data), settings, demo(), None)
    before = _sums(restarted)
    applied = 6 + lateness // W  # all but the 2 windows still settling
    assert sum(used for used, _ in before.values()) == pytest.approx(applied * 1.5e17 + 1e15, rel=1e-9)
    assert not any(k.startswith(b"0|wl-c|" + repr(T0 + 2 * W).encode()) for k in restarted.partials.data)
    _batch(restarted, [late])  # read again after a restart: its window's first partial is long forgotten
    st, _ = restarted.stage(0)
    assert _sums(restarted) == before and st.engine.errors["window_merge_incomplete"] == 1


def test_a_window_delivered_with_less_than_counted_changes_nothing_inside_the_journal_too():
    """Inside the re-decide horizon an incomplete merge (less FLOP than the window's delivery counted) is no
    correction: nothing is rolled back or re-decided, and the sums stay."""
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-c"))
    for i in range(6):
        feed(eng, [window("wl-c", "acct-c", i, flop=3e17)])
    (run,) = eng.runs.values()
    used = run.used
    feed(eng, [window("wl-c", "acct-c", 4, flop=1e15)])  # window 4 again, merged from one late partial alone
    (run,) = eng.runs.values()  # (a re-decision would have replaced the run's state object)
    assert run.used == used and eng.redecided["corrections"] == 0 and eng.redecided["rollbacks"] == 0
    feed(eng, [window("wl-c", "acct-c", 4, flop=3.1e17)])  # a real correction (more rows) still re-decides
    (run,) = eng.runs.values()
    assert run.used == pytest.approx(used + 1e16) and eng.redecided["corrections"] == 1
