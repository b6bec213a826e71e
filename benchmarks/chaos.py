"""Chaos run: the demo and scope scenarios through ingest + detect on a 3-broker cluster, under faults, compared
with a clean in-process replay of the same folder.

`python -m benchmarks.chaos [--quick] [--seed N]` (`make chaos`, `make chaos-quick`) writes
`benchmarks/results/chaos.json` (quick: `chaos-quick.json`) and, in full mode, the README's chaos table.

Per scenario: the folder is produced to its own topics (replication 3, min ISR 2, 4 partitions) in delivery order,
paced so the stream lasts as long as the faults do; one `trainwatch run --stage all` worker (static group
membership) consumes it. Faults, in a seeded random order at random moments: kill -9 of the worker's process group
(restarted at once, as a supervisor would), kill -9 of one broker (restarted 20 s later by kafka.sh), and the
ClickHouse store failing every call for 30 s (pipeline/faults.py). A worker that exits on its own is restarted and
counted. The stream then goes on with idle tick nodes (no account, 0 FLOP) that carry every detect partition past
the last sample, as a live stream would. Once it is produced and the worker idle, it is stopped and its store and
feed are compared with the replay: cases lost / extra (by case id, and by policy + reason + subject), knowledge_at
moved by more than a window, duplicate case events (raw vs FINAL), duplicate feed messages, compute totals per
account, and the time from each kill until the restarted worker writes windows again (ingest) and commits (detect).

`--store-outages N --kill-after-store S` is the variant that found a lost owner case (Dec 6): N store outages, each
followed within S seconds by a kill -9, while batches that waited out the outage save their state.

Nothing here asserts: tests/test_chaos_smoke.py runs --quick and asserts the properties that must hold.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
KAFKA_SH = REPO / "deploy" / "local" / "kafka.sh"
ROLES = ("telemetry", "windows", "cip", "allocations", "detections", "cases", "dlq")
PARTITIONS = 4
WINDOW_S = 60.0
RESUME_CAP_S = 60.0  # a worker not committing again within this after a fault counts as "not resumed"
STALLED_S = 90.0  # drain: nothing moved for this long with detect lag left = done (the lag is recorded)
# One workload id per detect partition: ingest keys a window without account by its workload, and librdkafka's
# default partitioner puts a key on CRC-32(key) % partitions.
TICK_WORKLOADS = tuple(next(w for w in (f"chaos-tick-{i}" for i in range(64))
                            if zlib.crc32(w.encode()) % PARTITIONS == d) for d in range(PARTITIONS))
TICK_EVERY_S = 5.0  # while faults are still due after the folder is produced, a round of ticks this often
STILL_S = 20.0  # drain: nothing moved for this long with detect lag 0 = done
DRAIN_CAP_S = 600.0  # drain: at most this, plus the worker's idle waits (owner_idle_s + source_quiet_s)

# Worker and replay read the store through this script (chDB: one process per engine path, so never in ours).
STORE_SCRIPT = """
import sys, orjson
from pipeline.store import Store
s = Store.connect(sys.argv[1], sys.argv[2])
cases = [{"case_id": c.case_id, "policy": c.policy_id, "status": c.status, "reason": c.reason,
          "subject": c.beneficial_owner_id or c.account_id, "run_id": c.run_id, "knowledge_at": c.knowledge_at,
          "due_at": c.due_at} for c in s.list_cases()]
raw = s.query("SELECT count() AS n, uniqExact(event_id) AS u FROM case_events")[0]
fin = s.query("SELECT count() AS n FROM case_events FINAL")[0]
win = s.query("SELECT ifNull(account_id, '') AS a, window_start AS t, sum(flop) AS f FROM windows FINAL GROUP BY a, t")
raw_flop = s.query("SELECT ifNull(account_id, '') AS a, sum(flop) AS f FROM windows GROUP BY a")
# every stored partial (raw, not FINAL): kept with --keep, to tell a partial never stored from one replaced
rows = s.query("SELECT window_id AS i, workload_id AS w, partition AS p, revision AS r, window_start AS t, "
               "sample_count AS n, flop AS f FROM windows")
dets = s.query("SELECT detection_id AS i, account_id AS a, reason AS r, outcome AS o, event_time AS t, "
               "detector_id AS d FROM detections")  # raw: every version stored (kept with --keep)
print(orjson.dumps({"detections": [[r["i"], r["a"], r["r"], r["o"], r["t"], r["d"]] for r in dets],
                    "cases": cases, "events_raw": raw["n"], "events_unique": raw["u"], "events_final": fin["n"],
                    "windows": [[r["a"], r["t"], r["f"]] for r in win],
                    "raw_flop": {r["a"]: r["f"] for r in raw_flop},
                    "partials": [[r["i"], r["w"], r["p"], r["r"], r["t"], r["n"], r["f"]] for r in rows]}).decode())
"""

# The partitioned reference: the same in-process replay with telemetry spread over the topic's partitions by node,
# as the producer spreads it (pipeline/runner.py node_partition): each partition then has its own watermark, so
# the rows that arrive late (corrections) and a window's first merge are the Kafka path's.
PARTITIONED_SCRIPT = """
import sys
from pathlib import Path
from pipeline.classifier_loader import load_classifier
from pipeline.ingest.aggregate import WindowConfig
from pipeline.runner import InProcessPipeline
from pipeline.settings import load_settings
from pipeline.sources import read_folder
from pipeline.store import Store
from schemas.policy import load_policy
settings = load_settings()
policy = load_policy(sys.argv[4])
with Store.connect(sys.argv[2], sys.argv[3]) as store:
    InProcessPipeline(store, policy, load_classifier(settings.model_path, policy),
                      window=WindowConfig.from_settings(settings), batch_size=settings.ingest.batch_size,
                      telemetry_partitions=int(sys.argv[5])).run(read_folder(Path(sys.argv[1])))
