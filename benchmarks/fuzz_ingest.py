"""Hostile-input fuzz of the ingest core (issue 13): every message accounted for, no crash, no good sample lost.

Seeded. A stream of clean native samples (a fleet at 10 s) is interleaved with hostile messages: random bytes,
truncated JSON, wrong types (numeric strings, "Infinity"/"NaN", bools, lists, objects), absurd magnitudes (1e308,
gpu_index 2^62), 5 MB messages, deep nesting, invalid UTF-8 and odd unicode ids, tombstones and empty values,
unknown fields, missing ids, clocks skewed both ways (hours ahead, days ahead, hours behind, before 2000), legit
late samples, exact repeats, and batch / columnar messages with one bad row. Each message's expected fate is known
from how it was made:

- good (a unique valid sample, late ones included): its sample must be in a window;
- duplicate (an exact repeat): counted by the `duplicates` counter, never in a window twice;
- bad: exactly one dead letter per bad unit (the message, or its bad row), never a window sample.

Accounting (the result file): units in (rows of messages that carry rows, and whole messages that carry none)
= windows' samples + letters + duplicates + messages_without_rows; crashes = 0; good samples lost = 0.

    python -m benchmarks.fuzz_ingest [--messages 100000] [--seed 13] [--batch 5000] [--kafka N] [--out FILE]

`--kafka N` also sends the first N messages through the real broker path (KafkaIngestStage on the local broker)
and checks the same accounting there (letters read back from the DLQ topic).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from pipeline.ingest import synth
from pipeline.ingest.stage import IngestCore
from schemas.serde import dumps
from schemas.telemetry import METRIC_FIELDS

T0 = 1_767_225_600.0
RESULT = Path(__file__).resolve().parent / "results" / "fuzz_ingest.json"
SPECS = [synth.WorkloadSpec(f"wl-{k}", account_id=f"acct-{k % 3}", nodes=3, gpus_per_node=4) for k in range(4)]
#: hostile kinds and their weights (per 1000 messages); the rest are clean samples
KINDS = {
    "random_bytes": 8, "truncated": 8, "wrong_type": 14, "absurd_value": 10, "huge_gpu_index": 3, "oversized": 0,
    "deep_nesting": 3, "bad_utf8": 3, "unicode_ids": 4, "tombstone": 4, "empty": 3, "unknown_field": 4,
    "missing_id": 4, "clock_ahead": 8, "clock_far_future": 3, "clock_behind_too_late": 5, "clock_before_2000": 3,
    "late_good": 10, "duplicate": 12, "batch_bad_row": 6, "columnar_bad_row": 6, "not_object": 3,
}
OVERSIZED_EVERY = 25_000  # one 5 MB message per this many (four in a 100k run; one in a shorter one)
ODD_TYPES = ["0.5", "Infinity", "NaN", "-Infinity", True, False, [1.0], {"v": 1}, "", "1e308"]
ABSURD = [1e308, -1e308, 1e300, 1.2e21, 1e17, -1.0]  # above every bound in schemas.telemetry.MAX_VALUES


@dataclass
class Expect:
    good: int = 0  # unique good samples sent (must all be in windows)
    dup: int = 0  # exact repeats (the duplicates counter)
    bad_units: int = 0  # units that must each give exactly one letter
    messages: int = 0
    kinds: Counter = field(default_factory=Counter)
    bad_offsets: dict[int, int] = field(default_factory=dict)  # offset -> letters expected there
    good_offsets: set[int] = field(default_factory=set)  # offsets that must give no letter


def generate(n: int, seed: int) -> tuple[list[bytes | None], Expect]:
    """`n` messages and what must become of them."""
    rng = random.Random(seed)
    rounds = math.ceil(n * 1.05 / sum(s.nodes * s.gpus_per_node for s in SPECS)) + 10
    clean = synth.samples(SPECS, T0, rounds * 10.0, 10.0, seed=seed)
    kinds = list(KINDS)
    weights = [KINDS[k] for k in kinds]
    p_bad = sum(weights) / 1000.0
    out: list[bytes | None] = []
    ex = Expect()
    sent: list[dict] = []  # good samples sent, for repeats
    ci = 0
    skew_dev = 0

    def next_clean() -> dict:
        nonlocal ci
        s = clean[ci]
        ci += 1
        return s

    def add(v: bytes | None, kind: str, good: int = 0, dup: int = 0, bad: int = 0) -> None:
        off = len(out)
        out.append(v)
        ex.kinds[kind] += 1
        ex.good += good
        ex.dup += dup
        ex.bad_units += bad
        if bad:
            ex.bad_offsets[off] = bad
        else:
            ex.good_offsets.add(off)

    while len(out) < n:
        if len(out) % OVERSIZED_EVERY == min(OVERSIZED_EVERY, n) // 2:
            add(b'{"ts": 1767225600, "pad": "' + os.urandom(5 * 2**19).hex().encode() + b'"}', "oversized", bad=1)
            continue
        if rng.random() >= p_bad or not sent:
            s = next_clean()
            sent.append(s)
            add(orjson.dumps(s), "good", good=1)
            continue
        kind = rng.choices(kinds, weights)[0]
        base = dict(sent[-1])
        now_ts = base["ts"]
        if kind == "random_bytes":
            add(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\xff", kind, bad=1)
        elif kind == "truncated":
            raw = orjson.dumps(next_clean())
            add(raw[: rng.randrange(1, len(raw) - 1)], kind, bad=1)
        elif kind == "wrong_type":
            f = rng.choice(["ts", "interval_s", "device", "node", "workload_id", "gpu_index", *METRIC_FIELDS])
            odd = rng.choice(ODD_TYPES)
            if f in ("device", "node", "workload_id") and isinstance(odd, str) and odd:
                odd = rng.choice([1.5, True, [1.0], {"v": 1}, 7])  # a non-empty string is a valid id
            add(orjson.dumps({**next_clean(), f: odd}), kind, bad=1)
        elif kind == "absurd_value":
            add(orjson.dumps({**next_clean(), rng.choice(METRIC_FIELDS): rng.choice(ABSURD)}), kind, bad=1)
        elif kind == "huge_gpu_index":
            add(orjson.dumps({**next_clean(), "gpu_index": rng.choice([2**62, -1, 10**6])}), kind, bad=1)
        elif kind == "deep_nesting":
            depth = rng.choice([50, 600, 3000])
            add(b'{"ts": ' + b"[" * depth + b"1" + b"]" * depth + b"}", kind, bad=1)
        elif kind == "bad_utf8":
            add(b'{"ts": 1767225600, "node": "n\xc3\x28", "device": "d"}', kind, bad=1)
        elif kind == "unicode_ids":  # odd but valid ids: a good sample
            s = {**next_clean(), "device": f"GPU-\u00e9\u4e2d\U0001f600-{len(out)}"}
            sent.append(s)
            add(orjson.dumps(s), kind, good=1)
        elif kind in ("tombstone", "empty"):
            add(None if kind == "tombstone" else b"", kind, bad=1)
        elif kind == "unknown_field":
            add(orjson.dumps({**next_clean(), "surprise": 1}), kind, bad=1)
        elif kind == "missing_id":
            s = next_clean()
            s.pop(rng.choice(["workload_id", "device", "node"]))
            add(orjson.dumps(s), kind, bad=1)
        elif kind in ("clock_ahead", "clock_far_future", "clock_behind_too_late", "clock_before_2000", "late_good"):
            skew_dev += 1
            shift = {"clock_ahead": rng.uniform(3600, 20 * 3600), "clock_far_future": rng.uniform(2, 30) * 86_400,
                     "clock_behind_too_late": -rng.uniform(3 * 3600, 10 * 3600), "late_good": -rng.uniform(300, 1800),
                     "clock_before_2000": -now_ts + rng.uniform(0, 9e8)}[kind]
            s = {**base, "ts": round(now_ts + shift, 3), "device": f"GPU-skew-{skew_dev}"}
            if kind == "late_good":
                if s["ts"] < T0 + 1800:  # too early in the stream to be only a little late: skip
                    continue
                add(orjson.dumps(s), kind, good=1)
            else:
                add(orjson.dumps(s), kind, bad=1)
        elif kind == "duplicate":
            recent = [x for x in sent[-400:] if not x["device"].startswith("GPU-skew")]
            if not recent:
                continue
            add(orjson.dumps(rng.choice(recent)), kind, dup=1)
        elif kind == "batch_bad_row":
            rows = [next_clean() for _ in range(4)]
            j = rng.randrange(4)
            rows[j] = {**rows[j], "gpu_util": rng.choice([1e308, "0.5", -5.0, 250.0])}
            sent.extend(r for i, r in enumerate(rows) if i != j)
            add(orjson.dumps({"samples": rows}), kind, good=3, bad=1)
        elif kind == "columnar_bad_row":
            rows = [next_clean() for _ in range(4)]
            rows = [r for r in rows if r["node"] == rows[0]["node"] and r["workload_id"] == rows[0]["workload_id"]]
            j = rng.randrange(len(rows))
            cols = {m: [r.get(m) for r in rows] for m in ("tensor_active", "gpu_util", "power_w")}
            cols["power_w"][j] = 1e300
            msg = {"node": rows[0]["node"], "accelerator": rows[0]["accelerator"],
                   "workload_id": rows[0]["workload_id"], "account_id": rows[0]["account_id"], "interval_s": 10.0,
                   "ts": [r["ts"] for r in rows], "device": [r["device"] for r in rows], "metrics": cols}
            sent.extend(r for i, r in enumerate(rows) if i != j)
            add(orjson.dumps(msg), kind, good=len(rows) - 1, bad=1)
        elif kind == "not_object":
            add(rng.choice([b"[]", b"42", b'"x"', b"null", b"[1,2]"]), kind, bad=1)
    ex.messages = len(out)
    return out, ex


def check(ex: Expect, letters: list[tuple[int, str]], window_samples: int, counters: Counter, crashes: int,
          path: str) -> dict:
    """The accounting of one run against what the generator made."""
    by_off = Counter(off for off, _ in letters)
    lettered_good = sorted(off for off in by_off if off in ex.good_offsets)
    wrong_count = sorted(off for off, k in ex.bad_offsets.items() if by_off.get(off, 0) != k)
    units_in = ex.good + ex.dup + ex.bad_units
    out_total = window_samples + len(letters) + counters["duplicates"] + counters["messages_without_rows"]
    res = {
        "path": path,
        "messages_in": ex.messages,
        "units_in": units_in,
        "window_samples": window_samples,
        "letters": len(letters),
        "letters_by_reason": dict(sorted(Counter(r for _, r in letters).items())),
        "duplicates_counted": counters["duplicates"],
        "messages_without_rows": counters["messages_without_rows"],
        "out_total": out_total,
        "crashes": crashes,
        "good_samples_sent": ex.good,
        "good_samples_lost": ex.good - window_samples if window_samples <= ex.good else 0,
        "extra_window_samples": max(0, window_samples - ex.good),
        "duplicates_sent": ex.dup,
        "bad_units_sent": ex.bad_units,
        "good_messages_lettered": len(lettered_good),
        "bad_messages_without_exactly_their_letters": len(wrong_count),
    }
    res["ok"] = (units_in == out_total and crashes == 0 and window_samples == ex.good
                 and counters["duplicates"] == ex.dup and not lettered_good and not wrong_count)
    if lettered_good or wrong_count:
        res["examples"] = {"good_lettered": lettered_good[:5], "bad_wrong": wrong_count[:5]}
    return res


def run_core(values: list[bytes | None], ex: Expect, batch: int, seed: int) -> dict:
    rng = random.Random(seed + 1)
    core = IngestCore()
    now = T0 + 86_400.0 * 2
    letters: list[tuple[int, str]] = []
    samples = crashes = 0
    i = 0
    t = time.process_time()
    while i < len(values):
        k = rng.randint(max(1, batch // 4), batch)  # uneven batches, like a consumer's
        try:
            dead = core.process_raw("gpu.telemetry", 0, values[i : i + k], list(range(i, i + len(values[i : i + k]))),
                                    now, key_of=lambda _j: b"key")
            letters += [(d.offset, d.reason) for d in dead]
            samples += sum(w.sample_count for w in core.ready())
            core.commit_points()
        except Exception:  # a crash is a finding: count it, say where, go on with the next batch
            crashes += 1
            traceback.print_exc()
        i += k
    samples += sum(w.sample_count for w in core.drain())
    letters += [(d.offset, d.reason) for d in core.drain_letters]
    res = check(ex, letters, samples, core.counters, crashes, "core")
    res["cpu_s"] = round(time.process_time() - t, 2)
    return res


def run_kafka(values: list[bytes | None], ex: Expect, bootstrap: str) -> dict:
    """The same messages through the real broker: produce, run KafkaIngestStage, read windows and letters back."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from benchmarks.common import produce_all, stage_settings
    from pipeline.ingest.kafka_stage import KafkaIngestStage
    from schemas.serde import decode
    from schemas.windows import WindowAggregate

    tag = uuid.uuid4().hex[:10]
    tel, out, dlq = f"fuzz-tel-{tag}", f"fuzz-win-{tag}", f"fuzz-dlq-{tag}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futs = admin.create_topics([NewTopic(tel, 1, 1, config={"max.message.bytes": str(8 * 2**20)}),
                                NewTopic(out, 1, 1), NewTopic(dlq, 1, 1)])
    for f in futs.values():
        f.result(timeout=30)
    try:
        produce_all(bootstrap, tel, values, **{"message.max.bytes": 8 * 2**20})
        settings = stage_settings(bootstrap, tel, out, dlq, 2000)
        stage = KafkaIngestStage(settings, group_id=f"fuzz-{tag}")
        crashes = 0
        held = [0]

        def done() -> bool:  # at the end of this finite input, count what the live stage keeps open (to re-read)
            if stage.stats.messages < len(values):
                return False
            held[0] = sum(st.open_samples for st in stage.core.states())
            return True

        try:
            stage.run(max_seconds=300, stop=done)
        except Exception:
            crashes += 1
            traceback.print_exc()
        open_samples = held[0]

        def read(topic: str) -> list:
            c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4().hex}"})
            high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
            c.assign([TopicPartition(topic, 0, 0)])
            got: list = []
            deadline = time.monotonic() + 120
            while len(got) < high and time.monotonic() < deadline:
                got += [m for m in c.consume(1000, 1.0) if m.error() is None]
            c.close()
            return got

        wins = {w.window_id: w for w in (decode(WindowAggregate, m.value()) for m in read(out))}
        letters = []
        for m in read(dlq):
            h = dict(m.headers())
            letters.append((int(h["dlq.offset"]), h["dlq.reason"].decode()))
        samples = sum(w.sample_count for w in wins.values()) + open_samples
        res = check(ex, letters, samples, stage.core.counters, crashes, "kafka")
        res["committed_offset"] = stage.stats.last_commit.get(f"{tel}:0")
        res["core_samples_ok"] = stage.core.counters["samples_ok"]
        res["windows_read"] = len(wins)
        res["windows_emitted"] = stage.stats.windows
        return res
    finally:
        admin.delete_topics([tel, out, dlq])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--kafka", type=int, default=0, help="also send the first N messages through the broker")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    t = time.monotonic()
    values, ex = generate(args.messages, args.seed)
    result = {"seed": args.seed, "messages": args.messages, "kinds": dict(sorted(ex.kinds.items())),
              "runs": [run_core(values, ex, args.batch, args.seed)]}
    if args.kafka:
        sub_vals, sub_ex = generate(args.kafka, args.seed + 100)
        result["runs"].append(run_kafka(sub_vals, sub_ex,
                                        os.environ.get("TRAINWATCH_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")))
    result["ok"] = all(r["ok"] for r in result["runs"])
    result["wall_s"] = round(time.monotonic() - t, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(dumps(result) + b"\n")
    for r in result["runs"]:
        print(" ".join(f"{k}={v}" for k, v in r.items() if k != "letters_by_reason"))
    print(f"ok={result['ok']} -> {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
