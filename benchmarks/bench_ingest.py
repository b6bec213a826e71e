"""Ingest throughput on the real local broker, against the ceiling and a faust agent, plus memory.

Same messages, same run, one core each:
- `ingest.<fmt>.samples_per_s`: the ingest stage (KafkaIngestStage: consume, decode, validate, window, produce
  aggregates, flush, commit), samples/s from its first message to its last.
- `ingest.<fmt>.ceiling_samples_per_s`: confluent-kafka consume(5000) + orjson.loads of the same messages, doing
  nothing else.
- `ingest.<fmt>.faust_samples_per_s`: a faust-streaming agent (aiokafka, concurrency 1) doing the same windowed
  aggregation one event at a time, in a subprocess with a deadline.
Both are timed from the end of their first batch to the arrival of the last message, and never ask for more
messages than are left (a consume call short of its batch waits out its timeout, which is not work).
Formats: `native` (one TelemetrySample JSON per message) and `columnar` (TelemetryColumns, one per node per 30 s).
Memory (in process, no broker): `ingest.rss_growth_mb` over a long run at a steady fleet (flat = ~0), and
`ingest.bytes_per_device` = RSS difference between two fleet sizes / device difference.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np
import orjson
import psutil
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from benchmarks.common import bench_main, produce_all, stage_settings
from pipeline.ingest.stage import IngestCore, SourceMessage

BOOTSTRAP = os.environ.get("TRAINWATCH_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
DEADLINE_S = 120.0
T0 = math.floor(time.time() / 60) * 60 - 6 * 3600.0
H100_BF16 = 989e12


# --- messages ---------------------------------------------------------------------------------------------------
def _fleet_columns(nodes: int, gpus: int, t_start: float, seconds: float, interval: float, rng: np.random.Generator,
                   span: float = 30.0) -> list[tuple[int, dict]]:
    """Columnar dicts: one per node per `span` s; returns [(samples, message dict)], time-ordered."""
    out = []
    times = t_start + np.arange(0.0, seconds, interval)
    for c0 in range(0, len(times), max(1, int(span / interval))):
        ts_chunk = times[c0 : c0 + max(1, int(span / interval))]
        for n in range(nodes):
            k = len(ts_chunk) * gpus
            act = np.clip(0.55 + 0.25 * rng.standard_normal(k), 0, 1)
            m = {
                "node": f"node-{n}", "accelerator": "NVIDIA H100 80GB HBM3", "workload_id": f"wl-{n // 4}",
                "account_id": f"acct-{n // 16}", "interval_s": interval,
                "ts": np.repeat(ts_chunk, gpus).round(3).tolist(),
                "device": [f"GPU-{n}-{g}" for g in range(gpus)] * len(ts_chunk),
                "metrics": {
                    "tensor_active": act.round(4).tolist(), "sm_active": np.minimum(act + 0.2, 1).round(4).tolist(),
                    "dram_active": (act * 0.5).round(4).tolist(), "gpu_util": np.minimum(60 + 40 * act, 100).tolist(),
                    "power_w": (200 + 450 * act).round(1).tolist(), "fb_used_mib": [70000.0] * k,
                    "sm_clock_mhz": [1980.0] * k, "nvlink_tx_bytes": (2e10 * act).round().tolist(),
                },
            }
            out.append((k, m))
    return out


def _per_sample(cols: list[tuple[int, dict]]) -> list[bytes]:
    out = []
    for _, m in cols:
        ids = {k: m[k] for k in ("node", "accelerator", "workload_id", "account_id", "interval_s")}
        names = list(m["metrics"])
        for i, (ts, dev) in enumerate(zip(m["ts"], m["device"], strict=True)):
            out.append(orjson.dumps({"ts": ts, "device": dev, **ids, **{n: m["metrics"][n][i] for n in names}}))
    return out


# --- Kafka plumbing ---------------------------------------------------------------------------------------------
def _topic(admin: AdminClient, prefix: str) -> str:
    name = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(30)
    return name


def _produce(topic: str, values: list[bytes]) -> None:
    produce_all(BOOTSTRAP, topic, values, **{"batch.size": 1_000_000, "queue.buffering.max.messages": 1_000_000})


def _ceiling(topic: str, n_messages: int, columnar: bool, batch: int) -> float:
    """consume + orjson.loads only. Timed from the end of the first batch (group join excluded) to the last."""
    c = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"bench-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024 * 1024,
                  "max.partition.fetch.bytes": 8 * 1024 * 1024})  # as the stage's consumer
    c.subscribe([topic])
    seen = samples = 0
    t_first = None
    deadline = time.monotonic() + DEADLINE_S
    try:
        while seen < n_messages and time.monotonic() < deadline:
            # Never ask for more than is left: the last call would wait its whole timeout for a full batch, and
            # that wait (0.5 s) would be timed as if it were work.
            msgs = c.consume(min(batch, n_messages - seen), 0.5)
            k = 0
            for m in msgs:
                d = orjson.loads(m.value())
                k += len(d["ts"]) if columnar else 1
            seen += len(msgs)
            if msgs and t_first is None:
                t_first = time.perf_counter()
            elif t_first is not None:
                samples += k
        elapsed = time.perf_counter() - (t_first or time.perf_counter())
    finally:
        c.close()
    return samples / max(elapsed, 1e-9)


def _stage(topic: str, n_messages: int, batch: int, admin: AdminClient) -> float:
    """The ingest stage, timed like the ceiling (from the end of its first batch to its last)."""
    from pipeline.ingest.kafka_stage import KafkaIngestStage, tune_gc

    tune_gc()  # as `trainwatch ingest run` does
    out, dlq = _topic(admin, "windows"), _topic(admin, "dlq")
    settings = stage_settings(BOOTSTRAP, topic, out, dlq, batch)
    stage = KafkaIngestStage(settings, group_id=f"bench-{uuid.uuid4().hex}")
    stage.subscribe()
    t_first = None
    samples = 0
    deadline = time.monotonic() + DEADLINE_S
    try:
        while stage.stats.messages < n_messages and time.monotonic() < deadline:
            stage.batch_size = min(batch, n_messages - stage.stats.messages)  # as the ceiling: no timed end wait
            before = stage.core.counters["samples_in"]
            n = stage.step(0.5)
            if n and t_first is None:
                t_first = time.perf_counter()
            elif t_first is not None:
                samples += stage.core.counters["samples_in"] - before
        elapsed = time.perf_counter() - (t_first or time.perf_counter())
    finally:
        stage.close()
        admin.delete_topics([out, dlq])
        gc.set_threshold(700, 10, 10)  # back to the defaults for the rest of the benchmark
        gc.unfreeze()
    return samples / max(elapsed, 1e-9)


#: The faust baseline runs at a few thousand events/s: it is timed over the first messages only (a rate, so the
#: comparison stays fair) to keep the run under its deadline.
FAUST_MAX_MESSAGES = {"native": 40_000, "columnar": 2_000}


def _faust(topic: str, n_messages: int, columnar: bool) -> float | None:
    n_messages = min(n_messages, FAUST_MAX_MESSAGES["columnar" if columnar else "native"])
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "faust.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_ingest", "faust-worker", topic, str(n_messages),
               "columnar" if columnar else "native", str(result)]
        try:
            subprocess.run(cmd, capture_output=True, timeout=DEADLINE_S, cwd=Path(__file__).resolve().parents[1])
        except subprocess.TimeoutExpired:
            return None
        return orjson.loads(result.read_bytes())["samples_per_s"] if result.exists() else None


# --- the faust agent (runs in its own process: `python -m benchmarks.bench_ingest faust-worker ...`) ----------
def faust_worker(topic: str, n_messages: int, fmt: str, result: str) -> None:
    import faust

    app = faust.App(f"bench-faust-{uuid.uuid4().hex[:8]}", broker=f"kafka://{BOOTSTRAP}", store="memory://",
                    web_enabled=False, consumer_auto_offset_reset="earliest", topic_partitions=1,
                    datadir=str(Path(result).parent / "faust-data"))  # the caller's temp dir, not the checkout
    src = app.topic(topic, value_type=bytes, value_serializer="raw")
    out = app.topic(f"{topic}-faust-windows", value_type=bytes, value_serializer="raw")
    state: dict = {"seen": 0, "samples": 0, "t0": None, "windows": {}, "seen_keys": {}, "max_ts": -math.inf}
    upper = {"tensor_active": 1.0, "sm_active": 1.0, "dram_active": 1.0, "gpu_util": 100.0, "power_w": 5000.0,
             "fb_used_mib": math.inf, "sm_clock_mhz": math.inf, "nvlink_tx_bytes": math.inf}
    tdp, mem_mib, fp8 = 700.0, 80 * 1024.0, 1979e12

    def aggregate(ts: float, dev: str, node: str, wl: str, interval: float, metrics: dict) -> None:
        # What the ingest core does per sample, one sample at a time: range checks, dedup on (device, ts),
        # FLOP point and band, time-weighted sums, and the 12 x 5 s per-device profiles for synchrony.
        for name, v in metrics.items():
            if v is not None and not (0.0 <= v <= upper.get(name, math.inf)):
                return  # would be dead-lettered
        win = int(ts // 60)
        seen = state["seen_keys"].setdefault(win, set())
        if (dev, ts) in seen:
            return
        seen.add((dev, ts))
        state["max_ts"] = max(state["max_ts"], ts)
        w = state["windows"].setdefault((wl, win), {"flop": [0.0, 0.0, 0.0], "dev_s": 0.0, "n": 0, "devices": {},
                                                    "sums": {}})
        ta = metrics.get("tensor_active")
        if ta is not None:
            f = w["flop"]
            f[0] += interval * H100_BF16 * ta
            f[1] += interval * H100_BF16 * ta
            f[2] += interval * fp8 * ta
        w["dev_s"] += interval
        w["n"] += 1
        prof = w["devices"].setdefault(dev, {"node": node, "p": {}})["p"]
        k = int((ts - win * 60) // 5)
        derived = {"util_frac": metrics.get("gpu_util"), "power_frac": metrics.get("power_w"),
                   "fb_frac": metrics.get("fb_used_mib")}
        for name, scale in (("util_frac", 100.0), ("power_frac", tdp), ("fb_frac", mem_mib)):
            if derived[name] is not None:
                derived[name] = derived[name] / scale
        for name, v in (*metrics.items(), *derived.items()):
            if v is not None:
                s = w["sums"].setdefault(name, [0.0, 0.0, 0.0, 0])
                s[0] += v * interval
                s[1] += v * v * interval
                s[2] += interval
                s[3] += 1
                if name in ("tensor_active", "util_frac", "power_frac"):
                    b = prof.setdefault((name, k), [0.0, 0])
                    b[0] += v
                    b[1] += 1

    async def emit_closed() -> None:
        wm = state["max_ts"] - 30.0
        for key in [k for k in state["windows"] if (k[1] + 1) * 60 <= wm]:
            w = state["windows"].pop(key)
            agg = {"workload_id": key[0], "window_start": key[1] * 60, "flop": w["flop"], "sample_count": w["n"],
                   "device_seconds": w["dev_s"], "devices": sorted(w["devices"]),
                   "sums": {f"{m}.{i}": v for m, s in w["sums"].items() for i, v in enumerate(s)}}
            await out.send(key=key[0].encode(), value=orjson.dumps(agg))

    @app.agent(src, concurrency=1)
    async def ingest(stream):
        async for value in stream:
            if state["t0"] is None:
                state["t0"] = time.perf_counter()
            d = orjson.loads(value)
            if fmt == "columnar":
                ms = d["metrics"]
                for i, (ts, dev) in enumerate(zip(d["ts"], d["device"], strict=True)):
                    aggregate(ts, dev, d["node"], d["workload_id"], d["interval_s"], {k: v[i] for k, v in ms.items()})
                    state["samples"] += 1
            else:
                metrics = {k: d[k] for k in upper if k in d}
                aggregate(d["ts"], d["device"], d["node"], d["workload_id"], d["interval_s"], metrics)
                state["samples"] += 1
            await emit_closed()
            state["seen"] += 1
            if state["seen"] >= n_messages:
                elapsed = time.perf_counter() - state["t0"]
                # faust routes stdout through its logger: hand the figure over in a file
                Path(result).write_bytes(orjson.dumps({"samples_per_s": state["samples"] / elapsed}))
                os._exit(0)

    worker = faust.Worker(app, loglevel=os.environ.get("BENCH_FAUST_LOG", "ERROR"), quiet=True)
    worker.execute_from_commandline()


# --- in process (no broker): the stage's CPU cost against orjson's alone --------------------------------------
def _inproc(values: list[bytes], batch: int, columnar: bool, rounds: int = 3) -> dict[str, float]:
    """Samples/s on this process's CPU time, best of `rounds`, same batches as the Kafka runs:
    - `decode`: orjson.loads of every message, nothing else;
    - `decode_to_arrays` (columnar): orjson.loads plus every float orjson made put into a numpy column (one list
      per column per batch, one conversion; ids stay strings): the least a vectorised stage must do before any
      work of its own, so its ratio to `decode` bounds any orjson-based stage;
    - `stage`: IngestCore (decode, validate, window, emit, commit points) on the same batches.
    On this shared 2-core machine the Kafka ceilings are bound by fetching from the broker; these are not."""
    batches = [values[i : i + batch] for i in range(0, len(values), batch)]
    offsets = [list(range(i, i + len(b))) for i, b in zip(range(0, len(values), batch), batches, strict=True)]
    n = sum(len(orjson.loads(v)["ts"]) for v in values) if columnar else len(values)
    names = list(orjson.loads(values[0])["metrics"]) if columnar else []
    best = {"decode": math.inf, "decode_to_arrays": math.inf, "stage": math.inf}
    gc.collect()
    gc.freeze()  # decoded messages are short-lived: collections would only add noise
    try:
        for _ in range(rounds):
            t = time.process_time()
            for b in batches:
                for v in b:
                    orjson.loads(v)
            best["decode"] = min(best["decode"], time.process_time() - t)
            if columnar:
                t = time.process_time()
                for b in batches:
                    cols: dict[str, list] = {k: [] for k in ("ts", *names)}
                    for d in [orjson.loads(v) for v in b]:
                        cols["ts"].extend(d["ts"])
                        for k, col in d["metrics"].items():
                            cols[k].extend(col)
                    arrays = {k: np.array(c, dtype=np.float64) for k, c in cols.items()}  # None -> NaN
                    del cols, arrays
                best["decode_to_arrays"] = min(best["decode_to_arrays"], time.process_time() - t)
            core, now = IngestCore(), time.time()
            t = time.process_time()
            for b, offs in zip(batches, offsets, strict=True):
                core.process_raw("t", 0, b, offs, now)
                core.ready()
                core.commit_points()
            best["stage"] = min(best["stage"], time.process_time() - t)
    finally:
        gc.unfreeze()
    return {k: round(n / v) for k, v in best.items() if v < math.inf}


# --- memory -----------------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _steady_run(nodes: int, minutes: int, interval: float = 10.0) -> tuple[float, float, list[float], int]:
    """In-process core over `minutes` of event time for a fixed fleet; returns (RSS after warm-up, at end, trace,
    samples). Warm-up = the first 90 event-minutes: per-device dedup state legitimately fills for allowed_lateness
    (1 h) before it can be flat."""
    rng = np.random.default_rng(1)
    core = IngestCore()
    off = samples = 0
    trace = []
    t0 = math.floor(time.time() / 60) * 60 - 60.0 * (minutes + 10)  # all in the past: none is "from the future"
    for minute in range(minutes):
        cols = _fleet_columns(nodes, 8, t0 + 60 * minute, 60.0, interval, rng)
        samples += sum(k for k, _ in cols)
        msgs = [SourceMessage(off + i, orjson.dumps(m)) for i, (_, m) in enumerate(cols)]
        off += len(msgs)
        core.process("t", 0, msgs, time.time())
        core.ready()
        core.commit_points()
        if minute % 5 == 4:
            gc.collect()
            trace.append(round(_rss_mb(), 1))
    warm = min(len(trace) - 1, 90 // 5)
    return trace[warm], trace[-1], trace, samples


def _state_bytes(nodes: int, minutes: int = 6) -> tuple[float, int]:
    """Bytes the core holds (tracemalloc, after GC) with `nodes` x 8 devices active, and that device count."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    rng = np.random.default_rng(2)
    core = IngestCore()
    off = 0
    for minute in range(minutes):
        cols = _fleet_columns(nodes, 8, T0 + 60 * minute, 60.0, 10.0, rng)
        msgs = [SourceMessage(off + i, orjson.dumps(m)) for i, (_, m) in enumerate(cols)]
        off += len(msgs)
        core.process("t", 0, msgs, time.time())
        core.ready()
        del cols, msgs
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert sum(st.open_units for st in core.states()) > 0
    return held, nodes * 8


