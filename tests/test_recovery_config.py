"""Fast recovery (issue 12): the classifier loads in the background without changing a verdict or hiding a failure,
and the detect changelogs compact promptly, whoever creates them (`topics create` or faust itself)."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from pipeline import topics
from pipeline.classifier_loader import BackgroundClassifier, load_classifier
from pipeline.settings import KafkaSettings, Settings, TopicConfigSettings, TopicSettings
from schemas.errors import ArtifactError
from schemas.policy import load_policy

ROLES = ("telemetry", "windows", "cip", "allocations", "detections", "cases", "dlq")


def _history(n: int = 6) -> list[dict]:
    return [{"workload_id": "w", "account_id": "a", "window_start": 60.0 * i, "window_end": 60.0 * (i + 1),
             "device_count": 8, "features": {"mean_util": 95.0, "mean_power_w": 600.0, "mean_tensor": 0.6,
                                              "mem_used_frac": 0.9, "tdp_w": 700.0}} for i in range(n)]


def test_background_classifier_gives_the_eager_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = load_policy("demo")
    monkeypatch.delenv("TRAINWATCH_BACKGROUND_CLASSIFIER", raising=False)  # the default: in the background
    lazy = load_classifier(None, policy, background=True)
    assert isinstance(lazy, BackgroundClassifier)
    eager = load_classifier(None, policy)
    for n in (1, 3, 6):
        assert lazy.predict(_history(n)) == eager.predict(_history(n))  # predict waits for the load
    assert lazy.ready
    monkeypatch.setenv("TRAINWATCH_BACKGROUND_CLASSIFIER", "0")  # the benchmark's baseline: eager
    assert not isinstance(load_classifier(None, policy, background=True), BackgroundClassifier)


def test_background_load_failure_is_raised_never_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAINWATCH_BACKGROUND_CLASSIFIER", raising=False)
    policy = load_policy("demo")
    with pytest.raises(ArtifactError):  # a wrong path still fails at start
        load_classifier(tmp_path / "nowhere", policy, background=True)
    (tmp_path / "classifier.json").write_text("{not json")
    lazy = load_classifier(tmp_path, policy, background=True)
    with pytest.raises(ArtifactError, match="unreadable sidecar"):
        lazy.wait(60)
    with pytest.raises(ArtifactError):
        lazy.predict(_history())


def test_faust_declares_changelogs_with_the_compaction_configs(tmp_path: Path) -> None:
    from pipeline.detect.faust_app import make_app

    settings = Settings(data_dir=tmp_path)
    app, _rt = make_app(settings, app_id=f"rc-{uuid.uuid4().hex[:8]}", partitions=2,
                        classifier=load_classifier("rule", load_policy("demo")))
    for t in topics.TABLES:
        cfg = app.tables[t].changelog_topic.config
        assert {k: cfg.get(k) for k in topics.CHANGELOG_CONFIG} == topics.CHANGELOG_CONFIG, t


@pytest.mark.kafka
def test_topics_create_sets_changelog_compaction_on_the_broker(kafka_bootstrap: str) -> None:
    tag = uuid.uuid4().hex[:10]
    names = {r: f"rc-{r}-{tag}" for r in ROLES}
    app_id = f"rc-{tag}"
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), topics=TopicSettings(**names),
                        topic_config=TopicConfigSettings(partitions=2))
    made = topics.create(settings, app_id)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    try:
        logs = topics.changelog_topics(app_id)
        assert set(logs) <= set(made)
        res = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in (*logs, names["windows"])]
        cfg = {r.name: {k: v.value for k, v in f.result(30).items()} for r, f in admin.describe_configs(res).items()}
        for n in logs:
            assert cfg[n]["cleanup.policy"] == "compact", n
            assert {k: cfg[n][k] for k in topics.CHANGELOG_CONFIG} == topics.CHANGELOG_CONFIG, n
        assert cfg[names["windows"]]["segment.ms"] != "60000"  # only the changelogs roll this often
        assert all(st.partitions == 2 for n, st in topics._state(admin, 10).items() if n in logs)
        assert topics.check(settings, "all", app_id).problems == []
    finally:
        for fut in admin.delete_topics(made, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result(30)