"""


@dataclass
class Plan:
    scenario: str
    kills: int
    broker_kill: bool
    store_outage_s: float
    stream_s: float  # how long producing the folder takes (paced)
    store_outages: int = 1
    #: kill -9 the worker within this many seconds after each store outage ends (None: no such kill). A batch that
    #: waited out the outage is then mid-save: the restart that lost an owner case on Dec 6 (README, "Chaos run")
    kill_after_store_s: float | None = None


@dataclass
class Fault:
    kind: str
    at_s: float
    recovery: dict[str, float | None] = field(default_factory=dict)
    note: str = ""
    # after a kill: the restarted worker's startup phases (pipeline/detect/startup.py), [s after the kill, CPU s]
    phases: dict[str, list[float]] = field(default_factory=dict)


class Cluster:
    """A three-broker KRaft cluster of our own (own home and ports; kafka.sh stops only what this owner started)."""

    def __init__(self, port: int, home: Path) -> None:
        self.port, self.home = port, home
        self.owner = f"chaos-{os.getpid()}"
        libs = Path(os.environ.get("TRAINWATCH_KAFKA_HOME", Path.home() / ".cache" / "trainwatch" / "kafka")) / "libs"
        self.env = {**os.environ, "TRAINWATCH_KAFKA_HOME": str(home), "TRAINWATCH_KAFKA_LIBS": str(libs),
                    "TRAINWATCH_KAFKA_PORT": str(port), "TRAINWATCH_KAFKA_CONTROLLER_PORT": str(port + 1),
                    "TRAINWATCH_KAFKA_OWNER": self.owner, "PYTHON": sys.executable}
        self.bootstrap = ",".join(f"127.0.0.1:{port + 2 * i}" for i in range(3))
        self.started: dict[str, Any] = {}
        self._starter = threading.Thread()

    def sh(self, cmd: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(KAFKA_SH), cmd, *args], env=self.env, capture_output=True, text=True,
                              timeout=300)

    def start(self) -> float:
        t0 = time.monotonic()
        res = self.sh("start", "--brokers", "3")
        if res.returncode != 0:
            raise SystemExit(f"cluster did not start: {res.stderr[-2000:]}")
        return time.monotonic() - t0

    def start_in_background(self) -> None:
        """Start the cluster while the first scenario simulates and replays (JVM start and replay overlap)."""

        def run() -> None:
            try:
                self.started["s"] = self.start()
            except SystemExit as exc:
                self.started["error"] = exc

        self._starter = threading.Thread(target=run, daemon=True)
        self._starter.start()

    def wait_started(self) -> float:
        """Seconds the start took (raises what start raised)."""
        self._starter.join()
        if "error" in self.started:
            raise self.started["error"]
        return self.started["s"]

    def pid(self, node: int) -> int:
        return int((self.home / f"cluster-{self.port}" / f"node-{node}" / "kafka.pid").read_text())

    def stop(self) -> None:
        self.sh("stop")


# --- Kafka reading -----------------------------------------------------------------------------------------------
def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                     "log_level": 0})


def committed(c: Consumer, topics: list[str]) -> int:
    """Sum of the committed offsets of the consumer's group over every partition of `topics` (-1 on error)."""
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        return sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=5))
    except Exception:  # a broker down for a moment: unknown, not zero
        return -1


def ends(c: Consumer, topics: list[str]) -> int:
    try:
        return sum(c.get_watermark_offsets(TopicPartition(t, p), timeout=5)[1] for t in topics
                   for p in range(PARTITIONS))
    except Exception:  # as above
        return -1


