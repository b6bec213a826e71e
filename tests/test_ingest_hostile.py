"""Hostile input (issue 13): bad clocks cannot move the watermark, absurd values and wrong types are letters,
no message is a poison pill, and every message ends in a window, a letter or a counter."""

from __future__ import annotations

import hashlib
import random

import orjson
import pytest

from pipeline.ingest import synth
from pipeline.ingest.aggregate import Progress, WindowConfig
from pipeline.ingest.kafka_stage import commit_metadata, metadata_progress
from pipeline.ingest.stage import IngestCore, SourceMessage
from schemas.telemetry import FP64_BLANKS, INT32_BLANKS, TelemetrySample
from schemas.windows import WindowAggregate

T0 = 1_767_225_600.0  # a window boundary
NOW = T0 + 30_000
SPECS = [synth.WorkloadSpec("wl-a", nodes=3, gpus_per_node=4),
         synth.WorkloadSpec("wl-b", nodes=2, gpus_per_node=2, account_id="acct-2")]


def feed(core: IngestCore, values: list[bytes], batch: int = 200, first: tuple[int, ...] = ()
         ) -> tuple[list[list[WindowAggregate]], list]:
    """Batches like the Kafka adapter (`first`: sizes of the first ones); returns the windows each batch released
    (the emission timeline) and the letters."""
    timeline, dead = [], []
    i = 0
    sizes = list(first)
    while i < len(values):
        k = sizes.pop(0) if sizes else batch
        msgs = [SourceMessage(i + j, v) for j, v in enumerate(values[i : i + k])]
        dead += core.process("telemetry", 0, msgs, NOW)
        timeline.append(core.ready())
        i += k
    timeline.append(core.drain())
    return timeline, dead


def shape(timeline: list[list[WindowAggregate]], skip: int = 0) -> list[list[tuple]]:
    """What downstream sees, batch by batch: (workload, window, revision, samples, FLOP) of each window emitted."""
    return [sorted((w.workload_id, w.window_start, w.revision, w.sample_count, round(w.flop)) for w in ws)
            for ws in timeline[skip:]]


