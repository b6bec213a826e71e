"""`trainwatch suppress add|list|show|end`: silence known-good activity for a time, every change audited (issue 16).

Times (--from, --until, --at) are event time, epoch seconds or ISO 8601 (`2025-03-03T00:00:00Z`); on a live stream
event time is wall time. Ending a suppression releases what it held at once (pipeline/cases/suppressions.py); the
cases it opens go on the compliance feed at once when cases_feed is kafka (as `cases` actions do).
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import typer

from pipeline.cases import suppressions as sup_ops
from pipeline.cases.actions import publish
from pipeline.cases.feed import CaseFeedMessage
from pipeline.cases.report import utc
from pipeline.cases.service import CaseService
from pipeline.settings import load_settings
from pipeline.store import Store
from schemas.case import Suppression
from schemas.detection import Detection
from schemas.errors import PolicyError
from schemas.policy import Policy, load_policy
from schemas.serde import decode, dumps

suppress_app = typer.Typer(help="Suppressions: hold a scope's findings for a time, with an audit trail.",
                           no_args_is_help=True)

_STORE = typer.Option(None, "--store", help="ClickHouse DSN (default: settings)")
_DATABASE = typer.Option(None, "--database", help="database (default: settings)")
_ACTOR = typer.Option(None, "--actor", help="who (default: the login name)")
_JSON = typer.Option(False, "--json", help="print JSON")


def parse_time(value: str | None, name: str) -> float | None:
    """Epoch seconds or ISO 8601 (a naive time is UTC) -> epoch seconds; anything else is a one-line error."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise sup_ops.SuppressionError(f"{name} {value!r}: not epoch seconds or an ISO 8601 time") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@contextmanager
def _store(dsn: str | None, database: str | None) -> Iterator[tuple[Store, str]]:
    settings = load_settings()
    with Store.connect(dsn or settings.clickhouse_dsn, database or settings.database) as store:
        yield store, settings.policy


def _row(s: Suppression, now: float) -> str:
    state = "ended" if s.ended_at is not None and s.ended_at < s.expires_at else (
        "expired" if s.expires_at <= now else "active")
    det = f" detector {s.detector_id}" if s.detector_id else ""
    return (f"{s.suppression_id}\t{state}\t{s.scope} {s.subject}{det}\t{utc(s.starts_at)} .. {utc(s.ends_at)}\t"
            f"by {s.created_by}\t{s.reason}")


def release(store: Store, sup: Suppression, at: float, fallback_policy: str) -> list[CaseFeedMessage]:
    """Release what `sup` held, under each policy its findings were made (shipped profile by id, else the
    fallback): the case changes (stored; `end` puts them on the feed when cases_feed is kafka)."""
    policies: dict[str, Policy] = {}
    for row in store.suppression_hits(sup.suppression_id):
        pid = decode(Detection, row["detection"]).policy_id
        if pid not in policies:
            try:
                policies[pid] = load_policy(pid)
            except PolicyError:
                policies[pid] = load_policy(fallback_policy)
    out: list[CaseFeedMessage] = []
    for policy in policies.values():
        out += CaseService(store, policy, preload=False).release_ended(at, time.time(), only=sup.suppression_id)
    return out