def _log_end(c: Consumer, topic: str, p: int, tries: int = 10) -> int:
    """A partition's log end. Retried: after a broker kill the client may ask a node that is no longer the leader
    (NOT_LEADER_FOR_PARTITION; seen once, Dec 7, ending a quick run with a traceback before its results)."""
    for i in range(tries):
        try:
            return int(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
        except KafkaException:
            if i == tries - 1:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def read_all(bootstrap: str, topic: str, parse: bool | str = True) -> list[Any]:
    """Every message of `topic` (parsed JSON; "pos": with its partition `_p` and offset `_o`; with parse=False the
    dead letters' reason headers)."""
    c = _consumer(bootstrap, f"chaos-read-{uuid.uuid4().hex}")
    try:
        want = {p: _log_end(c, topic, p) for p in range(PARTITIONS)}
        want = {p: hi for p, hi in want.items() if hi > 0}
        c.assign([TopicPartition(topic, p, 0) for p in want])
        out: list[dict] = []
        deadline = time.monotonic() + 120
        while want and time.monotonic() < deadline:
            for m in c.consume(1000, 1.0):
                if m.error() is None:
                    out.append({**orjson.loads(m.value()), "_p": m.partition(), "_o": m.offset()} if parse == "pos" else
                               orjson.loads(m.value()) if parse else
                               dict(m.headers() or []).get("dlq.reason", b"?").decode(errors="replace"))
                    if m.offset() + 1 >= want.get(m.partition(), 0):
                        want.pop(m.partition(), None)
        return out
    finally:
        c.close()


# --- the worker ---------------------------------------------------------------------------------------------------
_WORKERS: list[Worker] = []  # killed on the way out, whatever ends the run


#: the supervisor's restart delay after a worker's own exit within SUPERVISOR_RESET_S of its start: first, doubling,
#: capped (Worker.supervise)
SUPERVISOR_FIRST_S, SUPERVISOR_MAX_S, SUPERVISOR_RESET_S = 0.5, 8.0, 30.0


class Worker:
    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.cmd, self.env, self.log_path = cmd, env, log_path
        _WORKERS.append(self)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.own_exits: list[dict[str, Any]] = []
        self._started_at = 0.0
        self._restart_at: float | None = None  # an own exit waits for this moment (supervise)
        self._backoff = SUPERVISOR_FIRST_S

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} at {time.time():.1f}\n".encode())
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.starts += 1
        self._started_at, self._restart_at = time.monotonic(), None

    def kill9(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def supervise(self) -> None:
        """Restart a worker that exited on its own, noting how it ended, as a supervisor would (systemd's
        RestartSec, Kubernetes' crash-loop back-off): at once after a run of SUPERVISOR_RESET_S or more, otherwise
        after a delay that doubles with each quick exit (SUPERVISOR_FIRST_S .. SUPERVISOR_MAX_S), so a worker
        that cannot start is not restarted many times a second."""
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if self._restart_at is None:
            tail = self.log_path.read_text(errors="replace")[-600:]
            wait = 0.0
            if now - self._started_at < SUPERVISOR_RESET_S:  # a quick exit: wait, and longer after the next
                wait, self._backoff = self._backoff, min(SUPERVISOR_MAX_S, self._backoff * 2)
            else:
                self._backoff = SUPERVISOR_FIRST_S
            self.own_exits.append({"rc": self.proc.returncode, "restart_after_s": wait,
                                   "log_tail": tail.splitlines()[-4:]})
            self._restart_at = now + wait
        if now >= self._restart_at:
            self.start()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None


def _produce_paced(bootstrap: str, topics: dict[str, str], folder: Path, seconds: float, done: threading.Event,
                   counts: dict[str, int], faults_done: threading.Event) -> None:
    from pipeline.sources import read_folder

    recs = list(read_folder(folder))
    rate = len(recs) / seconds
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 20,
                  "compression.type": "lz4", "log_level": 0})
    t0 = time.monotonic()
    last_ts = float("-inf")
    for i, rec in enumerate(recs):
        key = None
        if rec.value.startswith(b"{"):
            try:
                d = orjson.loads(rec.value)
                key = str(d.get("node") if rec.stream == "telemetry" else d.get("account_id", "")).encode()
                if rec.stream == "telemetry" and isinstance(d.get("ts"), int | float):
                    last_ts = max(last_ts, d["ts"])
            except orjson.JSONDecodeError:
                key = None
        while True:
            try:
                p.produce(topics[rec.stream], rec.value, key)
                break
            except BufferError:
                p.poll(0.1)
        if i % 500 == 0:
            p.poll(0)
            ahead = i / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    # The stream goes on past its last sample L, as a live one would (the replay instead flushes at the end of its
    # file), in three rounds of ticks at L + 200, 450 and 700 s (each within ingest.max_clock_skew_s, 300 s, of the
    # round before, so none is lettered clock_ahead). Each telemetry partition carries a tick node per detect
    # partition, of a workload keyed to that partition (TICK_WORKLOADS): every detect partition hears every
    # telemetry partition reach past L + 450, so its stage settles every real window (slowest partition - settle_s,
    # two windows) and its owners mark passes every real contribution (less OWNER_SKEW_S) in a batch, not at
    # detect's idle flush (detect.owner_idle_s, 120 s), which the drain would otherwise have to wait out. The ticks'
    # workloads have no account (detect counts them unattributed) and idle GPUs (0 FLOP): no case, no compute.
    # While faults are still due (a fault waits for the one before to recover, so on a loaded machine the last ones
    # can come after the folder is produced), a round every TICK_EVERY_S, 100 s on: a worker killed then still has
    # something to consume, and its recovery can be seen.
    def round_at(ahead: float) -> None:
        for part in range(PARTITIONS):
            for d, wid in enumerate(TICK_WORKLOADS):
                node = f"chaos-tick-{part}-{d}"
                tick = {"ts": last_ts + ahead, "node": node, "device": node, "workload_id": wid, "accelerator": "tick",
                        "gpu_util": 0.0}
                p.produce(topics["telemetry"], orjson.dumps(tick), node.encode(), partition=part)
        p.poll(0)

    rounds = [200.0, 450.0, 700.0] if last_ts > float("-inf") else []
    for ahead in rounds:
        round_at(ahead)
    while rounds and not faults_done.wait(TICK_EVERY_S):
        rounds.append(rounds[-1] + 100.0)
        round_at(rounds[-1])
    counts["tick_rounds"] = len(rounds)
    counts["undelivered"] = p.flush(120)
    counts["produced"] = len(recs)
    done.set()


def _store_summary(dsn: str, db: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STORE_SCRIPT, dsn, db], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"store read failed: {out.stderr[-2000:]}")
    return orjson.loads(out.stdout.strip().splitlines()[-1])


