"""The ClickHouse knowledge store: cases, their events, windows, detections, dead letters and CIP records.

Reached only through clickhouse-connect, with the same code and DDL for both targets:

- ``chdb:PATH`` — embedded chDB at PATH: ``chdb:./var/trainwatch.chdb`` (relative), ``chdb:///abs/path``,
  ``chdb://:memory:``. These forms mean the same place to ``clickhouse_connect.get_client(dsn=...)``, so an
  analyst can paste the pipeline's DSN. The older ``chdb://./rel/path`` still opens the relative path here, but
  clickhouse-connect reads it as location "." and database "rel" (an engine in the working directory, which
  leaves a tmp/ folder there): do not hand it to other clients.
- ``http(s)://user:pass@host:8123`` — a ClickHouse server.

The database is set on the client (``client.database``), so migrations use unqualified table names; ClickHouse
qualifies a view's tables with the current database when the view is created.

Migrations: ``pipeline/migrations/NNNN_name.sql``, applied in version order at connect, each recorded in
``schema_migrations`` (version, name, checksum, applied_at). Already-applied files are skipped; one whose checksum
changed raises MigrationError (add a new file instead of editing an applied one). Statements are split on ``;`` at
a line end and use IF NOT EXISTS, so a half-applied file (crash mid-way) is safe to run again. Two processes
migrating one database at the same moment may both record a version; ``schema_migrations`` is a
ReplacingMergeTree read with FINAL, so that is harmless.

chDB quirks (chDB 4.4 / engine 26.9, clickhouse-connect 1.12), checked by hand and in tests/test_store.py:
- One engine path per process. Any number of clients (and so Store objects) may share that path at once, each
  with its own connection handle and its own current database; they see each other's writes. Opening a different
  path while any client is open raises ProgrammingError ("EmbeddedServer already initialized with path ...").
  Once every client is closed the engine can be reopened at another path. A Store that is not closed keeps the
  engine pinned until garbage collection, so always close() (or use ``with``).
- Not a process singleton in clickhouse-connect: each get_client() opens a new handle; calls on one handle are
  serialised by a lock, so share a Store between threads only for light use.
- Inserts go through a temp file and ``INSERT ... FROM INFILE`` (clickhouse-connect's chdb backend), so batch.
- Windows go in as one Arrow IPC stream (``raw_insert(fmt="ArrowStream")``, built by pipeline/arrow_rows.py from
  the table's own column types): the engine reads the buffers, so the Python side never encodes the ~160 map entries
  of a window one by one (~1.4x clickhouse-connect's Native writer, see benchmarks/bench_store.py).
- ``insert_deduplication_token`` dedups only on tables with ``non_replicated_deduplication_window`` > 0, and
  only for a byte-identical retry of the same batch; replays that re-batch rows rely on the ReplacingMergeTree
  keys, so reads use FINAL.
- No users, roles or grants in chDB: PII separation is by table (cip_identity, dead_letter_payloads: the bytes
  of letters from `pii_topics`, the CIP topic) and by views that leave PII out; grants for servers ship as
  pipeline/migrations/grants_server.sql.example, never applied here. Writers that know the settings should open
  the store with Store.from_settings, so a renamed CIP topic still counts as PII.
- A String column holding non-UTF-8 bytes comes back hex-encoded unless read with column_formats {"col": "bytes"}.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from pydantic import BaseModel

from pipeline.arrow_rows import ArrowRows
from pipeline.settings import Settings
from schemas import serde
from schemas.case import Case, CaseEvent, CaseLabel, Suppression, SuppressionEvent
from schemas.cip import CipRecord
from schemas.dead_letter import DeadLetter
from schemas.detection import Detection
from schemas.errors import PolicyError, TrainwatchError
from schemas.ids import content_id
from schemas.policy import Policy, load_policy, shipped_policies
from schemas.windows import WindowAggregate

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_MIGRATION_FILE = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)\.sql$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A statement ends with ';' at the end of a line (after comment lines are dropped).
_STATEMENT_END = re.compile(r";[ \t]*(?:\n|$)")

M = TypeVar("M", bound=BaseModel)


class StoreError(TrainwatchError):
    """The store could not be reached or configured."""


class MigrationError(StoreError):
    """A migration file is malformed, or an applied one was changed after the fact."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    checksum: str
    statements: tuple[str, ...]


