"""Scaling: two ingest consumers in one consumer group against one, on the same 2-partition topic, same run.

Each consumer is a subprocess running KafkaIngestStage, pinned to one core (os.sched_setaffinity where available).
A start gate keeps the group join out of the timing: a worker pauses what it is assigned and reports it; the
parent says `go` only once the group is stable (one consumer: both partitions; two: one partition each), so no
rebalance re-reads data inside the timed span. Rounds alternate one/two; figures are medians.
Throughput = samples on the topic / (last batch that reached the end offsets - start of the first batch that
returned data), over all workers (wall clock, same host).
- `scaling.one_consumer_samples_per_s`, `scaling.two_consumers_samples_per_s`, `scaling.two_vs_one` (target >= 1.6).
"""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from benchmarks.common import bench_main
from pipeline.ingest import synth

BOOTSTRAP = os.environ.get("TRAINWATCH_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 120.0
PARTITIONS = 2


# --- the worker (`python -m benchmarks.bench_scaling worker TOPIC GROUP CPU END0,END1`) ------------------------
def _say(obj: dict) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def _stdin_line(timeout: float) -> str | None:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return sys.stdin.readline().strip() if ready else None


def worker(topic: str, group: str, cpu: int, ends: list[int]) -> None:
    from confluent_kafka import Consumer, TopicPartition

    from pipeline.ingest.kafka_stage import KafkaIngestStage, tune_gc
    from pipeline.settings import KafkaSettings, Settings, TopicSettings

    if hasattr(os, "sched_setaffinity") and cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    tune_gc()  # as `trainwatch ingest run` does
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=BOOTSTRAP),
                        topics=TopicSettings(telemetry=topic, windows=f"{topic}-windows", dlq=f"{topic}-dlq"))
    stage = KafkaIngestStage(settings, group_id=group)
    c: Consumer = stage.consumer

    def on_assign(consumer: Consumer, parts: list[TopicPartition]) -> None:
        stage._on_assign(consumer, parts)
        consumer.assign(parts)
        if not started:
            consumer.pause(parts)  # the gate: nothing is fetched until the group is stable and the parent says go
        _say({"assigned": sorted(p.partition for p in parts), "id": suffix})

    started = False
    c.subscribe([topic], on_assign=on_assign, on_revoke=stage._on_revoke)
    leaked = 0
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:  # wait for go, serving rebalance callbacks meanwhile
        leaked += stage.step(0.1)
        if _stdin_line(0) == "go":
            break
    started = True
    samples0 = stage.core.counters["samples_in"]
    c.resume(c.assignment())
    t_first = t_last = None
    done = False
    while time.monotonic() < deadline:
        t = time.time()
        n = stage.step(0.05)
        if n:
            t_first = t if t_first is None else t_first
            t_last = time.time()
        if not done:
            assigned = c.assignment()
            pos = c.position(assigned) if assigned else []
            if pos and all(tp.offset >= ends[tp.partition] for tp in pos):
                done = True
                _say({"done": sorted(tp.partition for tp in pos), "id": suffix})
        if _stdin_line(0) == "stop":
            break
    _say({"result": {"t_first": t_first, "t_last": t_last, "messages": stage.stats.messages, "leaked": leaked,
                     "samples": stage.core.counters["samples_in"] - samples0}, "id": suffix})
    stage.close()


