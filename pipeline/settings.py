"""The one Settings object: environment (prefix TRAINWATCH_, `__` nesting) over an optional TOML file.

This is the only module that reads the environment, and only when `load_settings()` is called at an entry point.
"""

from __future__ import annotations

import logging
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from detectors.owner_aggregate import OWNER_IDLE_S
from schemas.errors import TrainwatchError

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("trainwatch_config_file", default=None)


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    #: Static group membership: a stable id per worker (e.g. its pod name). A worker restarted with the same id
    #: takes its partitions back at once instead of after the old member's session times out. Must be unique per
    #: running worker of a group (a duplicate is fenced). None: dynamic membership.
    group_instance_id: str | None = None
    #: A dead consumer's partitions move (or a static member is declared gone) after this many seconds.
    session_timeout_s: float = Field(default=10.0, ge=6, le=300)
    #: Any other librdkafka property, passed through as is (e.g. {"linger.ms": "20"}).
    extra: dict[str, str] = Field(default_factory=dict)

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        """The librdkafka dict for confluent-kafka clients: the one place it is built."""
        cfg: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers, "security.protocol": self.security_protocol}
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        cfg.update({k: v for k, v in optional.items() if v is not None})
        # librdkafka's own lines through Python logging (pipeline/log_setup.py: structured, rate-limited), not raw
        # stderr; served by the clients' poll/consume/flush.
        cfg["logger"] = logging.getLogger("librdkafka")
        cfg.update(self.extra)
        cfg.update(overrides)
        return cfg


class TopicSettings(BaseModel):
    telemetry: str = "gpu.telemetry"
    allocations: str = "compute.allocations"
    cip: str = "accounts.cip"
    windows: str = "workload.windows"
    detections: str = "detections"
    cases: str = "compliance.cases"
    dlq: str = "telemetry.dlq"


class TopicConfigSettings(BaseModel):
    """How `trainwatch topics create` provisions the topics (pipeline/topics.py); `run` only checks them."""

    #: Partitions of the account-keyed topics (windows, CIP, allocations, the app's owners topic and changelogs),
    #: which must be co-partitioned, and of the outputs.
    partitions: int = Field(default=1, ge=1, le=10_000)
    #: Partitions of the telemetry topic (keyed by node; independent of the others). None: `partitions`.
    telemetry_partitions: int | None = Field(default=None, ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1, le=16)
    #: min.insync.replicas of every topic (with acks=all producers: how many copies a write needs). None: broker's.
    min_insync_replicas: int | None = Field(default=None, ge=1, le=16)
    retention_ms: int = Field(default=7 * 86_400_000, ge=-1, description="streams (telemetry, windows, ...)")
    #: The compliance feed and the dead letters are kept longer: people work them.
    long_retention_ms: int = Field(default=30 * 86_400_000, ge=-1)
    #: Largest message a topic accepts (columnar telemetry batches are large).
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)


class IngestSettings(BaseModel):
    #: Decoder per topic: native | otlp_json | prometheus_json.
    decoder: str = "native"
    batch_size: int = Field(default=5000, ge=1)
    #: A batch is processed when full or after this wait: at low traffic it is the latency ingest adds.
    max_wait_s: float = Field(default=0.2, gt=0, le=10)
    watermark_lag_s: float = Field(default=30.0, ge=0, description="event time trails the newest seen by this much")
    allowed_lateness_s: float = Field(default=3600.0, ge=0, description="older data is dead-lettered as too late")
    #: A sample further ahead than this of its arrival (Kafka timestamp) or of the partition's confirmed event time
    #: is dead-lettered `clock_ahead` (a bad clock must not move the watermark).
    max_clock_skew_s: float = Field(default=300.0, gt=0)
    #: A telemetry message larger than this is dead-lettered `oversized` unread; letters keep this much of a value.
    max_message_bytes: int = Field(default=1_048_576, ge=1)
    dlq_max_value_bytes: int = Field(default=65_536, ge=1)
    #: Label names that map to ids, in order of preference.
    workload_labels: list[str] = Field(default_factory=lambda: ["workload_id", "pod", "hpc_job", "job"])
    account_labels: list[str] = Field(default_factory=lambda: ["account_id", "namespace"])
    #: Optional inventory file (JSON: {"nodes": {host: account}, "devices": {uuid: account}, "workloads": {...}}).
    inventory_path: Path | None = None
    #: Prometheus /metrics of the ingest stage on this port (None: off; 0: any free port) and address.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_addr: str = "127.0.0.1"