def stream(late_every: int = 11, late_by: int = 240) -> list[bytes]:
    """90 minutes of two workloads at 10 s; every `late_every`-th message of the first half arrives `late_by`
    messages (~20 event-minutes) late: legitimate corrections, which a jumped watermark would turn into too_late."""
    values = [v for _, v in synth.native(synth.samples(SPECS, T0, 5400, 10.0))]
    late = {i for i in range(0, len(values) // 2, late_every)}
    out = [v for i, v in enumerate(values) if i not in late]
    for j, i in enumerate(sorted(late)):
        out.insert(min(len(out), i + late_by + j), values[i])
    return out


def bad_copy(raw: bytes, shift: float, device: str) -> bytes:
    d = orjson.loads(raw)
    return orjson.dumps(dict(d, ts=d["ts"] + shift, device=device))


def test_one_sample_two_hours_ahead_loses_nothing_and_changes_no_emission() -> None:
    """The repro of issue 13: a copy of the first line, 2 h ahead, as a new device, at the top of the stream."""
    values = stream()
    clean_t, clean_dead = feed(IngestCore(), values)
    assert clean_dead == [] and any(w.revision > 0 for ws in clean_t for w in ws)  # late rows: corrections
    core = IngestCore()
    bad_t, dead = feed(core, [bad_copy(values[0], 7200, "GPU-bad-clock"), *values], first=(201,))
    assert [(d.reason, d.offset) for d in dead] == [("clock_ahead", 0)]
    assert core.counters["dlq.too_late"] == 0 and core.counters["dlq.clock_ahead"] == 1
    assert shape(bad_t) == shape(clean_t)  # the same windows, released after the same batches


def test_a_bad_first_message_alone_in_its_batch_cannot_move_the_watermark() -> None:
    """Nothing to hold it against yet (no arrival clock, no second source): it is kept, in its own window, but the
    watermark only follows what two sources confirm, so every good sample is on time as before."""
    values = stream()
    clean_t, _ = feed(IngestCore(), values, first=(1,))
    core = IngestCore()
    bad_t, dead = feed(core, [bad_copy(values[0], 7200, "GPU-bad-clock"), *values], first=(1, 1))
    assert dead == [] and core.counters["dlq.too_late"] == 0
    lone = [w for w in bad_t[-1] if w.devices == ["GPU-bad-clock"]]
    assert len(lone) == 1 and lone[0].sample_count == 1
    bad_t[-1] = [w for w in bad_t[-1] if w is not lone[0]]
    assert shape(bad_t, skip=1) == shape(clean_t)


def test_a_node_whose_clock_jumps_ahead_is_dead_lettered_and_moves_nothing() -> None:
    values = stream()
    node = b'"node":"wl-a-node-1"'
    # every message of one node (4 devices) between minutes 30 and 40 runs 3 h ahead
    skewed = [bad_copy(v, 3 * 3600, orjson.loads(v)["device"])
              if node in v and T0 + 1800 <= orjson.loads(v)["ts"] < T0 + 2400 else v for v in values]
    n_skewed = sum(a != b for a, b in zip(values, skewed, strict=True))
    core = IngestCore()
    t, dead = feed(core, skewed)
    assert n_skewed > 0 and len(dead) == n_skewed and {d.reason for d in dead} == {"clock_ahead"}
    assert core.counters["dlq.too_late"] == 0
    kept = [v for a, v in zip(values, skewed, strict=True) if a == v]
    ref_t, _ = feed(IngestCore(), kept)
    assert sum(w.sample_count for ws in t for w in ws) == sum(w.sample_count for ws in ref_t for w in ws)


def test_late_samples_beside_bad_clocks_are_never_too_late() -> None:
    """Issue 13 saw 48 good samples dead-lettered too_late beside bad ones: bad clocks had moved the watermark."""
    values = stream()
    rng = random.Random(7)
    mixed = list(values)
    for k in range(40):  # scattered samples from devices whose clocks run 1-20 h ahead (below the 1-day bound)
        i = rng.randrange(len(mixed))
        mixed.insert(i, bad_copy(values[rng.randrange(len(values))], rng.uniform(3600, 20 * 3600), f"GPU-skew-{k}"))
    core = IngestCore()
    t, dead = feed(core, mixed)
    assert len(dead) == 40 and {d.reason for d in dead} == {"clock_ahead"}
    assert core.counters["dlq.too_late"] == 0
    clean_t, _ = feed(IngestCore(), values)
    assert (sum(w.sample_count for ws in t for w in ws) == sum(w.sample_count for ws in clean_t for w in ws)
            == len(values))


def test_a_jump_that_every_node_makes_is_not_a_bad_clock() -> None:
    """A gap (all nodes silent for an hour) is not a skewed clock: two sources confirm the new time."""
    before = [v for _, v in synth.native(synth.samples(SPECS, T0, 600, 10.0))]
    after = [v for _, v in synth.native(synth.samples(SPECS, T0 + 4200, 600, 10.0))]
    core = IngestCore()
    t, dead = feed(core, before + after)
    assert dead == []
    assert sum(w.sample_count for ws in t for w in ws) == len(before) + len(after)


def test_arrival_clock_letters_samples_ahead_of_their_kafka_timestamp() -> None:
    rows = synth.samples([synth.WorkloadSpec("solo", nodes=1, gpus_per_node=1)], T0, 600, 10.0)
    values = [v for _, v in synth.native(rows)]
    arrival = [r["ts"] + 2.0 for r in rows]  # produced 2 s after collection
    arrival[30] = rows[30]["ts"] - 900.0  # this one claims to be 15 min ahead of when it reached Kafka
    core = IngestCore()
    dead = core.process("telemetry", 0, [SourceMessage(i, v) for i, v in enumerate(values)], NOW, arrival=arrival)
    assert [(d.reason, d.offset) for d in dead] == [("clock_ahead", 30)]
    # One device alone on its partition: with every row checked against its arrival, it may move the watermark.
    assert sum(w.sample_count for w in core.ready()) > 0
    # Without an arrival clock nothing vouches for a lone source: its windows wait for the end of the input.
    alone = IngestCore()
    alone.process("telemetry", 0, [SourceMessage(i, v) for i, v in enumerate(values)], NOW)
    assert alone.ready() == [] and sum(w.sample_count for w in alone.drain()) == len(values)


def test_progress_survives_the_commit_metadata_round_trip() -> None:
    values = stream()[:700]
    core = IngestCore()
    feed(core, values)
    core2 = IngestCore()
    for i in range(0, len(values), 150):
        core2.process("telemetry", 0, [SourceMessage(i + j, v) for j, v in enumerate(values[i : i + 150])], NOW)
        core2.ready()
    (_, pr), = core2.commit_points().values()
    assert isinstance(pr, Progress) and pr.multi_node and pr.node[1] is not None
    assert metadata_progress(commit_metadata(pr)) == pr
    assert metadata_progress('{"max_ts": 12.5}').max_ts == 12.5  # older commits: the basis alone
    with pytest.raises(ValueError):
        metadata_progress('{"max_ts": "soon"}')


SAMPLE = {"ts": T0 + 5, "node": "n1", "device": "GPU-x", "workload_id": "wl", "accelerator": "NVIDIA H100 80GB HBM3",
          "interval_s": 10.0, "gpu_util": 50.0}


@pytest.mark.parametrize("batched", [False, True])
def test_absurd_magnitudes_and_wrong_types_are_letters_and_blanks_are_exact(batched: bool) -> None:
    cases = [  # (changes to a clean sample, expected reason or None = kept)
        ({"gpu_util": 1e308}, "out_of_range"), ({"power_w": 1e300}, "out_of_range"),
        ({"fb_used_mib": 1e300}, "out_of_range"), ({"sm_clock_mhz": 1e300}, "out_of_range"),
        ({"nvlink_tx_bytes": 1e300}, "out_of_range"), ({"energy_mj": 1e300}, "out_of_range"),
        ({"gpu_index": 2**62}, "out_of_range"), ({"gpu_index": -1}, "out_of_range"),
        ({"gpu_util": 1.5e14}, "out_of_range"),  # above the FP64 blank, not one of the markers
        ({"gpu_util": "Infinity"}, "wrong_type"), ({"gpu_util": "0.5"}, "wrong_type"),
        ({"power_w": [1.0]}, "wrong_type"), ({"power_w": {"v": 1}}, "wrong_type"), ({"gpu_index": 1.5}, "wrong_type"),
        ({"device": "d" * 1100}, "out_of_range"),
        ({"gpu_util": INT32_BLANKS[2]}, None), ({"power_w": FP64_BLANKS[0]}, None),
        ({"power_w": 9223372036854775794}, None), ({"gpu_util": 0.0, "power_w": 0.0}, None),
    ]
    clean = [orjson.dumps(dict(SAMPLE, ts=T0 + 10 * i, device=f"GPU-{i % 3}")) for i in range(20)]
    values = [orjson.dumps({**SAMPLE, "ts": T0 + 200 + i, "device": f"GPU-c{i}", **chg}) for i, (chg, _) in
              enumerate(cases)]
    if batched:  # one batch of otherwise clean per-sample messages: the column-wise fast path must catch them
        msgs = [SourceMessage(i, v) for i, v in enumerate(clean + values)]
        first = len(clean)
    else:
        msgs = [SourceMessage(i, v) for i, v in enumerate(values)]
        first = 0
    core = IngestCore()
    dead = core.process("telemetry", 0, msgs, NOW) if batched else [
        d for m in msgs for d in core.process("telemetry", 0, [m], NOW)]
    got = {d.offset - first: d.reason for d in dead}
    assert got == {i: reason for i, (_, reason) in enumerate(cases) if reason is not None}
    kept = sum(w.sample_count for w in core.drain())
    assert kept == len(msgs) - len(dead)
    # the schema agrees with the stage on bounds and blanks
    assert TelemetrySample.model_validate({**SAMPLE, "gpu_util": INT32_BLANKS[2]}).gpu_util is None
    with pytest.raises(ValueError):
        TelemetrySample.model_validate({**SAMPLE, "fb_used_mib": 1e300})
    with pytest.raises(ValueError):
        TelemetrySample.model_validate({**SAMPLE, "gpu_util": 1.5e14})


def test_every_message_ends_in_a_window_a_letter_or_a_counter() -> None:
    big = b'{"ts": 1, "pad": "' + b"x" * 2_000_000 + b'"}'
    odd = [None, b"", big, b"[]", b'{"samples": []}', orjson.dumps({"node": "n", "ts": [], "device": []}),
           b"[" * 5000 + b"]" * 5000, "\u00e9\u4e2d".encode(), b'{"ts": 1e400}']
    good = [orjson.dumps(dict(SAMPLE, ts=T0 + 10 * i)) for i in range(10)]
    values = good[:5] + odd + good[5:] + good[:2]  # the last two: repeats
    core = IngestCore(dlq_max_value_bytes=1000)
    dead = core.process_raw("telemetry", 0, values, list(range(len(values))), NOW,
                            key_of=lambda i: b"k", headers_of=lambda i: [("h", b"v")])
    wins = core.drain()
    assert sorted(d.offset for d in dead) == list(range(5, 5 + len(odd)))  # each odd message: one letter
    big_letter = next(d for d in dead if d.reason == "oversized")
    assert len(big_letter.raw) == 1000 and big_letter.size == len(big)
    assert big_letter.sha256 == hashlib.sha256(big).hexdigest()
    h = dict(big_letter.headers())
    assert h["dlq.size"] == str(len(big)).encode() and h["src.h"] == b"v" and h["dlq.key"] == b"k"
    assert big_letter.letter_key() == b"telemetry:0:7:oversized"
    assert len({d.letter_key() for d in dead}) == len(dead)
    assert sum(w.sample_count for w in wins) + core.counters["duplicates"] == len(good) + 2
    assert core.counters["messages"] == len(values)


def test_letters_of_merged_rows_have_distinct_keys() -> None:
    cfg = WindowConfig(allowed_lateness_s=60)
    rows = synth.samples(SPECS, T0, 600, 10.0)
    values = [v for _, v in synth.otlp(rows)]
    core = IngestCore(cfg, decoder="otlp_json")
    late = values[:3]
    dead = []
    for i, v in enumerate(values[10:] + late):
        dead += core.process("telemetry", 0, [SourceMessage(i, v)], NOW)
    _, more = core.finish()  # held fragments released at the end can be letters too
    assert core.finish() == ([], [])  # taken once
    dead += more
    assert dead and {d.reason for d in dead} == {"too_late"}
    assert len({d.letter_key() for d in dead}) == len(dead)


def test_a_device_id_too_long_in_a_columnar_message_is_a_row_letter() -> None:
    rows = synth.samples([synth.WorkloadSpec("wl-c", nodes=2, gpus_per_node=4)], T0, 60, 10.0)
    cols = [orjson.loads(v) for _, v in synth.columnar(rows)]
    cols[0]["device"][1] = "G" * 1100
    core = IngestCore()
    dead = core.process("telemetry", 0, [SourceMessage(i, orjson.dumps(c)) for i, c in enumerate(cols)], NOW)
    assert [(d.reason, d.offset) for d in dead] == [("out_of_range", 0)]
    assert sum(w.sample_count for w in core.drain()) == len(rows) - 1


@pytest.mark.parametrize("field,value,reason", [
    ("precision", ["bf16"], "schema_violation"),  # unhashable: crashed both paths before the rule table
    ("precision", "fp4", "schema_violation"),
    ("workload_id", 7, "wrong_type"),
    ("gpu_index", "0", "wrong_type"),
    ("interval_s", True, "wrong_type"),
    ("device", None, "schema_violation"),
    ("node", 3, "wrong_type"),
])
def test_the_fast_and_slow_paths_apply_one_rule_table(field: str, value: object, reason: str) -> None:
    """A batch first tries the column-wise fast path; a message alone takes the message-by-message path. Both read
    the same rules, so a bad field gives the same letter either way and the good messages beside it are kept."""
    good = [orjson.dumps({"ts": T0 + i, "device": "g0", "node": "n0", "workload_id": "w"}) for i in range(3)]
    bad = orjson.dumps({"ts": T0 + 9, "device": "g1", "node": "n1", "workload_id": "w", field: value})
    alone = IngestCore().process("telemetry", 0, [SourceMessage(0, bad)], NOW)
    core = IngestCore()
    batch = core.process("telemetry", 0, [SourceMessage(i, v) for i, v in enumerate([*good, bad])], NOW)
    assert [(d.reason, d.detail) for d in alone] == [(d.reason, d.detail) for d in batch]
    assert [(d.reason, d.offset) for d in batch] == [(reason, 3)]
    assert sum(w.sample_count for w in core.drain()) == 3


def test_a_source_that_goes_quiet_does_not_turn_the_others_rows_into_letters() -> None:
    """Two nodes on a partition, one's job ends after 10 minutes: the other's next 50 minutes are good data, not
    clock_ahead letters held against the quiet node's last time (the Kafka demo lost thousands of samples so)."""
    a = synth.samples([synth.WorkloadSpec("wl-a", nodes=1, gpus_per_node=2)], T0, 3600, 10.0)
    b = synth.samples([synth.WorkloadSpec("wl-b", nodes=1, gpus_per_node=2, account_id="acct-2")], T0, 600, 10.0)
    for r in b:
        r["node"] = "node-b"
    values = [v for _, v in synth.native(sorted(a + b, key=lambda r: r["ts"]))]
    timeline, dead = feed(IngestCore(WindowConfig()), values)
    assert [d.reason for d in dead] == []
    emitted = [w for ws in timeline for w in ws]
    assert sum(w.sample_count for w in emitted) == len(values)
    # and the watermark still moves with the busy node: its windows close before the end of the input
    assert sum(w.sample_count for ws in timeline[:-1] for w in ws if w.workload_id == "wl-a") > len(a) // 2
