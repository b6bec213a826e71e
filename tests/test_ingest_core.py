"""The ingest core without Kafka: decoding, validation, windows, corrections, dedup, replay after a crash."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np
import orjson
import pytest

from detectors.catalog import resolve
from detectors.compute import ACHIEVABLE_SHARE
from pipeline.ingest import synth
from pipeline.ingest.aggregate import WindowConfig
from pipeline.ingest.stage import IngestCore, SourceMessage
from schemas.windows import WindowAggregate

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a window boundary
NOW = T0 + 10_000


def run(core: IngestCore, values: list[bytes], batch: int = 100, partition: int = 0, start: int = 0):
    """Feed messages in batches like the Kafka adapter does; returns (windows, dead letters)."""
    wins: list[WindowAggregate] = []
    dead = []
    for i in range(0, len(values), batch):
        msgs = [SourceMessage(start + i + j, v) for j, v in enumerate(values[i : i + batch])]
        dead += core.process("telemetry", partition, msgs, NOW)
        wins += core.ready()
    return wins, dead


def totals(wins: list[WindowAggregate]) -> dict:
    by_id = {w.window_id: w for w in wins}  # downstream dedups by window_id
    return {
        "flop": sum(w.flop for w in by_id.values()),
        "flop_high": sum(w.flop_high for w in by_id.values()),
        "device_seconds": sum(w.device_seconds for w in by_id.values()),
        "samples": sum(w.sample_count for w in by_id.values()),
    }


def expected_flop(rows: list[dict]) -> float:
    peak = resolve(rows[0]["accelerator"]).peak(None)
    return sum(r["interval_s"] * peak * r["tensor_active"] for r in rows)


SPEC = synth.WorkloadSpec("wl-a", nodes=2, gpus_per_node=4)


def test_windows_add_up_to_the_per_sample_formula() -> None:
    rows = synth.samples([SPEC], T0, 300, 5.0)
    core = IngestCore()
    wins, dead = run(core, [v for _, v in synth.native(rows)])
    wins += core.drain()
    assert dead == []
    t = totals(wins)
    assert t["samples"] == len(rows)
    assert t["flop"] == pytest.approx(expected_flop(rows), rel=1e-9)
    assert t["device_seconds"] == pytest.approx(5.0 * len(rows))
    assert {w.window_start for w in wins} == {T0 + 60 * k for k in range(5)}
    w0 = wins[0]
    assert (w0.device_count, w0.node_count, w0.basis, w0.accelerators) == (8, 2, "tensor_active", {
        "NVIDIA H100 80GB HBM3": 8})
    # band [BF16 peak x the part's achievable share of it, FP8 peak]: a tensor-active cycle is not one at the dense
    # peak, and how far below it is the part's (catalog column): Hopper 0.65, not the default 0.8
    share = resolve("NVIDIA H100 80GB HBM3").achievable_share
    assert share == pytest.approx(0.65) and share != ACHIEVABLE_SHARE
    assert w0.flop_low == pytest.approx(share * w0.flop)
    assert w0.flop_high == pytest.approx(2 * w0.flop, rel=0.01)
    assert w0.offsets["telemetry:0"][0] == 0


@pytest.mark.parametrize("fmt", ["columnar", "otlp", "prometheus"])
def test_every_format_gives_the_native_totals(fmt: str) -> None:
    rows = synth.samples([SPEC], T0, 180, 10.0, with_interval=fmt == "columnar")
    cfg = WindowConfig()
    ref = IngestCore(cfg)
    ref_w, _ = run(ref, [v for _, v in synth.native(rows)])
    ref_w += ref.drain()
    decoder = {"columnar": "native", "otlp": "otlp_json", "prometheus": "prometheus_json"}[fmt]
    core = IngestCore(cfg, decoder=decoder)
    values = [v for _, v in getattr(synth, fmt)(rows)]
    wins, dead = run(core, values, batch=7 if fmt == "prometheus" else 3)  # fragments straddle batches
    wins += core.drain()
    assert dead == []
    # Without interval_s a device's first sample takes the gap to its next one; when that is in a later batch
    # (small batches here) its interval is unknown: 0 s in the point, max_interval_s in the high, counted.
    assert not any("samples.interval_unknown" in w.sums for w in ref_w)
    unknown = sum(w.sums.get("samples.interval_unknown", 0.0) for w in wins)
    assert unknown <= SPEC.nodes * SPEC.gpus_per_node
    got, want = totals(wins), totals(ref_w)
    assert got["samples"] == want["samples"]
    assert got["device_seconds"] == pytest.approx(want["device_seconds"] - 10.0 * unknown)
    assert got["flop"] <= want["flop"] * (1 + 1e-9) and want["flop"] <= got["flop_high"]  # widened, never invented
    if fmt == "columnar":
        assert got == pytest.approx(want, rel=1e-9)
    assert {w.account_id for w in wins} == {"acct-1"}
    util = defaultdict(float)
    for w in wins:
        util[w.window_start] += w.sums["gpu_util.sum"]
    for w in ref_w:
        if w.window_start > min(x.window_start for x in ref_w):  # the first window holds the first samples
            assert util[w.window_start] == pytest.approx(w.sums["gpu_util.sum"])


def test_late_data_becomes_corrections_that_sum_to_the_in_order_totals() -> None:
    rows = synth.samples([SPEC], T0, 600, 5.0)
    values = [v for _, v in synth.native(rows)]
    ordered = IngestCore()
    ref, _ = run(ordered, values)
    ref += ordered.drain()
    # Hold back every 7th message and deliver them 3 minutes late (after their windows closed).
    late = [v for i, v in enumerate(values) if i % 7 == 0 and i < len(values) // 2]
    on_time = [v for i, v in enumerate(values) if not (i % 7 == 0 and i < len(values) // 2)]
    cut = len(on_time) * 3 // 4
    shuffled = on_time[:cut] + late + on_time[cut:]
    core = IngestCore()
    wins, dead = run(core, shuffled)
    wins += core.drain()
    assert dead == []
    assert any(w.revision > 0 for w in wins)
    assert totals(wins) == pytest.approx(totals(ref), rel=1e-9)
    assert len({w.window_id for w in wins}) == len(wins)
    per_window = defaultdict(float)
    for w in wins:
        per_window[w.window_start] += w.flop
    for w in ref:
        assert per_window[w.window_start] == pytest.approx(w.flop, rel=1e-9)


def test_too_late_data_is_dead_lettered() -> None:
    rows = synth.samples([SPEC], T0, 400, 10.0)
    values = [v for _, v in synth.native(rows)]
    core = IngestCore(WindowConfig(allowed_lateness_s=60))
    _, dead = run(core, values[80:] + values[:8])  # first 10 s arrive after the watermark is far past them
    assert [d.reason for d in dead] == ["too_late"] * 8
    assert core.counters["dlq.too_late"] == 8
    assert dead[0].offset == len(values) - 80


def test_duplicates_count_once_within_and_across_batches() -> None:
    rows = synth.samples([SPEC], T0, 240, 5.0)
    values = [v for _, v in synth.native(rows)]
    ref = IngestCore()
    r, _ = run(ref, values)
    r += ref.drain()
    dup = values + values[:50] + values[100:130]  # a retried producer resends
    random.Random(1).shuffle(dup[len(values) - 40 :])
    core = IngestCore()
    wins, _ = run(core, dup, batch=64)
    wins += core.drain()
    assert core.counters["duplicates"] == 80
    assert totals(wins) == pytest.approx(totals(r), rel=1e-9)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_dedup_under_disorder_equals_a_set_of_device_timestamps(seed: int) -> None:
    """Out-of-order rows that are new, repeats inside one batch and repeats batches later: the fast path (a row
    above its device's largest key is new) and the exact check together must count each (device, ts) once."""
    rng = random.Random(seed)
    rows = synth.samples([SPEC, synth.WorkloadSpec("wl-b", nodes=1, gpus_per_node=8)], T0, 300, 5.0)
    stream = list(rows)
    for i in range(0, len(stream) - 40, 40):  # local disorder: shuffle blocks of 40 (late but not too late)
        block = stream[i : i + 40]
        rng.shuffle(block)
        stream[i : i + 40] = block
    repeats = rng.sample(range(len(rows)), 120)
    for k in repeats:  # resend a row somewhere after its first copy: same batch or much later
        pos = stream.index(rows[k])
        stream.insert(min(len(stream), pos + rng.choice([1, 5, 300, 2000])), rows[k])
    core = IngestCore()
    wins, dead = run(core, [orjson.dumps(r) for r in stream], batch=rng.choice([50, 97, 256]))
    wins += core.drain()
    assert dead == []
    assert core.counters["duplicates"] == len(stream) - len(rows)
    t = totals(wins)
    assert t["samples"] == len(rows)
    assert t["flop"] == pytest.approx(sum(expected_flop([r]) for r in rows), rel=1e-9)


def test_partitions_interleaved_in_one_core_give_each_partitions_own_totals() -> None:
    """Device ids, dedup keys and intervals are per partition: two partitions fed alternately to one core give the
    windows each gives alone, even when they hold devices of the same name."""
    a = synth.samples([SPEC], T0, 300, 5.0)
    b = synth.samples([synth.WorkloadSpec("wl-b", nodes=1, gpus_per_node=8)], T0, 300, 5.0)
    for r in b:  # the same device names and timestamps as partition 0: not duplicates of each other
        r["device"] = r["device"].replace("GPU-wl-b-0", "GPU-wl-a-0")
    va, vb = [orjson.dumps(r) for r in a], [orjson.dumps(r) for r in b]

    def alone(values: list[bytes], partition: int) -> list[tuple]:
        core = IngestCore()
        wins, _ = run(core, values, batch=64, partition=partition)
        return sorted((w.window_id, w.sample_count, round(w.flop), round(w.device_seconds, 6)) for w in
                      wins + core.drain())

    core = IngestCore()
    wins = []
    for i in range(0, max(len(va), len(vb)), 64):
        for part, values in ((0, va), (1, vb)):
            msgs = [SourceMessage(i + j, v) for j, v in enumerate(values[i : i + 64])]
            if msgs:
                assert core.process("telemetry", part, msgs, NOW) == []
            wins += core.ready()
    wins += core.drain()
    both = sorted((w.window_id, w.sample_count, round(w.flop), round(w.device_seconds, 6)) for w in wins)
    assert both == sorted(alone(va, 0) + alone(vb, 1))
    assert core.counters["duplicates"] == 0


def test_bad_rows_are_dead_lettered_alone_and_the_stream_goes_on() -> None:
    rows = synth.samples([SPEC], T0, 30, 10.0)
    cols = [orjson.loads(v) for _, v in synth.columnar(rows)]
    cols[0]["metrics"]["tensor_active"][1] = 1.7  # out of range: only this row goes
    cols[0]["metrics"]["power_w"][2] = 9223372036854775794  # sentinel: missing, not an error
    sample = dict(rows[0], ts=NOW + 2 * 86_400, device="GPU-future")
    values = [b"{not json", orjson.dumps(cols[0]), orjson.dumps({"ts": "x", "node": "n", "device": "d"}),
              orjson.dumps(sample), orjson.dumps(dict(rows[0], tensor_active=-0.1, device="GPU-neg")),
              orjson.dumps({k: v for k, v in rows[0].items() if k != "workload_id"} | {"device": "GPU-anon"})]
    core = IngestCore()
    dead = core.process("telemetry", 3, [SourceMessage(100 + i, v) for i, v in enumerate(values)], NOW)
    reasons = sorted((d.offset, d.reason, d.row) for d in dead)
    assert reasons == [(100, "malformed_json", None), (101, "out_of_range", 1), (102, "wrong_type", None),
                       (103, "future_timestamp", None), (104, "out_of_range", None), (105, "missing_id", None)]
    assert dead[0].raw == b"{not json"  # whole bad messages keep their bytes
    row_letter = next(d for d in dead if d.row == 1)
    assert orjson.loads(row_letter.raw)["tensor_active"] == 1.7
    assert dict(row_letter.headers())["dlq.partition"] == b"3"
    wins = core.drain()
    kept = len(cols[0]["ts"]) - 1
    assert sum(w.sample_count for w in wins) == kept
    assert sum(w.sums.get("power_w.count", 0) for w in wins) == kept - 1


@pytest.mark.parametrize("fmt", ["native", "columnar"])
def test_clean_batches_take_the_fast_path_and_still_dead_letter_single_rows(fmt: str) -> None:
    rows = synth.samples([SPEC], T0, 60, 10.0)
    rows[9]["gpu_util"] = 101.0
    rows[11]["power_w"] = 9223372036854775794  # sentinel: missing, kept
    values = [v for _, v in getattr(synth, fmt)(rows)]
    core = IngestCore()
    dead = core.process("telemetry", 0, [SourceMessage(i, v) for i, v in enumerate(values)], NOW)
    assert [d.reason for d in dead] == ["out_of_range"]
    if fmt == "native":
        assert dead[0].offset == 9 and dead[0].row is None and dead[0].raw == values[9]
    else:
        assert dead[0].offset == 9 // 4 and dead[0].row == 9 % 4 and orjson.loads(dead[0].raw)["gpu_util"] == 101.0
    wins = core.drain()
    assert sum(w.sample_count for w in wins) == len(rows) - 1
    assert sum(w.sums["power_w.count"] for w in wins) == len(rows) - 2


def test_ingest_letters_are_the_stores_letters(store) -> None:
    """One DeadLetter from the stage to the store: a columnar row letter keeps its row and bytes when stored (the
    replay once passed letters through a tuple that dropped the row, so two bad rows of one message shared an id)."""
    from pipeline.store import DeadLetter as StoredLetter

    rows = synth.samples([SPEC], T0, 60, 10.0)
    rows[1]["gpu_util"] = rows[2]["gpu_util"] = 101.0  # two bad rows of the first columnar message
    values = [v for _, v in synth.columnar(rows)]
    dead = IngestCore().process("telemetry-dl", 0, [SourceMessage(i, v) for i, v in enumerate(values)], NOW)
    assert [(d.offset, d.row) for d in dead] == [(0, 1), (0, 2)] and all(type(d) is StoredLetter for d in dead)
    assert store.insert_dead_letters(dead) == 2
    got = store.dead_letters("telemetry-dl")
    assert len(got) == 2 and sorted(orjson.loads(d.raw)["gpu_util"] for d in got) == [101.0, 101.0]
    assert sorted(d.detail.split(":")[0] for d in got) == ["row 1", "row 2"] and all(d.at for d in got)


def test_window_config_from_settings_takes_every_windowing_setting(monkeypatch) -> None:
    """The Kafka stage and the replay build their windowing from one function (the replay once ignored
    ingest.max_clock_skew_s)."""
    from pipeline.settings import load_settings

    monkeypatch.setenv("TRAINWATCH_WINDOW_S", "30")
    monkeypatch.setenv("TRAINWATCH_INGEST__WATERMARK_LAG_S", "7")
    monkeypatch.setenv("TRAINWATCH_INGEST__ALLOWED_LATENESS_S", "600")
    monkeypatch.setenv("TRAINWATCH_INGEST__MAX_CLOCK_SKEW_S", "45")
    cfg = WindowConfig.from_settings(load_settings())
    assert (cfg.window_s, cfg.watermark_lag_s, cfg.allowed_lateness_s, cfg.max_clock_skew_s) == (30, 7, 600, 45)


def test_rows_added_without_a_wire_format_window_as_decoded_messages_do() -> None:
    """`add_rows` (the simulator's blocks for training) gives the windows `process` gives for the same samples, and
    `states()` counts the samples still open (what a restart re-reads)."""
    from pipeline.ingest.aggregate import Batch
    from schemas.telemetry import METRIC_FIELDS

    rows = synth.samples([SPEC], T0, 150, 10.0)
    core_a, core_b = IngestCore(), IngestCore()
    wins_a, _ = run(core_a, [v for _, v in synth.native(rows)], batch=len(rows))
    batch = Batch(ts=np.array([r["ts"] for r in rows]), interval=np.array([r["interval_s"] for r in rows]),
                  metrics=np.array([[r.get(m, math.nan) for m in METRIC_FIELDS] for r in rows], dtype=float),
                  offset=np.arange(len(rows)), device=[r["device"] for r in rows], node=[r["node"] for r in rows],
                  accelerator=[r.get("accelerator") for r in rows], workload=[r["workload_id"] for r in rows],
                  account=[r.get("account_id") for r in rows], job=[r.get("job_id") for r in rows],
                  run_label=[r.get("run_label") for r in rows], precision=[r.get("precision") for r in rows])
    assert core_b.add_rows("telemetry", 0, batch) == []
    wins_b = core_b.ready()
    assert wins_b and [w.model_dump() for w in wins_b] == [w.model_dump() for w in wins_a]
    open_b = sum(st.open_samples for st in core_b.states())
    assert open_b == len(rows) - sum(w.sample_count for w in wins_b) > 0
    assert sum(w.sample_count for w in core_b.drain()) == open_b
    assert sum(st.open_samples for st in core_b.states()) == 0


def test_unknown_accelerator_is_kept_and_flagged_and_smi_only_uses_the_weaker_basis() -> None:
    specs = [synth.WorkloadSpec("wl-x", accelerator="Mystery X9"), synth.WorkloadSpec("wl-smi", smi_only=True)]
    rows = synth.samples(specs, T0, 60, 10.0)
    core = IngestCore()
    run(core, [v for _, v in synth.native(rows)])
    wins = {w.workload_id: w for w in core.drain()}
    x, smi = wins["wl-x"], wins["wl-smi"]
    assert x.unknown_accelerators == ["Mystery X9"] and x.basis == "unknown_accelerator" and x.device_count == 8
    assert smi.basis == "utilisation_power" and smi.flop > 0 and smi.flop_low < smi.flop < smi.flop_high
    assert "tensor_active" in smi.missing_fields



def test_each_part_in_one_batch_gets_its_own_achievable_share() -> None:
    """(issue 14) The tensor basis's low end is the part's share of peak (catalog column), per row of a mixed batch:
    MI300X 0.511, A100 0.869, T4 the default 0.8 (no figure of its own)."""
    parts = {"wl-mi": "AMD Instinct MI300X", "wl-a100": "NVIDIA A100-SXM4-80GB", "wl-t4": "Tesla T4"}
    specs = [synth.WorkloadSpec(w, nodes=1, gpus_per_node=2, accelerator=a) for w, a in parts.items()]
    core = IngestCore()
    run(core, [v for _, v in synth.native(synth.samples(specs, T0, 60, 10.0))])
    wins = {w.workload_id: w for w in core.drain()}
    for wid, part in parts.items():
        w = wins[wid]
        assert w.basis == "tensor_active"
        assert w.flop_low == pytest.approx(resolve(part).achievable_share * w.flop), wid
    assert wins["wl-mi"].flop_low / wins["wl-mi"].flop == pytest.approx(0.511, abs=1e-3)
    assert wins["wl-t4"].flop_low / wins["wl-t4"].flop == pytest.approx(ACHIEVABLE_SHARE)

def test_interval_defaults_to_the_gap_capped() -> None:
    rows = synth.samples([synth.WorkloadSpec("wl-g", nodes=1, gpus_per_node=1)], T0, 60, 10.0, with_interval=False)
    del rows[3]  # a 20 s gap
    core = IngestCore(WindowConfig(max_interval_s=15.0))
    run(core, [v for _, v in synth.native(rows)])
    (w,) = core.drain()
    # the first sample has no previous one: it takes the gap to its next (10 s), not an invented default
    assert w.device_seconds == pytest.approx(10.0 + 10 + 10 + 15 + 10)
    assert "samples.interval_unknown" not in w.sums


def test_an_interval_that_cannot_be_known_widens_the_band_and_is_counted() -> None:
    """A device's first sample without interval_s, alone in its batch: no gap either way. It counts 0 s in the point
    and low (never an invented 30 s), max_interval_s in the high, and the window says how many such samples it has;
    the device's later samples take their gaps as before. (issue 14: a missing interval_s once counted 30 s.)"""
    rows = synth.samples([synth.WorkloadSpec("wl-i", nodes=1, gpus_per_node=1)], T0, 60, 10.0, with_interval=False)
    core = IngestCore(WindowConfig(max_interval_s=20.0))
    run(core, [v for _, v in synth.native(rows)], batch=1)
    (w,) = core.drain()
    assert w.sums["samples.interval_unknown"] == 1.0 and w.sample_count == 6
    assert w.device_seconds == pytest.approx(5 * 10.0) and w.sums["tensor_active.n"] == pytest.approx(50.0)
    peak = resolve(rows[0]["accelerator"]).peak(None)
    band_hi = resolve(rows[0]["accelerator"]).low_precision_band[1]
    assert w.flop == pytest.approx(sum(10.0 * peak * r["tensor_active"] for r in rows[1:]))
    assert w.flop_high == pytest.approx(band_hi * (20.0 * rows[0]["tensor_active"]
                                                   + sum(10.0 * r["tensor_active"] for r in rows[1:])))


@pytest.mark.parametrize("accelerator", ["Mystery X9", None])
def test_an_unknown_or_absent_accelerator_gets_a_catalog_wide_band_not_a_zero(accelerator: str | None) -> None:
    """(issue 14) The part is not in the catalog, or not reported: basis unknown_accelerator, the FLOP band from the
    catalog's smallest to its largest peak (point at the median), and the same features as before for the
    classifier (the rate feature stays missing: no evidence of the part's speed)."""
    from detectors.compute import unknown_accelerator_peaks
    from detectors.windows import merge_partials

    rows = synth.samples([synth.WorkloadSpec("wl-u", nodes=1, gpus_per_node=2)], T0, 60, 10.0)
    for r in rows:
        r.pop("accelerator", None)
        if accelerator is not None:
            r["accelerator"] = accelerator
    core = IngestCore()
    run(core, [v for _, v in synth.native(rows)])
    (w,) = core.drain()
    point, low, high = unknown_accelerator_peaks(None)
    busy = sum(r["interval_s"] * r["tensor_active"] for r in rows)
    assert w.basis == "unknown_accelerator" and w.unknown_accelerators == [accelerator or "unknown"]
    assert w.accelerators == {accelerator or "unknown": 2}
    assert 0 < w.flop_low < w.flop < w.flop_high
    expected = (ACHIEVABLE_SHARE * low * busy, point * busy, high * busy)
    assert (w.flop_low, w.flop, w.flop_high) == pytest.approx(expected)
    assert high / low > 10  # wide: any part the catalog knows
    f = merge_partials([w]).features
    assert f["log10_flop_rate"] is None and f["tensor_basis_share"] == 0.0 and f["mean_power"] is None


@pytest.mark.parametrize("crash_after", [7, 13, 21])
def test_replay_from_the_commit_point_loses_nothing_and_counts_nothing_twice(crash_after: int) -> None:
    specs = [SPEC, synth.WorkloadSpec("wl-b", nodes=1, gpus_per_node=2)]
    rows = synth.samples(specs, T0, 600, 5.0)
    values = [v for _, v in synth.native(rows)]
    late = values[40:60]
    values = values[:40] + values[60:300] + late + values[300:]  # some late data too
    ref = IngestCore()
    ref_w, _ = run(ref, values, batch=50)
    ref_w += ref.drain()

    first = IngestCore()
    written: list[WindowAggregate] = []
    for i in range(0, crash_after * 50, 50):
        first.process("telemetry", 0, [SourceMessage(i + j, v) for j, v in enumerate(values[i : i + 50])], NOW)
        written += first.ready()
    (offset, max_ts), = first.commit_points().values()
    assert offset < crash_after * 50
    second = IngestCore()  # the restarted process: nothing but what the commit recorded
    second.assign("telemetry", 0, max_ts)
    more, _ = run(second, values[offset:], batch=37, start=offset)
    written += more + second.drain()
    assert totals(written) == pytest.approx(totals(ref_w), rel=1e-9)
    by_id: dict[str, WindowAggregate] = {}
    for w in written:  # a re-emitted window is identical to the first emission
        if w.window_id in by_id:
            assert w.flop == pytest.approx(by_id[w.window_id].flop) and w.sample_count == by_id[
                w.window_id].sample_count
        by_id[w.window_id] = w


def test_commit_point_never_passes_an_open_window() -> None:
    rows = synth.samples([SPEC], T0, 100, 5.0)
    values = [v for _, v in synth.native(rows)]
    core = IngestCore(WindowConfig(dedup_replay_s=0.0))  # no hold for re-deliveries of emitted windows
    run(core, values)
    (offset, _), = core.commit_points().values()
    (state,) = core.states()
    assert state.open_units > 0 and offset == state.oldest_open_offset
    held = IngestCore()  # by default the windows emitted in the last dedup_replay_s are re-read too
    run(held, values)
    (held_offset, _), = held.commit_points().values()
    assert held_offset < offset
    assert math.isfinite(offset)
    assert np.all(np.array([w.offsets["telemetry:0"][1] for w in core.ready()]) >= 0)


def test_devices_gone_quiet_are_forgotten_without_changing_any_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device churn (a new set of devices every hour) must not grow the per-device state without end. Forgetting
    quiet devices renumbers the rest in the dedup keys and open units: every window, duplicate and dead letter must
    come out exactly as without it."""
    from pipeline.ingest import aggregate

    rng = random.Random(5)
    rows = []
    for h in range(6):  # 6 hours, 16 new devices each hour, the previous hour's fall silent
        rows += synth.samples([synth.WorkloadSpec(f"wl-h{h}", nodes=2, gpus_per_node=8)], T0 + 3600 * h, 3600, 60.0,
                              seed=h)
    values = [orjson.dumps(r) for r in rows]
    stream = []
    for i, v in enumerate(values):
        stream.append(v)
        if rng.random() < 0.05:
            stream.append(values[max(0, i - rng.randrange(200))])  # a repeat of a recent row
        if rng.random() < 0.02:
            stream.append(values[max(0, i - rng.randrange(1500))])  # late, up to ~1.5 h of rows back
    now = T0 + 8 * 3600

    def run_with(every: int) -> tuple[dict, list, int, int]:
        monkeypatch.setattr(aggregate, "COMPACT_EVERY", every)
        monkeypatch.setattr(aggregate, "COMPACT_MIN", 1)
        core = IngestCore()
        wins, dead = [], []
        for i in range(0, len(stream), 40):
            dead += core.process("telemetry", 0, [SourceMessage(i + j, v) for j, v in enumerate(stream[i:i + 40])],
                                 now)
            wins += core.ready()
        (state,) = core.states()
        devices = state.devices
        wins += core.drain()
        by_id = {w.window_id: (w.sample_count, w.flop, w.device_seconds, sorted(w.devices), w.sums) for w in wins}
        return by_id, sorted((d.offset, d.reason) for d in dead), core.counters["duplicates"], devices

    kept = run_with(10**9)  # never compacts
    compacted = run_with(1)  # checks after every batch
    assert compacted[:3] == kept[:3]
    assert kept[1] and kept[2]  # late rows were dead-lettered and repeats counted: both paths were exercised
    assert kept[3] == 6 * 16
    assert compacted[3] <= 3 * 16  # the current hour's devices, and those still within the dedup horizon


def test_dedup_keys_hold_event_times_past_2039() -> None:
    """Keys carry the event time in ms below the device id; 41 bits of ms end in September 2039."""
    t2045 = 2_366_841_600.0  # 2045-01-01
    rows = synth.samples([synth.WorkloadSpec("wl-f", nodes=1, gpus_per_node=3)], t2045, 120, 10.0)
    values = [orjson.dumps(r) for r in rows]
    core = IngestCore()
    dead = core.process("telemetry", 0, [SourceMessage(i, v) for i, v in enumerate(values + values[:4])],
                        t2045 + 3600)
    assert not dead
    assert core.counters["duplicates"] == 4
    wins = core.drain()
    assert sum(w.sample_count for w in wins) == len(rows) and all(w.device_count == 3 for w in wins)


@pytest.mark.parametrize("fmt,decoder", [("otlp", "otlp_json"), ("prometheus", "prometheus_json")])
def test_fragment_merging_forgets_quiet_devices_without_changing_any_window(
        monkeypatch: pytest.MonkeyPatch, fmt: str, decoder: str) -> None:
    """OTLP and prometheus rows arrive in fragments merged per (device, time); the merger's per-device newest time
    must not grow with device churn, and forgetting it must not change what is released."""
    from pipeline.ingest import stage as stage_mod

    rows = []
    for h in range(4):  # a new set of 8 devices every hour
        rows += synth.samples([synth.WorkloadSpec(f"wl-h{h}", nodes=1, gpus_per_node=8)], T0 + 3600 * h, 3600, 60.0,
                              seed=h)
    values = [v for _, v in getattr(synth, fmt)(rows)]

    def run_with(floor: int) -> tuple[dict, int]:
        monkeypatch.setattr(stage_mod, "PRUNE_FLOOR", floor)
        core = IngestCore(decoder=decoder)
        wins = []
        for i in range(0, len(values), 50):
            core.process("telemetry", 0, [SourceMessage(i + j, v) for j, v in enumerate(values[i:i + 50])],
                         T0 + 6 * 3600)
            wins += core.ready()
        (state,) = core.states()
        tracked = state.fragment_devices
        wins += core.drain()
        return {w.window_id: (w.sample_count, w.flop, sorted(w.devices), w.sums) for w in wins}, tracked

    kept, pruned = run_with(10**9), run_with(0)
    assert pruned[0] == kept[0]
    assert kept[1] == 4 * 8 and pruned[1] <= 2 * 8


def test_one_workload_on_two_topics_gives_partials_that_both_count() -> None:
    """Two exporters (or a topic migration) can carry one workload on two topics' partition 0: their partials must
    have different ids, or downstream would take the second for a replay of the first and drop it."""
    from pipeline.detect.merger import WindowMerger

    rows = synth.samples([synth.WorkloadSpec("wl-a", nodes=2, gpus_per_node=2)], T0, 60, 10.0)
    node0 = [r for r in rows if r["node"].endswith("node-0")]
    node1 = [r for r in rows if r["node"].endswith("node-1")]
    core = IngestCore()
    for topic, part in (("dcgm.native", node0), ("otel.metrics", node1)):
        core.process(topic, 0, [SourceMessage(i, v) for i, (_, v) in enumerate(synth.native(part))], NOW)
    wins = core.drain()
    assert len(wins) == 2 and len({w.window_id for w in wins}) == 2
    merger = WindowMerger()
    merged = [merger.add(w) for w in wins][-1]
    assert merged is not None and merged.sample_count == len(rows) and merged.device_count == 4


def _fragments(hours: int = 1) -> list[bytes]:
    rows = synth.samples([synth.WorkloadSpec("wl-f", nodes=1, gpus_per_node=4)], T0, 600 * hours, 10.0)
    return [v for _, v in synth.otlp(rows)]


def test_a_revoked_partition_leaves_no_held_fragment_behind() -> None:
    """On a rebalance the new owner replays from our commit; fragments we still held must go with the partition,
    or a later drain would emit them as windows of a partition we no longer own (and the owner emits them too)."""
    values = _fragments()
    core = IngestCore(decoder="otlp_json")
    core.process("telemetry", 0, [SourceMessage(i, v) for i, v in enumerate(values)], NOW)
    (state,) = core.states()
    assert state.held_fragments > 0 and state.fragment_devices == 4
    core.revoke("telemetry", 0)
    assert core.states() == [] and core.commit_points() == {}
    assert core.finish() == ([], [])  # nothing of the revoked partition comes out


def test_a_reassigned_partition_replays_to_the_same_windows() -> None:
    values = _fragments()
    ref = IngestCore(decoder="otlp_json")
    ref.process("telemetry", 0, [SourceMessage(i, v) for i, v in enumerate(values)], NOW)
    ref_wins = ref.ready() + ref.finish()[0]

    core = IngestCore(decoder="otlp_json")
    half = len(values) // 2
    core.process("telemetry", 0, [SourceMessage(i, v) for i, v in enumerate(values[:half])], NOW)
    written = core.ready()
    (offset, progress), = core.commit_points().values()
    core.revoke("telemetry", 0)
    core.assign("telemetry", 0, progress)  # ours again, from the commit
    core.process("telemetry", 0, [SourceMessage(offset + i, v) for i, v in enumerate(values[offset:])], NOW)
    written += core.ready() + core.finish()[0]
    assert {w.window_id: w.sample_count for w in written} == {w.window_id: w.sample_count for w in ref_wins}


def test_the_id_columns_are_declared_once() -> None:
    """Rows, RowBuilder and Batch carry the id columns of one declaration; a dataclass that drifts is refused."""
    from dataclasses import dataclass

    from pipeline.ingest.columns import ID_COLUMNS, follows

    @dataclass
    class Drifted:
        ts: float
        device: str
        node: str  # accelerator, workload, ... missing

    with pytest.raises(TypeError, match="id columns"):
        follows(Drifted, ID_COLUMNS)
    rows = synth.samples([synth.WorkloadSpec("wl-k", nodes=1, gpus_per_node=1)], T0, 10, 10.0)
    rows[0]["power_w"] = "high"  # a wrong type: this row comes back as a letter written from the columns
    core = IngestCore()
    (letter,) = core.process("telemetry", 0, [SourceMessage(0, orjson.dumps({"samples": rows, "node": "n"}))], NOW)
    assert orjson.loads(letter.raw)["workload_id"] == "wl-k"
