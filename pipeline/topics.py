"""Topic provisioning: every topic the stages read or write, with its partitions, replication and configs.

`trainwatch topics create` creates what is missing from settings (`Settings.topic_config`); `run` and `ingest run`
only *check* (`require`) and refuse to start with one line naming the topic and the problem. Topics are never
left to broker auto-creation: an auto-created input gets the broker's default partition count, which breaks
co-partitioning for good (faust: "Unrecognized partition").

Co-partitioned (keyed by account, read together by the detect app): windows, CIP, allocations, the app's owners
topic and its faust changelogs. Telemetry (keyed by node) has its own count.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from pipeline.detect.topics import derived_topics
from pipeline.settings import Settings
from schemas.errors import TrainwatchError

Stage = Literal["ingest", "detect", "dlq", "all"]
DEFAULT_APP_ID = "trainwatch-detect"
#: The detect app's faust tables (pipeline/detect/faust_app.py); faust names a table's changelog {app_id}-{t}-changelog.
TABLES = ("engine", "partials", "owners")
#: Changelogs compact promptly, so a restarted worker replays the tables' latest state, not their history (most of
#: a changelog is window partials written and then deleted). The cleaner only compacts closed segments: roll one a
#: minute, clean when 10 % is dirty. A tombstone stays 5 min: a replay (seconds) that began before the cleaner
#: removed it still sees it (Kafka's bound for reading a compacted topic from its start).
CHANGELOG_CONFIG = {"segment.ms": "60000", "min.cleanable.dirty.ratio": "0.1", "delete.retention.ms": "300000"}


def changelog_topics(app_id: str) -> tuple[str, ...]:
    return tuple(f"{app_id}-{t}-changelog" for t in TABLES)

# librdkafka logs every failed connection attempt on its own (to stderr, one line per broker per retry): the
# admin clients here report problems as exceptions instead, so their logs go nowhere.
_quiet = logging.getLogger("trainwatch.librdkafka.admin")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


class BrokerUnreachable(TrainwatchError):
    """No broker of the bootstrap list answered."""


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    role: str  # which setting names it: telemetry, windows, ..., owners (derived from the app id)
    partitions: int
    replication: int
    config: dict[str, str]
    copartitioned: bool  # must share its partition count with the other account-keyed topics


@dataclass(frozen=True, slots=True)
class TopicState:
    partitions: int
    replication: int  # smallest replica count over the partitions
    leaderless: int  # partitions without a leader right now


@dataclass(frozen=True, slots=True)
class Problem:
    topic: str
    what: str
    #: fatal problems stop `run` (missing topic, broken co-partitioning); the rest is drift `check` reports
    fatal: bool

    def __str__(self) -> str:
        return f"topic {self.topic!r}: {self.what}"


@dataclass
class Report:
    specs: list[TopicSpec]
    state: dict[str, TopicState]
    problems: list[Problem] = field(default_factory=list)
    #: the partition count the co-partitioned topics share (None: they do not exist or disagree)
    partitions: int | None = None

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]


def stage_roles(stage: Stage) -> tuple[str, ...]:
    """The topics a stage cannot run without (what it reads and what it writes)."""
    ingest = ("telemetry", "windows", "dlq")
    detect = ("windows", "cip", "allocations", "detections", "cases", "dlq", "owners")
    if stage == "ingest":
        return ingest
    if stage == "detect":
        return detect
    if stage == "dlq":  # the dead-letter sink (pipeline/dlq_sink.py) reads only the DLQ
        return ("dlq",)
    return tuple(dict.fromkeys(ingest + detect))


def topic_specs(settings: Settings, app_id: str = DEFAULT_APP_ID) -> list[TopicSpec]:
    """Every topic of the pipeline as settings want it."""
    t, c = settings.topics, settings.topic_config
    base = {"max.message.bytes": str(c.max_message_bytes)}
    if c.min_insync_replicas is not None:
        base["min.insync.replicas"] = str(c.min_insync_replicas)
    stream = {**base, "cleanup.policy": "delete", "retention.ms": str(c.retention_ms)}
    kept = {**base, "cleanup.policy": "delete", "retention.ms": str(c.long_retention_ms)}
    # CIP is a table (the latest record per account): compaction keeps every account's record for ever.
    table = {**base, "cleanup.policy": "compact"}
    n, rf = c.partitions, c.replication_factor
    specs = [
        TopicSpec(t.telemetry, "telemetry", c.telemetry_partitions or n, rf, stream, False),
        TopicSpec(t.windows, "windows", n, rf, stream, True),
        TopicSpec(t.cip, "cip", n, rf, table, True),
        TopicSpec(t.allocations, "allocations", n, rf, stream, True),
        TopicSpec(t.detections, "detections", n, rf, stream, False),
        TopicSpec(t.cases, "cases", n, rf, kept, False),
        TopicSpec(t.dlq, "dlq", n, rf, kept, False),
    ]
    # The owners topic carries owner contributions the owners table (compacted changelog) is rebuilt from.
    specs += [TopicSpec(name, "owners", n, rf, stream, True) for name in derived_topics(app_id)]
    # faust creates the changelogs it lacks (with the same configs, faust_app.py); `topics create` makes them here
    # so that they are right from the start. Not a stage role: `run` does not require them.
    changelog = {**table, **CHANGELOG_CONFIG}
    specs += [TopicSpec(name, "changelog", n, rf, changelog, True) for name in changelog_topics(app_id)]
    return specs


def _bootstrap_reachable(bootstrap: str, timeout_s: float) -> bool:
    for hostport in bootstrap.split(","):
        host, _, port = hostport.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def admin(settings: Settings, timeout_s: float = 5.0) -> AdminClient:
    """An admin client on a broker known to answer; BrokerUnreachable (one line) when none does."""
    bootstrap = settings.kafka.bootstrap_servers
    # A TCP connect fails in milliseconds when nothing listens; librdkafka would retry (and log) until its timeout.
    if not _bootstrap_reachable(bootstrap, min(timeout_s, 2.0)):
        raise BrokerUnreachable(f"no Kafka broker reachable at {bootstrap} (is it running? deploy/local/kafka.sh "
                                f"start, or set TRAINWATCH_KAFKA__BOOTSTRAP_SERVERS)")
    a = AdminClient(settings.kafka.client_config(logger=_quiet))
    try:
        a.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnreachable(f"Kafka at {bootstrap} did not answer within {timeout_s:g} s: "
                                f"{_kafka_msg(exc)}") from None
    return a


def _kafka_msg(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return err.str() if hasattr(err, "str") else str(exc)


def probe(settings: Settings, timeout_s: float = 5.0) -> None:
    """Raise BrokerUnreachable (one line) unless a broker answers a metadata request."""
    admin(settings, timeout_s)


def _state(a: AdminClient, timeout_s: float) -> dict[str, TopicState]:
    out = {}
    for name, meta in a.list_topics(timeout=timeout_s).topics.items():
        if meta.error is not None and not meta.partitions:
            continue
        parts = meta.partitions.values()
        out[name] = TopicState(len(meta.partitions), min((len(p.replicas) for p in parts), default=0),
                               sum(1 for p in parts if p.leader < 0))
    return out


def _configs(a: AdminClient, names: Iterable[str], timeout_s: float) -> dict[str, dict[str, str]]:
    names = list(names)
    if not names:
        return {}
    futures = a.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names],
                                 request_timeout=timeout_s)
    out = {}
    for res, fut in futures.items():
        try:
            out[res.name] = {k: v.value for k, v in fut.result(timeout=timeout_s).items()}
        except KafkaException:
            continue
    return out


def check(settings: Settings, stage: Stage = "all", app_id: str = DEFAULT_APP_ID, *, timeout_s: float = 10.0,
          configs: bool = True, a: AdminClient | None = None) -> Report:
    """Compare the broker's topics with settings. Fatal: a topic the stage needs is missing, or the
    co-partitioned topics (with the app's existing changelogs) disagree on their partition count. Drift (fewer
    partitions or replicas than settings, another cleanup policy, ...) is reported but not fatal."""
    a = a or admin(settings, timeout_s)
    need = set(stage_roles(stage))
    specs = [s for s in topic_specs(settings, app_id) if s.role in need]
    state = _state(a, timeout_s)
    rep = Report(specs, state)
    for s in specs:
        st = state.get(s.name)
        if st is None:
            rep.problems.append(Problem(s.name, f"missing ({s.role}; create it: trainwatch topics create)", True))
        elif st.partitions != s.partitions:
            rep.problems.append(Problem(s.name, f"{st.partitions} partition(s), settings say {s.partitions}", False))
    if any(s.role in ("windows", "cip", "allocations", "owners") for s in specs) and stage in ("detect", "all"):
        co = {s.name: state[s.name].partitions for s in specs if s.copartitioned and s.name in state}
        # faust's changelog topics of this app are partitioned like its tables, i.e. like the inputs.
        co |= {name: st.partitions for name, st in state.items()
               if name.startswith(f"{app_id}-") and name.endswith("-changelog")}
        counts = sorted(set(co.values()))
        if len(counts) > 1:
            first = next(iter(co))
            odd = next(n for n, c in co.items() if c != co[first])
            rep.problems.append(Problem(odd, f"not co-partitioned: {co[odd]} partition(s) but {first!r} has "
                                             f"{co[first]} (all of {sorted(co)} must share one count)", True))
        elif counts:
            rep.partitions = counts[0]
    for s in specs:
        st = state.get(s.name)
        if st is not None and st.replication < s.replication:
            rep.problems.append(Problem(s.name, f"replication factor {st.replication}, settings say {s.replication}",
                                        False))
    if configs:
        # The app's changelogs are no stage's input (faust creates what it lacks), but one that exists with the wrong
        # configs (faust's own defaults, an operator's edit) replays history on every restart: check them too.
        logs = [s for s in topic_specs(settings, app_id) if s.role == "changelog" and s.name in state] \
            if stage in ("detect", "all") else []
        have = _configs(a, [s.name for s in specs + logs if s.name in state], timeout_s)
        for s in specs + logs:
            for key in ("cleanup.policy", "min.insync.replicas", *CHANGELOG_CONFIG):
                want, got = s.config.get(key), have.get(s.name, {}).get(key)
                if want is not None and got is not None and got != want:
                    rep.problems.append(Problem(s.name, f"{key}={got}, settings say {want}", False))
    return rep


def create(settings: Settings, app_id: str = DEFAULT_APP_ID, *, timeout_s: float = 30.0) -> list[str]:
    """Create every missing topic as settings say, wait until each partition has a leader; return those created.
    Existing topics are left as they are (`check` reports how they differ)."""
    a = admin(settings, min(timeout_s, 10.0))
    state = _state(a, timeout_s)
    missing = [s for s in topic_specs(settings, app_id) if s.name not in state]
    # Changelogs are partitioned like the input they belong to, as it exists (it may predate these settings).
    have = state.get(settings.topics.windows)
    if have is not None:
        missing = [replace(s, partitions=have.partitions) if s.role == "changelog" else s for s in missing]
    return _create(a, missing, timeout_s)


def _create(a: AdminClient, missing: list[TopicSpec], timeout_s: float) -> list[str]:
    if missing:
        futures = a.create_topics([NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication,
                                            config=s.config) for s in missing],
                                  operation_timeout=timeout_s, request_timeout=timeout_s)
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout_s)
            except KafkaException as exc:
                msg = _kafka_msg(exc)
                if "TOPIC_ALREADY_EXISTS" not in msg and "already exists" not in msg:  # created meanwhile: fine
                    raise TrainwatchError(f"topic {name!r}: create failed: {msg}") from None
    names = [s.name for s in missing]
    deadline = time.monotonic() + timeout_s
    while names:
        st = _state(a, timeout_s)
        if all(n in st and st[n].leaderless == 0 for n in names):
            break
        if time.monotonic() > deadline:
            raise TrainwatchError(f"topics {names} have partitions without a leader after {timeout_s:g} s")
        time.sleep(0.2)
    return names


def require(settings: Settings, stage: Stage, app_id: str = DEFAULT_APP_ID, *, timeout_s: float = 10.0) -> int:
    """What `run` does before starting a stage: raise TrainwatchError with one line naming the (first) fatal
    problem; return the co-partitioned count (the faust app's partitions; 0 for the ingest stage)."""
    a = admin(settings, timeout_s)
    rep = check(settings, stage, app_id, timeout_s=timeout_s, configs=False, a=a)
    # The app's own topics (named after its app id, like faust's changelogs) are the app's to create: with the
    # inputs' partition count and settings' replication, before faust would declare them its own way.
    derived = [p for p in rep.problems if p.fatal and p.what.startswith("missing (owners")]
    if derived and len(derived) == len(rep.fatal) and rep.partitions:
        _create(a, [replace(s, partitions=rep.partitions) for s in rep.specs if s.role == "owners"], timeout_s)
        rep = check(settings, stage, app_id, timeout_s=timeout_s, configs=False, a=a)
    # What the operator must fix first: a missing app topic is only a consequence when anything else is wrong.
    fatal = sorted(rep.fatal, key=lambda p: p.what.startswith("missing (owners"))
    if fatal:
        more = f" (and {len(fatal) - 1} more)" if len(fatal) > 1 else ""
        raise TrainwatchError(f"{fatal[0]}{more}; see `trainwatch topics check`")
    for p in rep.problems:
        logging.getLogger(__name__).warning("%s", p)
    leaderless = [n for n, s in rep.state.items() if n in {x.name for x in rep.specs} and s.leaderless]
    if leaderless:
        raise TrainwatchError(f"topic {leaderless[0]!r}: partitions without a leader (a broker is down?)")
    return rep.partitions or 0