@dataclass(frozen=True)
class _Table:
    """How one model maps onto one table: its columns and which of them travel as JSON strings."""

    name: str
    model: type[BaseModel]
    json_fields: frozenset[str] = frozenset()
    #: every field is already a plain value (str, number, list, dict of those): rows go in as Arrow, read straight
    #: off the models without model_dump's copy (the windows table: the store's widest, busiest rows)
    plain: bool = False

    @property
    def columns(self) -> list[str]:
        return list(self.model.model_fields)

    def row(self, item: BaseModel) -> list[Any]:
        data = item.model_dump()
        return [serde.dumps(data[c]).decode() if c in self.json_fields else data[c] for c in self.columns]

    def parse(self, rec: Mapping[str, Any]) -> Any:
        data = {c: serde.loads(rec[c]) if c in self.json_fields else rec[c] for c in self.columns}
        return self.model.model_validate(data)


_WINDOWS = _Table("windows", WindowAggregate, plain=True)
_DETECTIONS = _Table("detections", Detection, frozenset({"evidence"}))
_CASES = _Table("cases", Case, frozenset({"evidence", "identity"}))
_CASE_EVENTS = _Table("case_events", CaseEvent, frozenset({"details"}))
_SUPPRESSIONS = _Table("suppressions", Suppression)
_SUPPRESSION_EVENTS = _Table("suppression_events", SuppressionEvent, frozenset({"details"}))
_LABELS = _Table("case_labels", CaseLabel)
_HIT_COLUMNS = ["suppression_id", "fingerprint", "detection_id", "case_id", "account_id", "event_time", "recorded_at",
                "detection", "state", "released_at"]
_DEAD_LETTER_COLUMNS = ["dead_letter_id", "reason", "detail", "topic", "partition", "offset", "raw", "at", "raw_size",
                        "raw_blake2b", "raw_restricted"]
_PAYLOAD_COLUMNS = ["dead_letter_id", "topic", "partition", "offset", "detail", "raw", "at"]
#: Topics whose messages carry PII (CIP records) when no other list is given: the settings' default CIP topic.
DEFAULT_PII_TOPICS: frozenset[str] = frozenset({"accounts.cip"})
_POLICY_COLUMNS = ["policy_id", "policy_version", "check_beneficial_owners", "owner_min_pct", "owner_control_counts",
                   "unknown_is_foreign", "all_in_scope", "updated_us"]
_CIP_COLUMNS = ["account_id", "updated_at", "updated_us", "record"]
_OWNER_COLUMNS = ["account_id", "owner_id", "ownership_pct", "control", "updated_at", "updated_us", "us_person"]


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The numbered SQL files in `directory`, in version order (other files, e.g. *.sql.example, are ignored)."""
    found: list[Migration] = []
    for path in sorted(directory.iterdir()):
        m = _MIGRATION_FILE.match(path.name)
        if not m:
            continue
        text = path.read_text(encoding="utf-8")
        found.append(
            Migration(
                version=int(m.group(1)),
                name=m.group(2),
                path=path,
                checksum=hashlib.sha256(text.encode()).hexdigest(),
                statements=tuple(split_statements(text)),
            )
        )
    versions = [m.version for m in found]
    dupes = sorted({v for v in versions if versions.count(v) > 1})
    if dupes:
        raise MigrationError(f"{directory}: more than one migration file for version(s) {dupes}")
    return found


def split_statements(sql: str) -> list[str]:
    """SQL text -> statements: full-line `--` comments dropped, split on ';' at a line end."""
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in _STATEMENT_END.split(body) if s.strip()]


def chdb_path(dsn: str) -> str | None:
    """The engine path of a chdb DSN; None for in-memory. ``chdb:PATH`` and ``chdb:///abs`` as clickhouse-connect
    reads them; ``chdb://PATH`` (legacy) = PATH."""
    if dsn.startswith("chdb://"):
        location = dsn.removeprefix("chdb://")
    elif dsn.startswith("chdb:"):
        location = dsn.removeprefix("chdb:")
    else:
        raise StoreError(f"not a chdb DSN: {dsn!r}")
    if "?" in location or "#" in location:
        raise StoreError(f"chdb DSN {dsn!r}: query strings are not supported (the database is a setting)")
    if location in ("", "memory", ":memory:"):
        return None
    if dsn.startswith("chdb://") and not location.startswith(("/", "./", "../")):
        # clickhouse-connect reads chdb://NAME/DB as location NAME, database DB: refuse what means two things.
        raise StoreError(f"chdb DSN {dsn!r} is ambiguous: write chdb:{location} (relative) or chdb:///abs/path")
    return location