def _compare(ref: dict, got: dict, feed: list[dict]) -> dict:
    from schemas.case import REPORTABLE_STATUSES

    rep_ids = {c["case_id"]: c for c in ref["cases"]}
    got_ids = {c["case_id"]: c for c in got["cases"]}

    def subj(c: dict) -> tuple:
        return (c["policy"], c["reason"], c["subject"])

    reportable = set(REPORTABLE_STATUSES)
    ref_rep = {subj(c) for c in ref["cases"] if c["status"] in reportable}
    got_rep: dict[tuple, list[str]] = {}
    for c in got["cases"]:
        if c["status"] in reportable:
            got_rep.setdefault(subj(c), []).append(c["case_id"])
    ref_rep_count: dict[tuple, int] = {}
    for c in ref["cases"]:
        if c["status"] in reportable:
            ref_rep_count[subj(c)] = ref_rep_count.get(subj(c), 0) + 1
    moved = []
    for cid in rep_ids.keys() & got_ids.keys():
        a, b = rep_ids[cid]["knowledge_at"], got_ids[cid]["knowledge_at"]
        if (a is None) != (b is None) or (a is not None and abs(a - b) > WINDOW_S):
            moved.append({"case_id": cid, "subject": rep_ids[cid]["subject"], "replay": a, "kafka": b})
    status_changed = [{"case_id": cid, "subject": rep_ids[cid]["subject"], "replay": rep_ids[cid]["status"],
                       "kafka": got_ids[cid]["status"]}
                      for cid in rep_ids.keys() & got_ids.keys() if rep_ids[cid]["status"] != got_ids[cid]["status"]]
    # compute totals per account: all windows, and only up to the last window the Kafka path closed for the account
    # (the replay flushes its open windows at the end of the file; a stream never ends, so Kafka keeps them open)
    def totals(rows: list, upto: dict[str, float] | None = None) -> dict[str, float]:
        t: dict[str, float] = {}
        for a, ws, f in rows:
            if upto is None or ws <= upto.get(a, float("-inf")):
                t[a] = t.get(a, 0.0) + f
        return t

    last = {}
    for a, ws, _ in got["windows"]:
        last[a] = max(last.get(a, float("-inf")), ws)
    ref_all, got_all = totals(ref["windows"]), totals(got["windows"])
    ref_upto = totals(ref["windows"], last)

    def rel(a: float, b: float) -> float:
        return (b - a) / a if a else (0.0 if not b else float("inf"))

    acct = sorted(ref_all.keys() | got_all.keys())
    per_acct = {a: {"replay": ref_all.get(a, 0.0), "kafka": got_all.get(a, 0.0),
                    "rel": rel(ref_all.get(a, 0.0), got_all.get(a, 0.0)),
                    "rel_upto_kafka_last_window": rel(ref_upto.get(a, 0.0), got_all.get(a, 0.0)),
                    "raw_over_final": rel(got_all.get(a, 0.0), got["raw_flop"].get(a, 0.0))} for a in acct}
    feed_ids = [m.get("message_id") for m in feed]
    return {
        "cases_replay": len(ref["cases"]), "cases_kafka": len(got["cases"]),
        "lost_case_ids": sorted(rep_ids.keys() - got_ids.keys()),
        "extra_case_ids": sorted(got_ids.keys() - rep_ids.keys()),
        "lost_reportable": sorted(map(list, ref_rep - got_rep.keys())),
        "extra_reportable": sorted(map(list, got_rep.keys() - ref_rep)),
        # more reportable cases for one (policy, reason, subject) than the replay has: a second run id, a split
        "duplicate_reportable": sorted([list(k), v] for k, v in got_rep.items() if len(v) > ref_rep_count.get(k, 1)),
        "knowledge_at_moved": moved,
        "status_changed": status_changed,
        "case_events_raw": got["events_raw"], "case_events_final": got["events_final"],
        "duplicate_case_events": got["events_raw"] - got["events_unique"],
        "feed_messages": len(feed_ids), "duplicate_feed_messages": len(feed_ids) - len(set(feed_ids)),
        "compute_max_abs_rel": max((abs(v["rel"]) for v in per_acct.values()), default=0.0),
        "compute_max_abs_rel_upto_last_window": max((abs(v["rel_upto_kafka_last_window"])
                                                     for v in per_acct.values()), default=0.0),
        "compute_raw_over_final_max": max((v["raw_over_final"] for v in per_acct.values()), default=0.0),
        "compute_per_account": per_acct,
    }


def _runs(offsets: list[int]) -> list[list[int]]:
    """Sorted offsets as [first, last] runs of consecutive ones."""
    out: list[list[int]] = []
    for o in sorted(offsets):
        if out and o == out[-1][1] + 1:
            out[-1][1] = o
        else:
            out.append([o, o])
    return out


def partial_accounting(reference: list, topic: list, stored: list) -> dict:
    """Where window partials went missing: the partitioned replay's partials absent from (or with other figures on)
    the windows topic are ingest's doing; the topic's absent from the Kafka store are detect's (with the topic
    partition and offset runs they sit at). A partial is (workload, telemetry partition, window start) at its
    highest revision (window ids differ between runs: they carry the topic's name)."""

    def final(rows: list) -> dict[tuple, list]:
        out: dict[tuple, list] = {}
        for r in rows:
            key = (r[1], r[2], r[4])
            if key not in out or r[3] > out[key][3]:
                out[key] = r
        return out

    ref, top, sto = final(reference), final(topic), final(stored)
    differs = [k for k in ref.keys() & top.keys() if abs(ref[k][6] - top[k][6]) > 1e-9 * max(1.0, abs(ref[k][6]))]
    stored_ids = {(r[0], r[3]) for r in stored}
    unstored = [m for m in topic if (m[0], m[3]) not in stored_ids]
    at: dict[int, list[int]] = {}
    for m in unstored:
        at.setdefault(m[7], []).append(m[8])
    return {"reference": len(ref), "topic": len(top), "stored": len(sto),
            "absent_from_topic": len(ref.keys() - top.keys()), "flop_differs_on_topic": len(differs),
            "on_topic_not_stored": len(unstored),
            "not_stored_at": {str(p): _runs(o)[:20] for p, o in sorted(at.items())}}


def _restart_brokers(cluster: Cluster, out: list[subprocess.CompletedProcess], after_s: float) -> None:
    time.sleep(after_s)
    out.append(cluster.sh("start", "--brokers", "3"))  # starts only the node that is down


