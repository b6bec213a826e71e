"""Bad input never stops the ingest core and never loses other data: every message is accounted for.

Seeded random corruption of clean native samples (bytes cut or flipped, fields dropped, given the wrong type or an
extreme value, unknown fields, exact repeats), fed in random batch sizes. Each message must end in exactly one
place: a window's sample count, a dead letter (with a reason), or the duplicate counter.
"""

from __future__ import annotations

import json
import random

import orjson
import pytest

from pipeline.ingest import synth
from pipeline.ingest.dlq import REASONS as DLQ_REASONS
from pipeline.ingest.stage import IngestCore, SourceMessage
from schemas.telemetry import METRIC_FIELDS

T0 = 1_767_225_600.0
NOW = T0 + 10_000
ODD_VALUES = [None, "x", "", -1, -1e-9, 0, 2**70, 1e308, -1e308, True, False, [], {}, [1.0], {"v": 1}, 1e-320,
              "NaN", "0.5", 9223372036854775794, 4294967295]
FIELDS = ["ts", "node", "device", "accelerator", "workload_id", "account_id", "interval_s", "precision",
          *METRIC_FIELDS]
REASONS = set(DLQ_REASONS)


def _corrupt(rng: random.Random, sample: dict) -> bytes:
    kind = rng.randrange(6)
    raw = orjson.dumps(sample)
    if kind == 0:  # cut short
        return raw[: rng.randrange(len(raw))]
    if kind == 1:  # one byte flipped
        i = rng.randrange(len(raw))
        return raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1 :]
    d = dict(sample)
    if kind == 2:
        d.pop(rng.choice(list(d)))
    elif kind == 3:
        d[rng.choice(FIELDS)] = rng.choice(ODD_VALUES)
    elif kind == 4:
        d["unexpected_" + str(rng.randrange(3))] = rng.choice(ODD_VALUES)
    else:  # timestamps far off in either direction
        d["ts"] = rng.choice([T0 - 40 * 365 * 86_400, NOW + 7 * 86_400, -5.0, 0.0, T0 - 2 * 3600])
    return json.dumps(d).encode()  # stdlib: writes what orjson refuses (2**70 as a literal)


@pytest.mark.parametrize("seed", range(6))
def test_every_message_ends_in_a_window_a_dead_letter_or_the_duplicate_count(seed: int) -> None:
    rng = random.Random(seed)
    specs = [synth.WorkloadSpec("wl-a", nodes=2, gpus_per_node=4), synth.WorkloadSpec("wl-b", smi_only=True)]
    rows = synth.samples(specs, T0, 600, 10.0, seed=seed)
    values: list[bytes] = []
    for r in rows:
        u = rng.random()
        if u < 0.15:
            values.append(_corrupt(rng, r))
        elif u < 0.2 and values:
            values.append(rng.choice(values))  # an exact repeat of an earlier message, good or bad
        else:
            values.append(orjson.dumps(r))
    core = IngestCore()
    dead, windows, i = [], {}, 0
    while i < len(values):
        k = rng.choice([1, 3, 50, 400])
        msgs = [SourceMessage(i + j, v) for j, v in enumerate(values[i : i + k])]
        dead += core.process("telemetry", 0, msgs, NOW)
        windows.update((w.window_id, w) for w in core.ready())
        i += k
    windows.update((w.window_id, w) for w in core.drain())

    counted = sum(w.sample_count for w in windows.values())
    assert counted + len(dead) + core.counters["duplicates"] == len(values)
    assert {d.reason for d in dead} <= REASONS
    assert all(d.detail for d in dead)  # every letter says why
    per_offset = [d.offset for d in dead if d.row is None]
    assert len(per_offset) == len(set(per_offset))  # one letter per bad message
    assert all(d.raw == values[d.offset] for d in dead if d.row is None)  # its original bytes
    assert counted > 0.7 * len(values)  # the clean majority is kept