def _client_for(dsn: str) -> Client:
    if dsn.startswith("chdb:"):
        return clickhouse_connect.get_client(interface="chdb", path=chdb_path(dsn))
    if dsn.startswith(("http://", "https://")):
        return clickhouse_connect.get_client(dsn=dsn)
    raise StoreError(f"unsupported ClickHouse DSN {dsn!r}: expected chdb:PATH (e.g. chdb:./var/trainwatch.chdb), "
                     "chdb:///abs/path or http(s)://user:pass@host:8123")


@contextmanager
def _quiet_driver() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("urllib3", "clickhouse_connect")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _shipped_policies() -> list[Policy]:
    """The shipped profiles that load; a broken one is logged, never a reason the store cannot open."""
    out = []
    for name in shipped_policies():
        try:
            out.append(load_policy(name))
        except PolicyError as exc:
            logging.getLogger(__name__).warning("policy %s not registered for the views: %s", name, exc)
    return out


def _one_line(exc: BaseException) -> str:
    """The first line of a driver error, without clickhouse-connect's stack dump."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _redact(dsn: str) -> str:
    """A DSN fit for an error line: no password."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", dsn)


#: A letter's detail is our own error text, which may quote a value: a PII letter's public detail masks quotes.
_QUOTED = re.compile(r"('[^']*'|\"[^\"]*\")")


def _public_detail(detail: str) -> str:
    return _QUOTED.sub("'…'", detail)[:300]


def _micros(t: float) -> int:
    return round(t * 1_000_000)