def run_scenario(plan: Plan, cluster: Cluster, rng: random.Random, tmp: Path, static: bool = True,
                 keep: Path | None = None) -> dict:
    from pipeline.simulator import simulate

    t_begin = time.monotonic()
    folder = simulate(plan.scenario, tmp / plan.scenario, seed=0)
    tag = uuid.uuid4().hex[:8]
    topics = {r: f"chaos-{plan.scenario}-{tag}-{r}" for r in ROLES}
    app_id, group = f"chaos-{plan.scenario}-{tag}", f"chaos-{plan.scenario}-{tag}-ingest"
    base_env = {**os.environ, "TRAINWATCH_POLICY": "demo", "TRAINWATCH_DATA_DIR": str(tmp / f"{plan.scenario}-var")}
    base_env.pop("TRAINWATCH_CONFIG", None)
    # the reference: a clean in-process replay into its own store
    ref_dsn, ref_db = f"chdb://{tmp / f'{plan.scenario}-ref'}", f"ref_{tag}"
    part_dsn, part_db = f"chdb://{tmp / f'{plan.scenario}-ref-partitioned'}", f"refp_{tag}"
    t0 = time.monotonic()
    partitioned = subprocess.Popen([sys.executable, "-c", PARTITIONED_SCRIPT, str(folder), part_dsn, part_db, "demo",
                                    str(PARTITIONS)], env=base_env, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
    res = subprocess.run([sys.executable, "-m", "pipeline", "replay", str(folder), "--policy", "demo", "--store",
                          ref_dsn, "--database", ref_db, "--json"], env=base_env, cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"replay failed: {res.stderr[-2000:]}")
    _, err = partitioned.communicate(timeout=900)
    if partitioned.returncode != 0:
        raise SystemExit(f"partitioned replay failed: {err[-2000:]}")
    replay_s = time.monotonic() - t0
    ref = _store_summary(ref_dsn, ref_db)
    ref_part = _store_summary(part_dsn, part_db)

    dsn, db = f"chdb://{tmp / f'{plan.scenario}-worker'}", f"chaos_{tag}"
    env = {**base_env, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": cluster.bootstrap, "TRAINWATCH_CLICKHOUSE_DSN": dsn,
           "TRAINWATCH_DATABASE": db, **({"TRAINWATCH_KAFKA__GROUP_INSTANCE_ID": f"chaos-{tag}"} if static else {}),
           "TRAINWATCH_TOPIC_CONFIG__PARTITIONS": str(PARTITIONS), "TRAINWATCH_TOPIC_CONFIG__REPLICATION_FACTOR": "3",
           "TRAINWATCH_TOPIC_CONFIG__MIN_INSYNC_REPLICAS": "2",
           **{f"TRAINWATCH_TOPICS__{r.upper()}": t for r, t in topics.items()}}
    cluster.wait_started()
    res = subprocess.run([sys.executable, "-m", "pipeline", "topics", "create", "--app-id", app_id], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise SystemExit(f"topics create failed: {res.stderr[-2000:]}")
    # Same-run baseline for the recovery times: how long a bare Python takes just to import what the worker runs
    # (on a loaded machine most of a restart is this).
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import pipeline.cli, pipeline.detect.faust_app, pipeline.ingest.kafka_stage,"
                    " pipeline.store"], cwd=REPO, check=True, timeout=300)
    import_s = round(time.monotonic() - t0, 2)
    load = os.getloadavg()[0]
    down = tmp / f"{plan.scenario}-store-down"
    worker = Worker([sys.executable, "-m", "pipeline", "run", "--stage", "all", "--app-id", app_id,
                     "--ingest-group", group, "--fault-store-down-file", str(down)], env,
                    tmp / f"{plan.scenario}-worker.log")
    watch = _consumer(cluster.bootstrap, group)
    dwatch = _consumer(cluster.bootstrap, app_id)
    detect_in = [topics["windows"], topics["cip"], topics["allocations"], f"{app_id}-owners-repartition"]
    detect_own = detect_in[:3]  # the detect agent's inputs: the owners agent (same group) commits on its own topic

    def progress() -> tuple[int, int]:
        # ingest: windows written (only the ingest stage writes them). Its committed offset is no signal: it stays
        # below the oldest open window, which a quiet workload can hold for long. detect: the detect agent's commits.
        return ends(watch, [topics["windows"]]), committed(dwatch, detect_own)

    produced = threading.Event()
    counts: dict[str, int] = {}
    faults_done = threading.Event()
    producer = threading.Thread(target=_produce_paced, args=(cluster.bootstrap, topics, folder, plan.stream_s,
                                                             produced, counts, faults_done), daemon=True)
    t_start = time.monotonic()
    worker.start()
    producer.start()
    kinds = ["kill"] * plan.kills + (["broker"] if plan.broker_kill else [])
    kinds += ["store"] * plan.store_outages if plan.store_outage_s else []
    rng.shuffle(kinds)
    faults: list[Fault] = []

    def wait_resumed(before: tuple[int, int], t_from: float, cap_s: float = RESUME_CAP_S) -> dict[str, float | None]:
        """Seconds from t_from until ingest and detect each committed past `before` (None: not within cap)."""
        out: dict[str, float | None] = {"ingest": None, "detect": None}
        while time.monotonic() - t_from < cap_s and (out["ingest"] is None or out["detect"] is None):
            worker.supervise()
            now = progress()
            for i, k in enumerate(("ingest", "detect")):
                if out[k] is None and now[i] > before[i] >= 0:
                    out[k] = round(time.monotonic() - t_from, 2)
            time.sleep(0.25)
        return out

    first = wait_resumed((0, 0), t_start, 180.0)  # the first start: topics assigned, first commits
    # Fault moments: seeded, random, while the stream still flows (a worker with nothing to read commits nothing,
    # so its recovery could not be seen); a fault due while the previous one is still recovering waits for it.
    t_first = time.monotonic() - t_start
    window = max(plan.stream_s - t_first - 15.0, 1.0)
    moments = sorted(t_first + rng.uniform(0, window) for _ in kinds)
    for kind, due in zip(kinds, moments, strict=True):
        while time.monotonic() - t_start < due:
            worker.supervise()
            time.sleep(0.25)
        f = Fault(kind, round(time.monotonic() - t_start, 1))
        before = progress()
        t_f = time.monotonic()
        if kind == "kill":
            e_kill = time.time()
            worker.kill9()
            # read after the kill: a write or commit the dying worker had in flight is not a recovery
            before = progress()
            worker.start()
            f.recovery = wait_resumed(before, t_f)
            f.phases = phases_since(worker.log_path, e_kill)
            f.recovery["detect_first_take"] = f.phases.get("first-batch", [None])[0]
        elif kind == "broker":
            node = rng.choice((1, 2, 3))
            with contextlib.suppress(ProcessLookupError):
                os.kill(cluster.pid(node), signal.SIGKILL)
            f.note = f"node {node} down 20 s, then restarted by kafka.sh"
            restarted: list[subprocess.CompletedProcess] = []
            # the worker is watched (and supervised) while the broker is down, not only after it is back
            th = threading.Thread(target=_restart_brokers, args=(cluster, restarted, 20.0))
            th.start()
            f.recovery = wait_resumed(before, t_f)
            th.join(300)
            r = restarted[0] if restarted else None
            f.note += "" if r is not None and r.returncode == 0 else f" (restart failed: {r and r.stderr[-300:]})"
        else:
            down.touch()
            end = time.monotonic() + plan.store_outage_s
            exits_before = len(worker.own_exits)
            while time.monotonic() < end:
                worker.supervise()
                time.sleep(0.25)
            down.unlink()
            f.note = (f"store failed every call for {plan.store_outage_s:.0f} s; worker exits meanwhile: "
                      f"{len(worker.own_exits) - exits_before}")
            if plan.kill_after_store_s is not None:
                time.sleep(rng.uniform(0, plan.kill_after_store_s))
                worker.kill9()
                worker.start()
                f.note += f"; killed {time.monotonic() - end:.1f} s after it ended"
            f.recovery = wait_resumed(progress(), time.monotonic())
        faults.append(f)
        print(f"[chaos] {plan.scenario} {f.kind} at {f.at_s}s -> resumed {f.recovery} {f.note}", file=sys.stderr)

    # drain: the whole folder produced, then detect caught up and nothing new for a while
    faults_done.set()
    while not produced.is_set():
        worker.supervise()
        time.sleep(0.5)
    # Done when detect's lag is 0 (its agents: detect, owners, cases) and nothing moved for STILL_S. The ticks after
    # the last sample (_produce_paced) settle every real window and pass every owner contribution in batches, so
    # nothing waits for detect's idle flush (detect.owner_idle_s without input): waiting that out as a stillness made
    # the quick run 580 s (its outputs restarted the wait). With lag left, nothing moving for STALLED_S is done too:
    # the lag is recorded, and a worker that truly stopped short shows as lost cases and totals in the comparison.
    # The cap grows by the worker's idle waits (owner_idle_s + source_quiet_s), so a slow but progressing drain is
    # not cut off by them.
    idle_s, quiet_s = orjson.loads(subprocess.run(
        [sys.executable, "-c", "import orjson; from pipeline.settings import load_settings; d = load_settings().detect;"
         " print(orjson.dumps([d.owner_idle_s, d.source_quiet_s]).decode())"], env=env, cwd=REPO, check=True,
        capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1])
    cap_s = DRAIN_CAP_S + idle_s + quiet_s
    drain_in = [*detect_in, topics["detections"]]  # + the cases agent's input (same group)
    t_drain = quiet_since = time.monotonic()
    last = None
    d_lag = 0
    while time.monotonic() - t_drain < cap_s:
        worker.supervise()
        d_lag = ends(dwatch, drain_in) - committed(dwatch, drain_in)
        state = (ends(dwatch, [topics["windows"], topics["cases"], *drain_in[3:]]), committed(dwatch, drain_in),
                 worker.starts)
        if state != last:
            last, quiet_since = state, time.monotonic()
        elif time.monotonic() - quiet_since >= (STILL_S if d_lag == 0 else STALLED_S):
            break
        time.sleep(1.0)
    drained_s = time.monotonic() - t_drain
    rc = worker.stop()
    watch.close()
    dwatch.close()
    got = _store_summary(dsn, db)
    feed = read_all(cluster.bootstrap, topics["cases"])
    reasons: dict[str, int] = {}
    for r in read_all(cluster.bootstrap, topics["dlq"], parse=False):
        reasons[r] = reasons.get(r, 0) + 1
    cmp = _compare(ref, got, feed)
    # Split the difference: what telemetry partitioning alone makes (the partitioned replay vs the replay: the
    # bound ARCHITECTURE.md states), and what transport and faults add (Kafka vs the partitioned replay: zero).
    keys = ("lost_case_ids", "extra_case_ids", "lost_reportable", "extra_reportable", "knowledge_at_moved",
            "status_changed", "compute_max_abs_rel", "compute_max_abs_rel_upto_last_window")
    part_cmp = _compare(ref, ref_part, [])
    cmp["partitioning_effect"] = {k: part_cmp[k] for k in keys}
    vs_part = _compare(ref_part, got, feed)
    cmp["vs_partitioned_replay"] = {k: vs_part[k] for k in keys}
    # the windows topic as ingest wrote it (partition, offset, the partial's identity): a partial missing from the
    # store is then either never produced (ingest) or produced and not stored (detect)
    topic_rows = [[m["window_id"], m["workload_id"], m["partition"], m["revision"], m["window_start"],
                   m["sample_count"], m["flop"], m["_p"], m["_o"]]
                  for m in read_all(cluster.bootstrap, topics["windows"], parse="pos")]
    cmp["partials"] = partial_accounting(ref_part["partials"], topic_rows, got["partials"])
    if keep is not None:  # what the comparison saw, for finding why a difference happens
        keep.mkdir(parents=True, exist_ok=True)
        for name, data in (("replay", ref), ("replay-partitioned", ref_part), ("kafka", got), ("feed", feed)):
            (keep / f"{plan.scenario}-{name}.json").write_bytes(orjson.dumps(data))
        (keep / f"{plan.scenario}-worker.log").write_bytes((tmp / f"{plan.scenario}-worker.log").read_bytes())
        (keep / f"{plan.scenario}-windows-topic.json").write_bytes(orjson.dumps(topic_rows))
    # offsets faust saw missing on an input partition (pipeline/detect/fetch_guard.py logs each: none are real on
    # these topics, and one counted as acknowledged would commit past unread input), and the seeks back the agents'
    # ledger made when a message came past unread input (pipeline/detect/input_ledger.py)
    from pipeline.detect.fetch_guard import DROP_WARNING, GAP_WARNING
    from pipeline.detect.input_ledger import REREAD_WARNING, REWIND_WARNING, STALL_WARNING
    worker_log = (tmp / f"{plan.scenario}-worker.log").read_text(errors="replace")
    gaps, rewinds = worker_log.count(GAP_WARNING), worker_log.count(REWIND_WARNING)
    # how long each seek back kept its partition from taking input (until the offset sought back was taken)
    reread_s = [float(x) for x in re.findall(re.escape(REREAD_WARNING) + r" \d+ on \S+, ([0-9.]+) s after", worker_log)]
    kills = [f.recovery for f in faults if f.kind == "kill"]
    rec = {k: [r.get(k) for r in kills] for k in ("ingest", "detect", "detect_first_take")}
    return {
        "scenario": plan.scenario, "messages": counts.get("produced"), "undelivered": counts.get("undelivered"),
        "tick_rounds": counts.get("tick_rounds"),
        "stream_s": plan.stream_s, "store_outage_s": plan.store_outage_s,
        "replay_s": round(replay_s, 1), "drain_s": round(drained_s, 1),
        "drain_lag_left": d_lag, "drain_cap_s": cap_s, "detect_owner_idle_s": idle_s, "detect_source_quiet_s": quiet_s,
        "wall_s": round(time.monotonic() - t_begin, 1), "worker_starts": worker.starts,
        "worker_own_exits": worker.own_exits, "final_stop_rc": rc,
        "worker_import_s": import_s, "load_average_1m": round(load, 1), "first_start_s": first,
        "faults": [f.__dict__ for f in faults], "dead_letters_by_reason": reasons, "faust_offset_gaps": gaps,
        "input_rewinds": rewinds, "input_reread_s": {"n": len(reread_s), "max": max(reread_s, default=None)},
        # partitions behind their log end of which nothing was fetched for 30 s (logged once a minute each)
        "input_stalls": worker_log.count(STALL_WARNING),
        # partitions of a fetch faust took and did not deliver, sought back at once (fetch_guard.redeliver_dropped)
        "input_redelivered": worker_log.count(DROP_WARNING),
        "recovery_after_kill_s": {k: {"values": v, "max": max((x for x in v if x is not None), default=None),
                                      "median": statistics.median([x for x in v if x is not None]) if any(
                                          x is not None for x in v) else None,
                                      "not_resumed": sum(1 for x in v if x is None)} for k, v in rec.items()},
        **cmp,
    }