def run(quick: bool = False) -> dict:
    figures: dict = {}
    # Memory first, while the process holds nothing else.
    # Full mode: 64 nodes x 8 devices at 10 s for 3,300 event-minutes = 10.1M samples (quick: 92k).
    start, end, trace, steady_samples = _steady_run(16, 30) if quick else _steady_run(64, 3300)
    figures["ingest.rss_growth_mb"] = round(end - start, 1)
    figures["ingest.steady_run_samples"] = steady_samples
    trace = trace if len(trace) <= 40 else trace[:: len(trace) // 40]
    rng = np.random.default_rng(0)
    nodes, minutes = (96, 10) if quick else (256, 20)
    cols = _fleet_columns(nodes, 8, T0, 60.0 * minutes, 5.0, rng)
    columnar_values = [orjson.dumps(m) for _, m in cols]
    native_values = _per_sample(cols)
    n_samples = sum(k for k, _ in cols)
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    topics = []
    # Batches of ~5,000 samples for both formats (a columnar message holds 48).
    batches = {"native": 5000, "columnar": 100}
    try:
        for fmt, values in (("native", native_values), ("columnar", columnar_values)):
            topic = _topic(admin, fmt)
            topics.append(topic)
            _produce(topic, values)
            figures[f"ingest.{fmt}.ceiling_samples_per_s"] = round(_ceiling(topic, len(values), fmt == "columnar",
                                                                            batches[fmt]))
            figures[f"ingest.{fmt}.samples_per_s"] = round(_stage(topic, len(values), batches[fmt], admin))
            f = _faust(topic, len(values), fmt == "columnar")
            figures[f"ingest.{fmt}.faust_samples_per_s"] = round(f) if f else None
    finally:
        if topics:
            admin.delete_topics(topics)
    for fmt, values in (("native", native_values), ("columnar", columnar_values)):
        for k, v in _inproc(values, batches[fmt], fmt == "columnar").items():
            figures[f"ingest.{fmt}.inproc_{k}_samples_per_s"] = v
    del native_values, columnar_values, cols
    (small, n_small), (large, n_large) = _state_bytes(8), _state_bytes(64)
    figures["memory.bytes_per_device"] = round((large - small) / (n_large - n_small))
    # The headline keys name the per-sample native format, the one most exporters send.
    for k in ("samples_per_s", "ceiling_samples_per_s", "faust_samples_per_s"):
        figures[f"ingest.{k}"] = figures[f"ingest.native.{k}"]
    targets = []
    for fmt in ("native", "columnar"):
        targets.append({"key": f"ingest.{fmt}.samples_per_s", "baseline": f"ingest.{fmt}.ceiling_samples_per_s",
                        "min": 0.7, "target_text": ">= 0.7 x consume+decode ceiling"})
        targets.append({"key": f"ingest.{fmt}.samples_per_s", "baseline": f"ingest.{fmt}.faust_samples_per_s",
                        "min": 4.0, "target_text": ">= 4 x faust agent"})
    for fmt in ("native", "columnar"):
        targets.append({"key": f"ingest.{fmt}.inproc_stage_samples_per_s",
                        "baseline": f"ingest.{fmt}.inproc_decode_samples_per_s", "min": 0.0,
                        "target_text": "in process, CPU time: the stage vs orjson.loads alone (informational)"})
    targets.append({"key": "ingest.columnar.inproc_decode_to_arrays_samples_per_s",
                    "baseline": "ingest.columnar.inproc_decode_samples_per_s", "min": 0.0,
                    "target_text": "bound on any orjson-based stage: decode + floats into numpy columns, nothing "
                                   "else, vs decode alone (informational)"})
    targets.append({"key": "ingest.rss_growth_mb", "max": 20.0, "target_text": "flat RSS over a long run"})
    targets.append({"key": "memory.bytes_per_device", "max": 2048, "target_text": "<= 2 KiB per active device"})
    return {
        "figures": figures,
        "targets": targets,
        "params": {"samples": n_samples, "native_messages": n_samples,
                   "columnar_messages": n_samples // 48, "devices": nodes * 8, "steady_rss_trace_mb": trace},
        "notes": [f"ingest: {n_samples:,} samples of {nodes * 8} devices (5 s interval), one partition, one core per "
                  f"contender, batches of ~5,000 samples; RSS (MB) through a {128 if quick else 512}-device steady "
                  f"run of {steady_samples:,} samples: " + ", ".join(map(str, trace)) + " (growth measured after a "
                  "90 event-minute warm-up); bytes_per_device from tracemalloc of the core's state "
                  "(open windows, dedup, per-device profiles) at 64 vs 512 devices"],
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "faust-worker":
        _topic_name, _n, _fmt, _result = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
        sys.argv = [sys.argv[0], "worker"]  # faust's Worker parses the command line
        faust_worker(_topic_name, _n, _fmt, _result)
    else:
        bench_main(run)
