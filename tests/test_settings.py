"""Settings come from the environment (TRAINWATCH_, `__` nesting) over an optional TOML file."""

from __future__ import annotations

import pytest

from pipeline.settings import Settings, load_settings
from schemas.errors import TrainwatchError


def test_defaults(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("TRAINWATCH_"):
            monkeypatch.delenv(k)
    s = load_settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.topics.telemetry == "gpu.telemetry" and s.topics.dlq == "telemetry.dlq"
    assert s.clickhouse_dsn == "chdb:./var/trainwatch.chdb"  # the form clickhouse-connect reads the same way
    assert s.window_s == 60 and s.policy == "bis-2024-proposed"


def test_env_with_nesting_overrides_file(tmp_path, monkeypatch):
    cfg = tmp_path / "trainwatch.toml"
    cfg.write_text(
        'window_s = 30\npolicy = "demo"\n[kafka]\nbootstrap_servers = "file:9092"\nsasl_mechanism = "PLAIN"\n'
        '[kafka.extra]\n"linger.ms" = "5"\n[topics]\ntelemetry = "t.file"\n'
    )
    monkeypatch.setenv("TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("TRAINWATCH_KAFKA__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("TRAINWATCH_WINDOW_S", "45")
    s = load_settings(cfg)
    assert s.window_s == 45  # env beats file
    assert s.policy == "demo"  # file beats default
    assert s.topics.telemetry == "t.file"
    conf = s.kafka.client_config(**{"group.id": "g"})
    assert conf["bootstrap.servers"] == "env:9092"
    assert conf["sasl.mechanism"] == "PLAIN" and conf["sasl.password"] == "s3cret"
    assert conf["linger.ms"] == "5" and conf["group.id"] == "g"
    assert "s3cret" not in repr(s)  # secrets are not printed


def test_config_file_from_env_var(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('database = "from_file"\n')
    monkeypatch.setenv("TRAINWATCH_CONFIG", str(cfg))
    assert load_settings().database == "from_file"


def test_bad_values_fail_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINWATCH_WINDOW_S", "-5")
    with pytest.raises(ValueError, match="window_s"):
        Settings()
    with pytest.raises(TrainwatchError, match="settings file not found"):
        load_settings(tmp_path / "missing.toml")


def test_detect_settings_reach_the_faust_app(monkeypatch):
    from pipeline.detect.faust_app import make_app

    monkeypatch.setenv("TRAINWATCH_DETECT__OWNER_IDLE_S", "45")
    monkeypatch.setenv("TRAINWATCH_DETECT__BATCH_WITHIN_S", "0.5")
    s = load_settings(model_path="rule")
    assert (s.detect.owner_idle_s, s.detect.batch_within_s) == (45.0, 0.5)
    _, rt = make_app(s, app_id="settings-test")
    assert rt.owners.idle_s == 45.0  # the owners' liveness uses the configured idle time, not the default
    monkeypatch.setenv("TRAINWATCH_DETECT__OWNER_IDLE_S", "0")
    with pytest.raises(ValueError, match="owner_idle_s"):
        load_settings()