def _split(c: dict | None, compute: bool) -> str:
    if not c:
        return "-"
    out = (f"{len(c['lost_reportable'])} / {len(c['extra_reportable'])} ({len(c['extra_case_ids'])} ids) / "
           f"{len(c['knowledge_at_moved'])}")
    return out + (f" / {c['compute_max_abs_rel']:.2g}" if compute else "")


def _first_take(r: dict) -> str:
    """Seconds from a kill until the restarted detect agent took its first input (older results: not measured)."""
    t = r.get("detect_first_take")
    return "-" if not t or t["max"] is None else f"{t['max']} / {t['median']:.1f} ({t['not_resumed']} never)"


def phases_since(log: Path, t_kill: float) -> dict[str, list[float]]:
    """The last start's startup phases (pipeline/detect/startup.py): [seconds after the kill, process CPU s]."""
    from pipeline.detect.startup import phases

    text = log.read_text(errors="replace").rsplit("===== start", 1)[-1]
    return {k: [round(at - t_kill, 2), cpu] for k, (at, cpu) in sorted(phases(text).items(), key=lambda kv: kv[1])}


def _outages(n: int, seconds: float) -> str:
    """The table's store outage cell: how many, how long each (results before the key say 30 s: all were)."""
    return "-" if not n else f"{seconds:.0f} s" if n == 1 else f"{n} x {seconds:.0f} s"