def _corrupt_columns(rng: random.Random, msg: dict) -> bytes:
    d = orjson.loads(orjson.dumps(msg))
    k = len(d["ts"])
    kind = rng.randrange(5)
    if kind == 0:  # one value of one row out of range or of the wrong type: only that row is bad
        d["metrics"][rng.choice(list(d["metrics"]))][rng.randrange(k)] = rng.choice([-3.0, 1e9, "x", [], True])
    elif kind == 1:  # a column of the wrong length, or a field of the wrong type: the whole message is bad
        d[rng.choice(["ts", "device"])] = d["ts"][:-1]
    elif kind == 2:
        d[rng.choice(["node", "workload_id", "account_id", "interval_s", "precision", "metrics"])] = rng.choice(
            ODD_VALUES)
    elif kind == 3:  # one row far in the past or the future
        d["ts"][rng.randrange(k)] = rng.choice([T0 - 2 * 3600, NOW + 7 * 86_400, -1.0])
    else:
        raw = orjson.dumps(d)
        return raw[: rng.randrange(len(raw))]
    return json.dumps(d).encode()


@pytest.mark.parametrize("seed", range(4))
def test_columnar_rows_end_in_a_window_a_row_letter_or_the_duplicate_count(seed: int) -> None:
    rng = random.Random(seed)
    rows = synth.samples([synth.WorkloadSpec("wl-a", nodes=3, gpus_per_node=4)], T0, 900, 10.0, seed=seed)
    values = [v if rng.random() > 0.2 else _corrupt_columns(rng, orjson.loads(v))
              for _, v in synth.columnar(rows, span_s=30.0)]
    values += [rng.choice(values) for _ in range(len(values) // 10)]  # repeats of earlier messages
    core = IngestCore()
    dead, windows = [], {}
    for i in range(0, len(values), 7):
        dead += core.process("telemetry", 0, [SourceMessage(i + j, v) for j, v in enumerate(values[i : i + 7])], NOW)
        windows.update((w.window_id, w) for w in core.ready())
    windows.update((w.window_id, w) for w in core.drain())

    whole = {d.offset for d in dead if d.row is None and d.reason != "too_late"}
    rows_in = sum(len(orjson.loads(v)["ts"]) for i, v in enumerate(values) if i not in whole)
    row_letters = sum(1 for d in dead if d.offset not in whole)
    counted = sum(w.sample_count for w in windows.values())
    assert whole and row_letters and core.counters["duplicates"]  # each way out is taken
    assert counted + row_letters + core.counters["duplicates"] == rows_in
    assert all(d.raw == values[d.offset] for d in dead if d.offset in whole)
    assert {d.reason for d in dead} <= REASONS and all(d.detail for d in dead)


@pytest.mark.parametrize("fmt,decoder", [("native", "native"), ("columnar", "native"), ("otlp", "otlp_json"),
                                         ("prometheus", "prometheus_json")])
def test_tombstones_and_empty_messages_are_dead_lettered_and_the_rest_kept(fmt: str, decoder: str) -> None:
    rows = synth.samples([synth.WorkloadSpec("wl-a", nodes=1, gpus_per_node=2)], T0, 120, 10.0)
    values: list[bytes | None] = [v for _, v in getattr(synth, fmt)(rows)]
    values[1:1] = [None, b""]  # a null value (compaction tombstone) and an empty one, in the middle of a batch
    core = IngestCore(decoder=decoder)
    dead = core.process("telemetry", 0, [SourceMessage(i, v) for i, v in enumerate(values)], NOW)
    assert [(d.offset, d.reason) for d in dead] == [(1, "malformed_json"), (2, "malformed_json")]
    assert "no value" in dead[0].detail and dead[0].raw == b""
    assert sum(w.sample_count for w in core.drain()) == len(rows)


def test_seeded_hostile_fuzz_accounts_for_every_message() -> None:
    """A quick run of benchmarks/fuzz_ingest.py (`make fuzz` runs 100k): random bytes, truncation, wrong types,
    NaN/Infinity, 1e308, a 5 MB message, deep nesting, unicode, tombstones, clocks skewed both ways, repeats.
    in = windows' samples + letters + counters; no crash; no good sample lost; no good message lettered."""
    from benchmarks.fuzz_ingest import generate, run_core

    values, expect = generate(4000, seed=5)
    assert expect.kinds["oversized"] == 1 and expect.bad_units > 200 and expect.dup > 0
    res = run_core(values, expect, batch=700, seed=5)
    assert res["crashes"] == 0 and res["good_samples_lost"] == 0 and res["good_messages_lettered"] == 0
    assert res["units_in"] == res["out_total"] and res["ok"], res
