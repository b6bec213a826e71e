"""deploy/local/kafka.sh on its own ports and home (never the shared broker): auto-creation off, ownership (stop
stops only what this owner started; a broker found running is left alone), and the three-broker cluster keeping
acks=all writes going while one broker is killed -9 and restarted."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from pipeline import topics
from pipeline.settings import KafkaSettings, Settings, TopicConfigSettings, TopicSettings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO / "deploy" / "local" / "kafka.sh"
DEFAULT_HOME = Path(os.environ.get("TRAINWATCH_KAFKA_HOME", Path.home() / ".cache" / "trainwatch" / "kafka"))


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _ports(n: int) -> int:
    """A base port with n consecutive free ports (node i uses base+2(i-1) and base+1+2(i-1))."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 60_000, 2)
        if all(_free(base + i) for i in range(n)):
            return base
    pytest.skip("no free port range")


def _sh(cmd: str, home: Path, port: int, owner: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINWATCH_KAFKA_HOME": str(home), "TRAINWATCH_KAFKA_LIBS": str(DEFAULT_HOME / "libs"),
           "TRAINWATCH_KAFKA_PORT": str(port), "TRAINWATCH_KAFKA_CONTROLLER_PORT": str(port + 1),
           "TRAINWATCH_KAFKA_OWNER": owner}
    return subprocess.run(["bash", str(KAFKA_SH), cmd, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    st = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "Z"
    return st != "Z"


@pytest.fixture
def home(tmp_path: Path):
    if not (DEFAULT_HOME / "libs").is_dir():
        pytest.skip("no resolved Kafka jars (run deploy/local/kafka.sh start once)")
    h = tmp_path / "kafka-home"
    yield h
    for pidfile in h.rglob("kafka.pid"):  # whatever the test left running: ours, by pid
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_single_broker_no_autocreate_and_stop_only_what_you_started(home: Path, tmp_path: Path) -> None:
    port = _ports(2)
    res = _sh("start", home, port, "owner-a")
    assert res.returncode == 0, res.stderr
    props = (home / f"broker-{port}" / "server.properties").read_text()
    assert "auto.create.topics.enable=false" in props
    pid = int((home / f"broker-{port}" / "kafka.pid").read_text())
    bootstrap = f"127.0.0.1:{port}"

    # A produce to a topic nobody created fails instead of creating it with the broker's defaults.
    errors: list[KafkaError] = []
    p = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 5000})
    name = f"nobody-made-{uuid.uuid4().hex[:8]}"
    p.produce(name, b"x", on_delivery=lambda err, _m: errors.append(err))
    p.flush(15)
    del p
    assert errors and errors[0] is not None
    assert name not in Consumer({"bootstrap.servers": bootstrap, "group.id": "x"}).list_topics(timeout=10).topics

    # Another owner (CI's trap): start uses the running broker, stop leaves it alone.
    res = _sh("start", home, port, "owner-b")
    assert res.returncode == 0 and "already running" in res.stderr, res.stderr
    res = _sh("stop", home, port, "owner-b")
    assert res.returncode == 0 and "leaving it running" in res.stderr and _alive(pid), res.stderr
    # Another home on the same port: the broker is someone else's; neither start nor stop touches it.
    other = tmp_path / "other-home"
    res = _sh("start", other, port, "owner-a")
    assert res.returncode == 0 and "did not start" in res.stderr, res.stderr
    assert not (other / f"broker-{port}" / "kafka.pid").exists()
    res = _sh("stop", other, port, "owner-a")
    assert res.returncode == 0 and _alive(pid), res.stderr
    # The owner that started it stops it.
    res = _sh("stop", home, port, "owner-a")
    assert res.returncode == 0 and "stopped 1 node" in res.stderr, res.stderr
    assert not _alive(pid) and not _listening(port)


def test_three_brokers_keep_acks_all_writes_through_a_broker_kill(home: Path) -> None:
    base = _ports(6)
    res = _sh("start", home, base, "owner-a", "--brokers", "3")
    assert res.returncode == 0, res.stderr
    cluster = home / f"cluster-{base}"
    props = (cluster / "node-1" / "server.properties").read_text()
    assert "min.insync.replicas=2" in props and "default.replication.factor=3" in props
    assert "auto.create.topics.enable=false" in props
    bootstrap = ",".join(f"127.0.0.1:{base + 2 * i}" for i in range(3))
    name = f"cl-{uuid.uuid4().hex[:8]}"
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=bootstrap),
                        topics=TopicSettings(telemetry=name, windows=f"{name}-w", dlq=f"{name}-d"),
                        topic_config=TopicConfigSettings(replication_factor=3, min_insync_replicas=2, partitions=2))
    topics.create(settings)
    rep = topics.check(settings, "ingest")
    assert rep.problems == [] and rep.state[name].replication == 3

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5})
    failed: list[KafkaError] = []

    def send(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            p.produce(name, str(i).encode(), str(i % 7).encode(),
                      on_delivery=lambda err, _m: failed.append(err) if err else None)
            p.poll(0)

    send(0, 1000)
    assert p.flush(30) == 0
    victim = int((cluster / "node-2" / "kafka.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    send(1000, 2000)  # two of three replicas left = min ISR: acks=all writes still succeed
    assert p.flush(60) == 0 and failed == []
    res = _sh("start", home, base, "owner-a", "--brokers", "3")  # restarts just the dead node
    assert res.returncode == 0 and "started 1 node" in res.stderr, res.stderr
    assert _alive(int((cluster / "node-2" / "kafka.pid").read_text()))
    send(2000, 2500)
    assert p.flush(60) == 0 and failed == []

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"cl-{uuid.uuid4().hex}", "enable.auto.commit": False})
    c.assign([TopicPartition(name, part, 0) for part in range(2)])
    got: list[int] = []
    deadline = time.monotonic() + 60
    while len(got) < 2500 and time.monotonic() < deadline:
        got += [int(m.value()) for m in c.consume(500, 1.0) if m.error() is None]
    c.close()
    assert sorted(got) == list(range(2500))  # every write once: none lost, none duplicated by the retries
    res = _sh("stop", home, base, "owner-a")
    assert res.returncode == 0 and "stopped 3 node" in res.stderr, res.stderr