def _table(result: dict) -> str:
    rows = ["| scenario | kills | broker kill | store outage | cases replay / kafka | lost | extra | knowledge moved "
            "| dup events | dup feed | compute max rel (to last window) | recovery after kill, max s (ingest / detect) "
            "| detect takes input again after a kill, max / median s | worker exits | import alone s (load) "
            "| vs partitioned replay: lost / extra / moved / compute "
            "| partitioning alone: lost / extra / moved |", "|---" * 17 + "|"]
    for s in result["scenarios"]:
        kinds = [f["kind"] for f in s["faults"]]
        r = s["recovery_after_kill_s"]
        rows.append(
            f"| {s['scenario']} | {kinds.count('kill')} | {kinds.count('broker')} | "
            f"{_outages(kinds.count('store'), s.get('store_outage_s', 30.0))} | "
            f"{s['cases_replay']} / {s['cases_kafka']} | "
            f"{len(s['lost_reportable'])} reportable ({len(s['lost_case_ids'])} ids) | "
            f"{len(s['extra_reportable'])} reportable ({len(s['extra_case_ids'])} ids) | "
            f"{len(s['knowledge_at_moved'])} | "
            f"{s['duplicate_case_events']} (raw {s['case_events_raw']} / FINAL {s['case_events_final']}) | "
            f"{s['duplicate_feed_messages']} | {s['compute_max_abs_rel']:.2g} "
            f"({s['compute_max_abs_rel_upto_last_window']:.2g}) | "
            f"{r['ingest']['max']} / {r['detect']['max']} ({r['ingest']['not_resumed']}+{r['detect']['not_resumed']} "
            f"not within {RESUME_CAP_S:.0f} s) | {_first_take(r)} | {len(s['worker_own_exits'])} | "
            f"{s.get('worker_import_s')} ({s.get('load_average_1m')}) | {_split(s.get('vs_partitioned_replay'), True)} "
            f"| {_split(s.get('partitioning_effect'), False)} |")
    return "\n".join(rows)