@suppress_app.command("add")
def add(
    account: str | None = typer.Option(None, "--account", help="scope: this account"),
    owner: str | None = typer.Option(None, "--owner", help="scope: this beneficial owner (all its accounts)"),
    run: str | None = typer.Option(None, "--run", help="scope: this run"),
    detector: str | None = typer.Option(None, "--detector", help="only this detector's findings within the scope"),
    reason: str = typer.Option(..., "--reason", help="why this activity is known-good"),
    start: str | None = typer.Option(None, "--from", help="event time it starts holding (default: now)"),
    until: str | None = typer.Option(None, "--until", help="event time it expires"),
    days: float | None = typer.Option(None, "--days", help="or: expires this many days after --from"),
    actor: str | None = _ACTOR,
    policy: str | None = typer.Option(None, "--policy", help="profile whose suppressions.max_days bounds it"),
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Add a suppression (exactly one of --account, --owner, --run; --until or --days)."""
    scopes = [(k, v) for k, v in (("account", account), ("owner", owner), ("run", run)) if v is not None]
    if len(scopes) != 1:
        raise sup_ops.SuppressionError("give exactly one scope: --account, --owner or --run")
    if (until is None) == (days is None):
        raise sup_ops.SuppressionError("give exactly one of --until and --days")
    now = time.time()
    starts = parse_time(start, "--from")
    starts = now if starts is None else starts
    expires = parse_time(until, "--until") if until is not None else starts + float(days or 0) * 86_400.0
    with _store(store_dsn, database) as (store, default_policy):
        sup = sup_ops.new_suppression(load_policy(policy or default_policy), scope=scopes[0][0], subject=scopes[0][1],
                                      reason=reason, created_by=actor or getpass.getuser(), created_at=now,
                                      starts_at=starts, expires_at=float(expires or 0), detector_id=detector)
        if store.get_suppression(sup.suppression_id) is None:
            store.upsert_suppressions([sup])
            store.append_suppression_events([sup_ops.sup_event(
                sup.suppression_id, "added", sup.starts_at, now, sup.created_by, "added",
                {"scope": sup.scope, "subject": sup.subject, "detector_id": sup.detector_id, "reason": sup.reason,
                 "starts_at": sup.starts_at, "expires_at": sup.expires_at})])
    typer.echo(dumps(sup.model_dump(mode="json")).decode() if as_json else sup.suppression_id)


@suppress_app.command("list")
def list_(
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Every suppression with its state (active / expired / ended) and how many findings it held."""
    with _store(store_dsn, database) as (store, _):
        sups = store.list_suppressions()
        # one finding per detection id: a re-decided detection's versions are separate hit rows (store docstring)
        counts = store.suppression_counts()
    now = time.time()
    zero = {"held": 0, "released": 0}
    if as_json:
        typer.echo(dumps([{**s.model_dump(mode="json"), **counts.get(s.suppression_id, zero)} for s in sups]).decode())
        return
    for s in sups:
        n = counts.get(s.suppression_id, zero)
        typer.echo(f"{_row(s, now)}\theld {n['held']}\treleased {n['released']}")


@suppress_app.command("show")
def show(
    suppression_id: str = typer.Argument(..., help="suppression id"),
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """One suppression with its audit trail: added, each finding held and released (with its case), ended/expired."""
    with _store(store_dsn, database) as (store, _):
        sup = store.get_suppression(suppression_id)
        if sup is None:
            raise sup_ops.SuppressionError(f"{suppression_id}: no such suppression in database {store.database}")
        events = store.suppression_events(suppression_id)
    if as_json:
        typer.echo(dumps({"suppression": sup.model_dump(mode="json"),
                          "events": [e.model_dump(mode="json") for e in events]}).decode())
        return
    typer.echo(_row(sup, time.time()))
    for e in events:
        what = e.details.get("case_id") or e.details.get("reason") or ""
        typer.echo(f"  {utc(e.at)}  {e.actor}  {e.action}  {what}")


@suppress_app.command("end")
def end(
    suppression_id: str = typer.Argument(..., help="suppression id"),
    reason: str = typer.Option(..., "--reason", help="why it ends early"),
    at: str | None = typer.Option(None, "--at", help="event time it ends (default: now)"),
    actor: str | None = _ACTOR,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """End a suppression now: what it held and still holds opens its cases (knowledge per the policy)."""
    if not reason.strip():
        raise sup_ops.SuppressionError("--reason must not be blank")
    now = time.time()
    when = parse_time(at, "--at")
    when = now if when is None else when
    who = actor or getpass.getuser()
    with _store(store_dsn, database) as (store, default_policy):
        sup = store.get_suppression(suppression_id)
        if sup is None:
            raise sup_ops.SuppressionError(f"{suppression_id}: no such suppression in database {store.database}")
        if sup.ended_at is not None or sup.expires_at <= when:
            raise sup_ops.SuppressionError(f"{suppression_id}: already over at {utc(sup.ends_at)}")
        if when < sup.starts_at:
            raise sup_ops.SuppressionError(f"--at {utc(when)} is before the suppression starts ({utc(sup.starts_at)})")
        ended = sup.model_copy(update={"ended_at": when, "ended_by": who, "end_reason": reason.strip(),
                                       "version": sup.version + 1})
        store.upsert_suppressions([ended])
        store.append_suppression_events([sup_ops.sup_event(
            sup.suppression_id, "ended", when, now, who, when, {"reason": reason.strip()})])
        changes = release(store, ended, when, default_policy)
        feed, failed = publish(load_settings(), store, {m.case.case_id for m in changes}) if changes else (None, None)
    typer.echo(f"{suppression_id}: ended at {utc(when)}; {len(changes)} case change(s) from what it held")
    if feed is not None:
        typer.echo(feed.line)
    if failed is not None:
        raise failed


def register(app: typer.Typer) -> None:
    app.add_typer(suppress_app, name="suppress")