# --- the parent -------------------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, topic: str, group: str, cpu: int, ends: list[int]) -> None:
        cmd = [sys.executable, "-m", "benchmarks.bench_scaling", "worker", topic, group, str(cpu),
               ",".join(map(str, ends))]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        self.assigned: list[int] = []
        self.done: list[int] | None = None
        self.result: dict | None = None

    def poll(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return
        line = self.proc.stdout.readline()
        if not line:
            if self.result is not None:  # it said its result and exited: fine while the others finish
                return
            raise RuntimeError(f"worker exited ({self.proc.poll()})")
        if not line.startswith("{"):
            return
        msg = orjson.loads(line)
        if "assigned" in msg:
            self.assigned, self.done = msg["assigned"], None
        elif "done" in msg:
            self.done = msg["done"]
        elif "result" in msg:
            self.result = msg["result"]

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _wait(workers: list[_Worker], cond, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {DEADLINE_S} s")
        for w in workers:
            w.poll(0.05)


def _measure(topic: str, cpus: list[int], ends: list[int], total_samples: int) -> tuple[float, list[dict]]:
    group = f"bench-scaling-{uuid.uuid4().hex[:8]}"
    workers = [_Worker(topic, group, cpu, ends) for cpu in cpus]
    try:
        def stable() -> bool:  # every partition assigned exactly once, and every worker holds some
            got = sorted(p for w in workers for p in w.assigned)
            return got == list(range(PARTITIONS)) and all(w.assigned for w in workers)

        _wait(workers, stable, "stable group assignment")
        for w in workers:
            w.send("go")
        _wait(workers, lambda: sorted(p for w in workers for p in (w.done or [])) == list(range(PARTITIONS)),
              "end of topic")
        for w in workers:
            w.send("stop")
        _wait(workers, lambda: all(w.result is not None for w in workers), "worker results")
        results = [w.result for w in workers if w.result is not None]
    finally:
        for w in workers:
            w.kill()
    t0 = min(r["t_first"] for r in results if r["t_first"] is not None)
    t1 = max(r["t_last"] for r in results if r["t_last"] is not None)
    distinct = total_samples - sum(r["leaked"] for r in results)
    return distinct / (t1 - t0), results


def _messages(quick: bool) -> list[tuple[int, bytes]]:
    """(partition, native sample JSON): 32 workloads of 8 devices, 2 s interval; nodes alternate between partitions."""
    # Full mode keeps the quick message set (a larger one ran workers past their deadline) and runs more rounds.
    seconds = 1800
    specs = [synth.WorkloadSpec(f"wl-{i}", f"acct-{i}", nodes=2, gpus_per_node=4) for i in range(32)]
    t0 = (time.time() // 60) * 60 - 6 * 3600.0
    rows = synth.samples(specs, t0, seconds, 2.0)
    return [(int(r["node"][-1]) % PARTITIONS, v) for r, (_, v) in zip(rows, synth.native(rows), strict=True)]


def run(quick: bool = False) -> dict:
    msgs = _messages(quick)
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    topic = f"bench-scaling-{uuid.uuid4().hex[:8]}"
    # The broker does not auto-create topics: the stage's outputs are created here too.
    made = admin.create_topics([NewTopic(t, num_partitions=PARTITIONS if t == topic else 1, replication_factor=1)
                                for t in (topic, f"{topic}-windows", f"{topic}-dlq")])
    for fut in made.values():
        fut.result(30)
    try:
        p = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 20, "batch.size": 1_000_000,
                      "queue.buffering.max.messages": 1_000_000})
        ends = [0] * PARTITIONS
        for part, v in msgs:
            while True:
                try:
                    p.produce(topic, v, b"k", partition=part)
                    break
                except BufferError:
                    p.poll(0.05)
            ends[part] += 1
        assert p.flush(60) == 0
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [-1, -1]
        pair = [cpus[0], cpus[1 % len(cpus)]]
        rounds = 3 if quick else 5
        ones, twos, r1, r2 = [], [], [], []
        for _ in range(rounds):  # alternate, so load from other work on the machine hits both alike
            x, r = _measure(topic, pair[:1], ends, len(msgs))
            ones.append(round(x))
            r1.append(r)
            x, r = _measure(topic, pair, ends, len(msgs))
            twos.append(round(x))
            r2.append(r)
        one, two = statistics.median(ones), statistics.median(twos)
    finally:
        admin.delete_topics([topic, f"{topic}-windows", f"{topic}-dlq"])
    return {
        "figures": {"scaling.one_consumer_samples_per_s": round(one), "scaling.two_consumers_samples_per_s": round(two),
                    "scaling.two_vs_one": round(two / one, 3)},
        "targets": [{"key": "scaling.two_consumers_samples_per_s", "baseline": "scaling.one_consumer_samples_per_s",
                     "min": 1.6, "target_text": ">= 1.6 x one consumer (two consumers, one group, two cores)"}],
        "params": {"samples": len(msgs), "partitions": PARTITIONS, "per_partition": ends, "cpus": pair,
                   "rounds": rounds, "one_samples_per_s": ones, "two_samples_per_s": twos, "one": r1, "two": r2},
        "notes": [f"scaling: {len(msgs):,} native samples on a {PARTITIONS}-partition topic; each consumer a process "
                  f"pinned to one core ({pair}); timed after the group is stable; median of {rounds} alternating "
                  f"rounds (one: {ones}, two: {twos} samples/s). This machine has "
                  f"{os.cpu_count()} cores, and the broker (and anything else running) shares them with the "
                  "consumers, so two consumers cannot get two whole cores: the ratio is a lower bound of what "
                  "two dedicated cores would give."],
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), [int(x) for x in sys.argv[5].split(",")])
    else:
        bench_main(run)