def _readme(result: dict) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = "<!-- chaos:start -->\n", "<!-- chaos:end -->"
    if start not in text or end not in text:
        return
    body = (f"Measured {result['measured_at']} ({result['machine']}), seed {result['seed']}, "
            f"wall {result['wall_s']:.0f} s; details in benchmarks/results/chaos.json.\n\n{_table(result)}\n")
    head, rest = text.split(start, 1)
    readme.write_text(head + start + body + rest[rest.index(end):])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="demo only, 3 kills, one broker kill, a 30 s store outage")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--port", type=int, default=39092, help="first broker port (nodes on port, +2, +4)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--clean", action="store_true", help="no faults: the same run as a baseline for the transport")
    ap.add_argument("--stream-s", type=float, default=None, help="override how long producing each folder takes")
    ap.add_argument("--only", choices=("kill", "broker", "store"), default=None,
                    help="keep only this kind of fault (which fault causes a difference)")
    ap.add_argument("--dynamic", action="store_true",
                    help="no group.instance.id (dynamic membership): the recovery baseline static membership beats")
    ap.add_argument("--scenario", choices=("demo", "scope"), default=None, help="run only this scenario")
    ap.add_argument("--store-outages", type=int, default=None, help="this many store outages instead of one")
    ap.add_argument("--kill-after-store", type=float, default=None, metavar="S",
                    help="also kill -9 the worker within S seconds after each store outage ends")
    ap.add_argument("--keep", type=Path, default=None,
                    help="folder to keep each scenario's replay and Kafka store summaries, feed and worker log in")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    if args.quick:
        plans = [Plan("demo", 3, True, 30.0, 150.0)]
    else:  # 20 worker kills in all, one broker kill, one store outage
        plans = [Plan("demo", 10, True, 0.0, 300.0), Plan("scope", 10, False, 30.0, 330.0)]
    if args.clean:
        plans = [dataclasses.replace(p, kills=0, broker_kill=False, store_outage_s=0.0) for p in plans]
    if args.only:
        plans = [dataclasses.replace(p, kills=p.kills if args.only == "kill" else 0,
                                     broker_kill=p.broker_kill and args.only == "broker",
                                     store_outage_s=p.store_outage_s if args.only == "store" else 0.0) for p in plans]
    if args.scenario:
        # the full run's plan for it; with --quick (demo only) the quick faults on that scenario
        plans = [p for p in plans if p.scenario == args.scenario] or [dataclasses.replace(plans[0],
                                                                                          scenario=args.scenario)]
    if args.stream_s:
        plans = [dataclasses.replace(p, stream_s=args.stream_s) for p in plans]
    if args.store_outages is not None:
        plans = [dataclasses.replace(p, store_outages=args.store_outages) for p in plans]
    if args.kill_after_store is not None:
        plans = [dataclasses.replace(p, kill_after_store_s=args.kill_after_store) for p in plans]
    t0 = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="tw-chaos-kafka-"))
    cluster = Cluster(args.port, home)
    cluster.start_in_background()
    result: dict[str, Any] = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "machine": f"{os.cpu_count()} CPUs", "seed": args.seed, "quick": args.quick,
                              "clean": args.clean, "only": args.only, "static_membership": not args.dynamic,
                              "store_outages": args.store_outages, "kill_after_store_s": args.kill_after_store,
                              "classifier": os.environ.get("TRAINWATCH_MODEL_PATH") or "packaged",
                              "cluster": {"brokers": 3, "replication_factor": 3, "min_insync_replicas": 2,
                                          "partitions": PARTITIONS},
                              "scenarios": []}
    # SIGTERM ends the run like Ctrl-C: the finally below kills the workers and stops the cluster.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with tempfile.TemporaryDirectory(prefix="tw-chaos-") as d:
            for plan in plans:
                result["scenarios"].append(run_scenario(plan, cluster, rng, Path(d), static=not args.dynamic,
                                                          keep=args.keep))
        # started while the first scenario replayed: its start overlapped the replays
        result["cluster"]["start_s"] = round(cluster.wait_started(), 1)
    finally:
        for w in _WORKERS:
            if w.proc is not None and w.proc.poll() is None:
                w.kill9()
        if cluster._starter.is_alive():  # a start under way would leave nodes that stop cannot find yet
            cluster._starter.join()
        cluster.stop()
        subprocess.run(["rm", "-rf", str(home)], check=False)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    name = "chaos" + ("-quick" if args.quick else "") + ("-clean" if args.clean else "")
    name += ("-dynamic" if args.dynamic else "") + (f"-only-{args.only}" if args.only else "")
    name += f"-{args.scenario}" if args.scenario else ""
    name += "-store-kill" if args.kill_after_store is not None or args.store_outages is not None else ""
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(_table(result))
    variant = args.only or args.scenario or args.store_outages is not None or args.kill_after_store is not None
    if not (args.quick or args.clean or args.dynamic or variant) and args.out is None:
        _readme(result)


if __name__ == "__main__":
    main()