class DetectSettings(BaseModel):
    #: A faust take waits this long for a full batch; detect and cases are two takes in a row, so at low traffic a
    #: case's latency grows by up to twice this (at high traffic batches fill first).
    batch_within_s: float = Field(default=0.25, gt=0, le=10)
    #: Processing seconds without input after which a detect partition counts as caught up: its held CIP records /
    #: allocations are applied and it stops holding back the owners' event-time horizon (above the window period).
    owner_idle_s: float = Field(default=OWNER_IDLE_S, gt=0)
    #: Processing seconds without a window from a telemetry partition after which a detect partition stops waiting
    #: for it to settle windows (pipeline/detect/batch.py QuietSources). 45 s: over a worker's restart plus catch-up
    #: and a broker failover as measured in the chaos run (ingest back within 26 s of a broker kill, detect within
    #: 21 s of a kill -9), and over a 30 s store outage (the detect agent waits on the store, hearing nothing).
    source_quiet_s: float = Field(default=45.0, gt=0)
    #: Prometheus /metrics of the detect + cases worker (detections per detector, case events, event-time lag).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_addr: str = "127.0.0.1"


class ConsoleUser(BaseModel):
    role: Literal["analyst", "compliance"]
    password_hash: str = Field(description="argon2 hash (`trainwatch serve --hash-password`), never the password")


class ConsoleSettings(BaseModel):
    """`trainwatch serve` (pipeline/web, docs/console.md)."""

    host: str = Field(default="127.0.0.1", description="bind address; loopback unless deliberately opened")
    port: int = Field(default=8080, ge=0, le=65535)
    #: user name -> role and argon2 hash; as env: TRAINWATCH_CONSOLE__USERS='{"ana": {"role": ..., ...}}'
    users: dict[str, ConsoleUser] = Field(default_factory=dict)
    #: Signs session cookies. None: a random key per process (sessions end when the server restarts).
    secret_key: SecretStr | None = None
    session_max_age_s: int = Field(default=8 * 3600, gt=0)
    #: Set on HTTPS deployments so the browser never sends the session over plain HTTP.
    secure_cookies: bool = False
    #: Reverse-proxy SSO: trust `proxy_user_header` / `proxy_groups_header` from these peer addresses only.
    proxy_auth: bool = False
    proxy_trusted: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    proxy_user_header: str = "X-Forwarded-User"
    proxy_groups_header: str = "X-Forwarded-Groups"
    #: A proxied user in this group is `compliance`; any other authenticated user is `analyst`.
    proxy_compliance_group: str = "trainwatch-compliance"
    #: Failed logins allowed per (user name, client address) within the window before 429s.
    login_max_failures: int = Field(default=5, ge=1)
    login_window_s: float = Field(default=300.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINWATCH_", env_nested_delimiter="__", extra="forbid")

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    topic_config: TopicConfigSettings = TopicConfigSettings()
    ingest: IngestSettings = IngestSettings()
    detect: DetectSettings = DetectSettings()
    console: ConsoleSettings = ConsoleSettings()
    clickhouse_dsn: str = Field(default="chdb:./var/trainwatch.chdb", description="chdb:PATH or http(s)://host:8123")
    database: str = "trainwatch"
    window_s: float = Field(default=60.0, gt=0)
    policy: str = Field(default="bis-2024-proposed", description="shipped profile name or path to a TOML file")
    model_path: str | None = Field(
        default=None, description="classifier artifact directory; None = the packaged one; 'rule' = the interim rule"
    )
    data_dir: Path = Path("./var")
    #: Where CLI case actions (`cases ack|report|...`, `suppress end`) send their changes besides the store: "kafka"
    #: publishes them to topics.cases at once (a Kafka deployment); "off" stores only and says so (replay, demo).
    cases_feed: Literal["off", "kafka"] = "off"
    #: Log lines of every command (pipeline/log_setup.py): text (people; colour only on a terminal), json, logfmt.
    log_format: Literal["text", "json", "logfmt"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "WARNING"
    #: `trainwatch run` exits this long after SIGTERM / SIGINT even if a stage or a client library has not finished
    #: stopping, every thread's stack logged first (pipeline/shutdown.py). A stop takes ~2 s; keep this under the
    #: supervisor's grace period (Kubernetes: 30 s by default), so the stacks are written before a SIGKILL.
    stop_timeout_s: float = Field(default=25.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments > environment > TOML file (TRAINWATCH_CONFIG) > defaults.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _CONFIG_FILE.get() or os.environ.get("TRAINWATCH_CONFIG")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build Settings at an entry point. `config_file` beats TRAINWATCH_CONFIG for where the TOML file is."""
    path = Path(config_file) if config_file is not None else None
    if path is not None and not path.is_file():
        raise TrainwatchError(f"{path}: settings file not found")
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE.reset(token)
