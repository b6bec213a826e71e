"""Topic provisioning on the real broker: `topics create|check` apply settings; `run` / `ingest run` refuse to start
on a missing topic or broken co-partitioning with one line (exit 2); no broker is one line, not librdkafka's log."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from pipeline import topics
from pipeline.settings import KafkaSettings, Settings, TopicConfigSettings, TopicSettings

REPO = Path(__file__).resolve().parent.parent
ROLES = ("telemetry", "windows", "cip", "allocations", "detections", "cases", "dlq")


def _names(prefix: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {r: f"{prefix}-{r}-{tag}" for r in ROLES}


def _env(bootstrap: str, names: dict[str, str], **extra: str) -> dict[str, str]:
    env = {**os.environ, "TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
           **{f"TRAINWATCH_TOPICS__{r.upper()}": t for r, t in names.items()}, **extra}
    env.pop("TRAINWATCH_CONFIG", None)
    return env


def _cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _delete(bootstrap: str, names: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.delete_topics(names, operation_timeout=30).values():
        with contextlib.suppress(Exception):
            fut.result(30)


@pytest.mark.kafka
def test_create_applies_settings_and_check_agrees(kafka_bootstrap: str) -> None:
    names = _names("tp")
    app_id = f"tp-{uuid.uuid4().hex[:8]}"
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), topics=TopicSettings(**names),
                        topic_config=TopicConfigSettings(partitions=3, telemetry_partitions=2,
                                                         max_message_bytes=4 << 20))
    made = topics.create(settings, app_id)
    all_names = [*names.values(), f"{app_id}-owners-repartition", *topics.changelog_topics(app_id)]
    try:
        assert sorted(made) == sorted(all_names)
        assert topics.create(settings, app_id) == []  # idempotent: nothing left to create
        rep = topics.check(settings, "all", app_id)
        assert rep.problems == [] and rep.partitions == 3
        assert rep.state[names["telemetry"]].partitions == 2 and rep.state[names["windows"]].partitions == 3
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        res = [ConfigResource(ConfigResource.Type.TOPIC, names[r]) for r in ("cip", "windows", "cases")]
        cfg = {r.name: {k: v.value for k, v in f.result(30).items()} for r, f in admin.describe_configs(res).items()}
        assert cfg[names["cip"]]["cleanup.policy"] == "compact"  # a table: latest record per account
        assert cfg[names["windows"]]["cleanup.policy"] == "delete"
        assert cfg[names["windows"]]["retention.ms"] == str(7 * 86_400_000)
        assert cfg[names["cases"]]["retention.ms"] == str(30 * 86_400_000)
        assert cfg[names["windows"]]["max.message.bytes"] == str(4 << 20)
        # A topic that drifts from settings is reported, not silently accepted.
        drift = settings.model_copy(update={"topic_config": TopicConfigSettings(partitions=5)})
        rep = topics.check(drift, "all", app_id)
        assert any(p.topic == names["windows"] and "settings say 5" in p.what and not p.fatal for p in rep.problems)
        assert rep.fatal == []
        # A changelog whose configs drifted (faust's defaults, an edit) is reported too: it would replay history.
        log = topics.changelog_topics(app_id)[0]
        entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                   for k, v in {"segment.ms": "604800000", "cleanup.policy": "delete"}.items()]
        admin.incremental_alter_configs([ConfigResource(ConfigResource.Type.TOPIC, log, incremental_configs=entries)]
                                        )[ConfigResource(ConfigResource.Type.TOPIC, log)].result(30)
        logs = {p.what for p in topics.check(settings, "detect", app_id).problems if p.topic == log}
        assert logs == {"segment.ms=604800000, settings say 60000", "cleanup.policy=delete, settings say compact"}
        assert all(p.topic != log for p in topics.check(settings, "ingest", app_id).problems)  # not ingest's topic
    finally:
        _delete(kafka_bootstrap, all_names)


@pytest.mark.kafka
def test_run_refuses_a_missing_topic_with_one_line(kafka_bootstrap: str, unique_topic) -> None:
    names = _names("tm")
    for r in ROLES:
        if r != "cip":
            names[r] = unique_topic(f"tm-{r}")
    for args in (("run", "--stage", "all"), ("run", "--stage", "detect")):
        res = _cli(*args, "--app-id", f"tm-{uuid.uuid4().hex[:8]}", env=_env(kafka_bootstrap, names))
        assert res.returncode == 2, res.stderr[-2000:]
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and names["cip"] in lines[0] and "missing" in lines[0], res.stderr[-2000:]
    # ingest does not need CIP: `ingest run` starts (and exits on its own); without the DLQ it refuses
    res = _cli("ingest", "run", "--max-seconds", "1", env=_env(kafka_bootstrap, names))
    assert res.returncode == 0, res.stderr[-2000:]
    names["dlq"] = f"tm-nodlq-{uuid.uuid4().hex[:8]}"
    res = _cli("ingest", "run", "--max-seconds", "1", env=_env(kafka_bootstrap, names))
    assert res.returncode == 2 and names["dlq"] in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.kafka
def test_run_refuses_broken_copartitioning_before_ingest_starts(kafka_bootstrap: str, unique_topic) -> None:
    names = {r: unique_topic(f"tc-{r}", partitions=2 if r == "allocations" else 1) for r in ROLES}
    res = _cli("run", "--stage", "all", "--app-id", f"tc-{uuid.uuid4().hex[:8]}", env=_env(kafka_bootstrap, names))
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip()
    assert "\n" not in line and "not co-partitioned" in line and names["allocations"] in line, line
    c = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert all(p.leader >= 0 for p in c[names["windows"]].partitions.values())
    from tests.test_faust_detect import read_topic

    assert read_topic(kafka_bootstrap, names["windows"]) == []  # ingest never started


@pytest.mark.kafka
def test_run_creates_the_apps_own_topic_with_the_inputs_count(kafka_bootstrap: str, unique_topic) -> None:
    names = {r: unique_topic(f"to-{r}", partitions=1 if r == "telemetry" else 2) for r in ROLES}
    app_id = f"to-{uuid.uuid4().hex[:8]}"
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), topics=TopicSettings(**names))
    try:
        assert topics.require(settings, "detect", app_id) == 2
        rep = topics.check(settings, "detect", app_id)
        assert rep.state[f"{app_id}-owners-repartition"].partitions == 2 and rep.fatal == []
    finally:
        _delete(kafka_bootstrap, [f"{app_id}-owners-repartition"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args", [("ingest", "status"), ("run", "--stage", "all"), ("ingest", "run"),
                                  ("topics", "check"), ("topics", "create")])
def test_no_broker_is_one_line_and_exit_2(args: tuple[str, ...]) -> None:
    env = _env(f"127.0.0.1:{_free_port()}", {})
    res = _cli(*args, env=env, timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Kafka broker reachable"), res.stderr[-3000:]