class Store:
    """Typed access to the knowledge store. Build with `Store.connect`; close with `close()` or `with`."""

    SCHEMA_TABLE: ClassVar[str] = "schema_migrations"

    def __init__(self, client: Client, database: str, applied: list[str]):
        self.client = client
        self.database = database
        #: Migrations this connect applied ("0001_core_tables", ...); empty when the schema was already current.
        self.applied = applied
        self._arrow: dict[str, ArrowRows] = {}  # per plain table, built at its first insert
        self._pii_topics: frozenset[str] = DEFAULT_PII_TOPICS

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    @classmethod
    def connect(cls, dsn: str, database: str, *, migrations_dir: Path = MIGRATIONS_DIR,
                pii_topics: Iterable[str] | None = None) -> Store:
        """Open the store, create `database` if missing and apply pending migrations. `pii_topics`: topics whose
        dead letters keep their raw bytes only in the restricted dead_letter_payloads (default: accounts.cip).
        Any failure to reach or set up the store is one StoreError line."""
        if not _IDENTIFIER.match(database):
            raise StoreError(f"database name {database!r} must match {_IDENTIFIER.pattern}")
        migrations = load_migrations(migrations_dir)
        try:
            with _quiet_driver():  # its retry warnings would precede our one-line error
                client = _client_for(dsn)
        except StoreError:
            raise
        except Exception as exc:  # driver errors (unreachable server, bad URL, engine path in use): one line
            raise StoreError(f"cannot open ClickHouse store {_redact(dsn)}: {_one_line(exc)}") from exc
        try:
            client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
            client.database = database
            applied = cls._migrate(client, migrations)
            store = cls(client, database, applied)
            store._pii_topics = frozenset(pii_topics) if pii_topics is not None else DEFAULT_PII_TOPICS
            store.register_policies(_shipped_policies())
        except StoreError:
            client.close()
            raise
        except Exception as exc:
            client.close()
            raise StoreError(f"ClickHouse store {_redact(dsn)} database {database}: {_one_line(exc)}") from exc
        except BaseException:
            client.close()
            raise
        return store

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """Store.connect with the settings' DSN and database, and the settings' CIP topic as the PII topic."""
        return cls.connect(settings.clickhouse_dsn, settings.database, pii_topics={settings.topics.cip})

    @classmethod
    def _migrate(cls, client: Client, migrations: Sequence[Migration]) -> list[str]:
        client.command(
            f"CREATE TABLE IF NOT EXISTS {cls.SCHEMA_TABLE} (version UInt32, name String, checksum String,"
            " applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree ORDER BY version"
        )
        done = {
            r["version"]: r
            for r in client.query(f"SELECT version, name, checksum FROM {cls.SCHEMA_TABLE} FINAL").named_results()
        }
        applied: list[str] = []
        for mig in migrations:
            prior = done.get(mig.version)
            if prior is not None:
                if prior["checksum"] != mig.checksum:
                    raise MigrationError(
                        f"migration {mig.path.name} was changed after it was applied (recorded as "
                        f"{prior['version']:04d}_{prior['name']}, checksum {prior['checksum'][:12]}…, file now "
                        f"{mig.checksum[:12]}…): never edit an applied migration, add a new numbered file instead"
                    )
                continue
            for statement in mig.statements:
                client.command(statement)
            client.insert(
                cls.SCHEMA_TABLE, [[mig.version, mig.name, mig.checksum]], column_names=["version", "name", "checksum"]
            )
            applied.append(f"{mig.version:04d}_{mig.name}")
        return applied

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def drop_database(self) -> None:
        """Drop this store's whole database (tests, demo resets). The store is unusable afterwards."""
        self.client.command(f"DROP DATABASE IF EXISTS `{self.database}` SYNC")

    # ---- writes (batched: one client.insert per call) ----------------------------------------------------------

    def _insert(self, table: _Table, items: Sequence[BaseModel], settings: dict[str, Any] | None = None) -> int:
        if not items:
            return 0
        if table.plain:
            payload = self._arrow_rows(table).payload(items)
            self.client.raw_insert(table.name, table.columns, payload, settings=settings, fmt="ArrowStream")
        else:
            self.client.insert(table.name, [table.row(i) for i in items], column_names=table.columns,
                               settings=settings)
        return len(items)

    def _arrow_rows(self, table: _Table) -> ArrowRows:
        enc = self._arrow.get(table.name)
        if enc is None:
            types = {r[0]: r[1] for r in self.client.query(f"DESCRIBE TABLE `{table.name}`").result_rows}
            try:
                enc = self._arrow[table.name] = ArrowRows(table.columns, types)
            except ValueError as exc:
                raise StoreError(f"table {table.name}: {exc}") from exc
        return enc

    def insert_windows(self, windows: Sequence[WindowAggregate]) -> int:
        return self._insert(_WINDOWS, windows)

    def insert_detections(self, detections: Sequence[Detection]) -> int:
        """The table keeps one row per detection id, the last inserted (ReplacingMergeTree without a version column):
        a detection the engine re-decided is re-emitted under its id and supersedes. Within a batch the last version
        of an id is the only one written, so that never rests on how ClickHouse sorts one insert block."""
        return self._insert(_DETECTIONS, list({d.detection_id: d for d in detections}.values()))

    def upsert_cases(self, cases: Sequence[Case]) -> int:
        """Insert case versions; readers see the highest version of each case_id."""
        return self._insert(_CASES, cases)

    def append_case_events(self, events: Sequence[CaseEvent]) -> int:
        """Append events; a replay (same event_id) adds nothing visible. A retry of the same set of events, in any
        order, is dropped at insert time by its dedup token (the sorted event ids); a replay that batches events
        differently is collapsed by event_id in FINAL reads."""
        if not events:
            return 0
        token = content_id("events", *sorted(e.event_id for e in events))
        return self._insert(_CASE_EVENTS, events, settings={"insert_deduplication_token": token})

    # ---- policy operations (issue 16): suppressions, the findings they hold, labels --------------------------

    def upsert_suppressions(self, items: Sequence[Suppression]) -> int:
        """Insert suppression versions; readers see the highest version of each id."""
        return self._insert(_SUPPRESSIONS, items)

    def append_suppression_events(self, events: Sequence[SuppressionEvent]) -> int:
        if not events:
            return 0
        token = content_id("sup-events", *sorted(e.event_id for e in events))
        return self._insert(_SUPPRESSION_EVENTS, events, settings={"insert_deduplication_token": token})

    def list_suppressions(self) -> list[Suppression]:
        """Every suppression (latest version), earliest start first."""
        return self._select(_SUPPRESSIONS, order="ORDER BY starts_at, suppression_id")

    def get_suppression(self, suppression_id: str) -> Suppression | None:
        found = self._select(_SUPPRESSIONS, "WHERE suppression_id = {i:String}", params={"i": suppression_id})
        return found[0] if found else None

    def suppression_events(self, suppression_id: str | None = None) -> list[SuppressionEvent]:
        where = "WHERE suppression_id = {i:String}" if suppression_id is not None else ""
        return self._select(_SUPPRESSION_EVENTS, where, "ORDER BY at, recorded_at, event_id", {"i": suppression_id})

    def insert_suppression_hits(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Findings held (state 0) or released (state 1); see 0005_policy_ops.sql."""
        if not rows:
            return 0
        self.client.insert("suppression_hits", [[r[c] for c in _HIT_COLUMNS] for r in rows], column_names=_HIT_COLUMNS)
        return len(rows)

    def suppression_hits(self, suppression_id: str | None = None) -> list[dict[str, Any]]:
        where = "WHERE suppression_id = {i:String}" if suppression_id is not None else ""
        return self.query(f"SELECT {', '.join(_HIT_COLUMNS)} FROM suppression_hits FINAL {where} "
                          "ORDER BY event_time, fingerprint", {"i": suppression_id} if suppression_id else {})

    def suppression_counts(self) -> dict[str, dict[str, int]]:
        """Per suppression id: the findings it held, one per detection id (a re-decided detection's versions, each
        a hit row, are one finding), and how many of those it released (no version of the id still held: a version
        re-decided after the release waits for the next one)."""
        rows = self.query(
            "SELECT suppression_id, count() AS held, countIf(released) AS released FROM ("
            " SELECT suppression_id, detection_id, countIf(state = 0) = 0 AND countIf(state = 1) > 0 AS released"
            " FROM suppression_hits FINAL GROUP BY suppression_id, detection_id) GROUP BY suppression_id")
        return {r["suppression_id"]: {"held": int(r["held"]), "released": int(r["released"])} for r in rows}

    def upsert_labels(self, labels: Sequence[CaseLabel]) -> int:
        return self._insert(_LABELS, labels)

    def list_labels(self, policy_id: str | None = None) -> list[CaseLabel]:
        where = "WHERE policy_id = {p:String}" if policy_id is not None else ""
        return self._select(_LABELS, where, "ORDER BY at, case_id", {"p": policy_id})

    @property
    def pii_topics(self) -> frozenset[str]:
        return self._pii_topics

    def insert_dead_letters(self, rows: Iterable[DeadLetter | Mapping[str, Any]]) -> int:
        """Store letters; a re-delivered letter (same topic, partition, offset, bytes) lands on its row again.
        Letters from a PII topic keep reason, provenance, size and hash in dead_letters; their bytes and detail go
        only to dead_letter_payloads, which the analyst grant cannot read."""
        letters = [r if isinstance(r, DeadLetter) else DeadLetter.model_validate(r) for r in rows]
        if not letters:
            return 0
        data, payloads = [], []
        for d in letters:
            if d.at is None:  # a letter from a stage that does not stamp its own (ingest's): stored now
                d = d.model_copy(update={"at": time.time()})
            lid, offset, digest = d.dead_letter_id(), -1 if d.offset is None else d.offset, d.raw_hash()
            if d.row is not None and not d.detail.startswith("row "):
                d = d.model_copy(update={"detail": f"row {d.row}: {d.detail}"})
            if d.topic in self._pii_topics:
                payloads.append([lid, d.topic, d.partition, offset, d.detail, d.raw, d.at])
                data.append([lid, d.reason, _public_detail(d.detail), d.topic, d.partition, offset, b"", d.at,
                             len(d.raw), digest, True])
            else:
                data.append([lid, d.reason, d.detail, d.topic, d.partition, offset, d.raw, d.at, len(d.raw), digest,
                             False])
        # Payloads first: a crash in between leaves restricted bytes without their public row (the retry adds it),
        # never a public row whose bytes are lost.
        if payloads:
            self.client.insert("dead_letter_payloads", payloads, column_names=_PAYLOAD_COLUMNS)
        self.client.insert("dead_letters", data, column_names=_DEAD_LETTER_COLUMNS)
        return len(letters)

    def register_policies(self, policies: Iterable[Policy]) -> None:
        """Record each policy's foreign-person test for the views (compute_by_owner); writes only what changed."""
        have = {(r["policy_id"], r["policy_version"]): r for r in self.query(
            f"SELECT {', '.join(_POLICY_COLUMNS[:-1])} FROM policy_foreign_tests FINAL")}
        rows = []
        for p in policies:
            fp = p.foreign_person
            row = [p.id, p.version, fp.check_beneficial_owners, float(fp.owner_min_pct), fp.owner_control_counts,
                   fp.unknown_is_foreign, not fp.us_countries]
            prior = have.get((p.id, p.version))
            if prior is None or [prior[c] for c in _POLICY_COLUMNS[:-1]] != row:
                rows.append([*row, time.time_ns() // 1000])
        if rows:
            self.client.insert("policy_foreign_tests", rows, column_names=_POLICY_COLUMNS)

    def upsert_cip(self, records: Sequence[CipRecord]) -> int:
        """Write CIP records (PII, cip_identity) and their ownership projection (account_owners)."""
        if not records:
            return 0
        self.client.insert(
            "cip_identity",
            [[r.account_id, r.updated_at, _micros(r.updated_at), serde.encode(r).decode()] for r in records],
            column_names=_CIP_COLUMNS,
        )
        owners: list[list[Any]] = []
        for r in records:
            us = _micros(r.updated_at)
            owners += [
                [r.account_id, o.owner_id, o.ownership_pct, o.control, r.updated_at, us, o.us_person]
                for o in r.beneficial_owners
            ]
            if not r.beneficial_owners:  # marks "latest record has no owners" (see 0002_identity.sql)
                owners.append([r.account_id, "", None, False, r.updated_at, us, None])
        self.client.insert("account_owners", owners, column_names=_OWNER_COLUMNS)
        return len(records)

    # ---- reads -------------------------------------------------------------------------------------------------

    def _select(self, table: _Table, where: str = "", order: str = "", params: dict[str, Any] | None = None) -> list:
        cols = ", ".join(f"`{c}`" for c in table.columns)
        sql = f"SELECT {cols} FROM {table.name} FINAL {where} {order}"
        return [table.parse(r) for r in self.client.query(sql, parameters=params or {}).named_results()]

    def get_case(self, case_id: str) -> Case | None:
        """The latest version of a case, or None."""
        found = self._select(_CASES, "WHERE case_id = {case_id:String}", params={"case_id": case_id})
        return found[0] if found else None

    def list_cases(self, status: list[str] | None = None, policy_id: str | None = None) -> list[Case]:
        """Latest versions, soonest due first (no due date last), optionally filtered by status and policy.
        Shadow-policy cases (status `shadow`, issue 16) only when `status` names them: they are no one's work."""
        conds, params = [], {}
        if status is None:
            conds.append("status != 'shadow'")
        else:
            conds.append("status IN {status:Array(String)}")
            params["status"] = list(status)
        if policy_id is not None:
            conds.append("policy_id = {policy_id:String}")
            params["policy_id"] = policy_id
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        return self._select(_CASES, where, "ORDER BY due_at ASC NULLS LAST, case_id", params)

    def case_events(self, case_id: str) -> list[CaseEvent]:
        """A case's events in event-time order."""
        return self._select(
            _CASE_EVENTS, "WHERE case_id = {case_id:String}", "ORDER BY at, recorded_at, event_id", {"case_id": case_id}
        )

    def list_windows(self, account_id: str | None = None) -> list[WindowAggregate]:
        """Stored partial windows (every revision), by event time."""
        where = "WHERE account_id = {a:String}" if account_id is not None else ""
        return self._select(
            _WINDOWS, where, "ORDER BY window_start, workload_id, `partition`, revision", {"a": account_id}
        )

    def list_detections(self, account_id: str | None = None) -> list[Detection]:
        """Stored detections, one per id (its latest version), by event time."""
        where = "WHERE account_id = {a:String}" if account_id is not None else ""
        return self._select(_DETECTIONS, where, "ORDER BY event_time, detection_id", {"a": account_id})

    def get_cip(self, account_id: str) -> CipRecord | None:
        """The latest CIP record of an account (PII), or None."""
        rows = self.query("SELECT record FROM cip_identity FINAL WHERE account_id = {a:String}", {"a": account_id})
        return serde.decode(CipRecord, rows[0]["record"]) if rows else None

    def dead_letters(self, topic: str | None = None, *, restricted: bool = True) -> list[DeadLetter]:
        """Dead letters in (topic, partition, offset) order. `restricted=True` (needs the PII table's grant) puts
        the bytes and detail of PII letters back; False returns what the analyst grant sees (raw empty)."""
        where = "WHERE topic = {topic:String}" if topic is not None else ""
        cols = "dead_letter_id, reason, detail, topic, `partition`, `offset`, raw, at, raw_restricted"
        sql = f"SELECT {cols} FROM dead_letters FINAL {where} ORDER BY topic, `partition`, `offset`, dead_letter_id"
        result = self.client.query(sql, parameters={"topic": topic} if topic else {}, column_formats={"raw": "bytes"})
        rows = list(result.named_results())
        hidden = [r["dead_letter_id"] for r in rows if r["raw_restricted"]]
        payload: dict[str, dict[str, Any]] = {}
        if restricted and hidden:
            found = self.client.query(
                "SELECT dead_letter_id, detail, raw FROM dead_letter_payloads FINAL"
                " WHERE dead_letter_id IN {ids:Array(String)}",
                parameters={"ids": hidden}, column_formats={"raw": "bytes"})
            payload = {p["dead_letter_id"]: p for p in found.named_results()}
        out = []
        for r in rows:
            lid, secret = r.pop("dead_letter_id"), r.pop("raw_restricted")
            if secret and lid in payload:
                r["raw"], r["detail"] = payload[lid]["raw"], payload[lid]["detail"]
            out.append(DeadLetter.model_validate({**r, "offset": None if r["offset"] < 0 else r["offset"]}))
        return out

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run an analyst query (server-side `{name:Type}` or client-side `%(name)s` parameters) -> row dicts."""
        return list(self.client.query(sql, parameters=dict(params or {})).named_results())
