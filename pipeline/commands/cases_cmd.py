"""`trainwatch cases list|show|ack|report|dismiss|review|attest|label` and `trainwatch report CASE [--markdown|--json]`.

Every command reads and writes the ClickHouse store named by --store/--database (default: Settings). Actions
re-read the case, validate the transition (an illegal one exits 2 with the reason) and append an audit event.
With `cases_feed = "kafka"` (TRAINWATCH_CASES_FEED) an action then publishes the case's changes the compliance
feed lacks (its own, and any the worker never sent) in the worker's format, once; otherwise it says where the change
is. `cases publish` sends what is missing (after a broker outage, or to catch up a store).
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from pipeline.cases.actions import STATUSES, CaseActions, policy_of, publish
from pipeline.cases.feed import CaseFeedMessage
from pipeline.cases.report import draft_report, render_markdown, utc
from pipeline.settings import load_settings
from pipeline.store import Store
from schemas.case import LABEL_REASON_CODES, Case
from schemas.serde import dumps

cases_app = typer.Typer(help="Cases in the knowledge store: list, inspect, and act on them.", no_args_is_help=True)

_STORE = typer.Option(None, "--store", help="ClickHouse DSN (chdb:PATH or http(s)://...); default from settings")
_DATABASE = typer.Option(None, "--database", help="database name; default from settings")
_JSON = typer.Option(False, "--json", help="print JSON")
_STATUS = typer.Option(None, "--status", help=f"only these statuses (repeatable): {', '.join(STATUSES)}")
_ACTOR = typer.Option(None, "--actor", help="who acts (default: the login name)")
_AT = typer.Option(None, "--at", help="time of the action, epoch seconds (default: now); finite, not before the case "
                   "opened or its latest status change, not in the future")


_LABEL = typer.Option(None, "--label", help="your verdict on the flag: true_positive or false_positive (default: "
                     "from the action: reported = true_positive, dismissed = false_positive)")
_CODE = typer.Option(None, "--reason-code", help=f"with --label: {', '.join(LABEL_REASON_CODES)}")


def _label(label: str | None, code: str | None) -> tuple[str, str] | None:
    if label is None and code is None:
        return None
    if label is None or code is None:
        raise typer.BadParameter("give --label and --reason-code together")
    return label, code


@contextmanager
def _actions(dsn: str | None, database: str | None) -> Iterator[CaseActions]:
    settings = load_settings()
    with Store.connect(dsn or settings.clickhouse_dsn, database or settings.database) as store:
        yield CaseActions(store, settings.policy)


def _echo_json(data: Any) -> None:
    typer.echo(dumps(data).decode())


def _summary(case: Case) -> dict[str, Any]:
    return case.model_dump(mode="json", exclude={"evidence", "identity"})


@cases_app.command("list")
def list_(
    status: list[str] = _STATUS,
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Cases, soonest due first (identity and evidence left out; see `cases show`)."""
    with _actions(store_dsn, database) as actions:
        cases = actions.list(status or None)
    if as_json:
        _echo_json([_summary(c) for c in cases])
        return
    for c in cases:
        typer.echo(f"{c.case_id}\t{c.status}\t{c.reason}\t{c.account_id}\tdue {utc(c.due_at) or '-'}\t"
                   f"{c.policy_id}@{c.policy_version}")


@cases_app.command("show")
def show(
    case_id: str = typer.Argument(..., help="case id"),
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """One case with its audit trail."""
    with _actions(store_dsn, database) as actions:
        case, events = actions.show(case_id)
    if as_json:
        _echo_json({"case": case.model_dump(mode="json"), "events": [e.model_dump(mode="json") for e in events]})
        return
    typer.echo(f"{case.case_id}  {case.status}  v{case.version}  {case.reason}  policy {case.policy_id}@"
               f"{case.policy_version}")
    typer.echo(f"account {case.account_id}  owner {case.beneficial_owner_id or '-'}  run {case.run_id or '-'}")
    typer.echo(f"knowledge {utc(case.knowledge_at) or '-'}  due {utc(case.due_at) or '-'}  "
               f"detectors {', '.join(case.detectors)}")
    for e in events:
        typer.echo(f"  {utc(e.at)}  {e.actor}  {e.action}  {e.from_status or '-'} -> {e.to_status or '-'}")


def _act(store_dsn: str | None, database: str | None, as_json: bool, method: str, case_id: str, actor: str | None,
         *args: Any) -> None:
    settings = load_settings()
    with Store.connect(store_dsn or settings.clickhouse_dsn, database or settings.database) as store:
        actions = CaseActions(store, settings.policy)
        messages: list[CaseFeedMessage] = getattr(actions, method)(case_id, actor or getpass.getuser(), *args)
        case = actions.get(case_id)  # the stored case: feed messages leave the identity out
        feed, failed = publish(settings, store, [case.case_id])
    if as_json:
        events = [m.change.model_dump(mode="json") for m in messages]
        _echo_json({"case": case.model_dump(mode="json"), "events": events,
                    "feed": feed.to_dict() if feed else {"published": 0, "error": str(failed)}})
    else:
        for m in messages:
            typer.echo(f"{case_id}: {m.change.from_status} -> {m.change.to_status} ({m.change.action} by "
                       f"{m.change.actor})")
        if feed is not None:
            typer.echo(feed.line)
    if failed is not None:
        raise failed


@cases_app.command("publish")
def publish_cmd(
    case_ids: list[str] = typer.Argument(None, help="case ids (default: every case in the store)"),
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Send the cases' stored changes that the compliance feed lacks (needs cases_feed = kafka); once each."""
    settings = load_settings()
    with Store.connect(store_dsn or settings.clickhouse_dsn, database or settings.database) as store:
        ids = case_ids or [r["case_id"] for r in store.query("SELECT DISTINCT case_id FROM case_events")]
        feed, failed = publish(settings, store, ids)
    if failed is not None:
        raise failed
    assert feed is not None
    if as_json:
        _echo_json(feed.to_dict())
    else:
        typer.echo(feed.line)


@cases_app.command("ack")
def ack(
    case_id: str = typer.Argument(..., help="case id"),
    actor: str | None = _ACTOR,
    at: float | None = _AT,
    note: str = typer.Option("", "--note", help="why you take the case (kept in the audit event)"),
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Take an open case (open -> acknowledged)."""
    _act(store_dsn, database, as_json, "ack", case_id, actor, at, note)


@cases_app.command("report")
def report(
    case_id: str = typer.Argument(..., help="case id"),
    reference: str = typer.Option(..., "--reference", help="the filing's reference number"),
    actor: str | None = _ACTOR,
    at: float | None = _AT,
    label: str | None = _LABEL,
    reason_code: str | None = _CODE,
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Record that the report was filed (open | needs_review | acknowledged -> reported); records a label."""
    _act(store_dsn, database, as_json, "report", case_id, actor, at, reference, _label(label, reason_code))


@cases_app.command("dismiss")
def dismiss(
    case_id: str = typer.Argument(..., help="case id"),
    reason: str = typer.Option(..., "--reason", help="why this is not a reportable matter"),
    actor: str | None = _ACTOR,
    at: float | None = _AT,
    label: str | None = _LABEL,
    reason_code: str | None = _CODE,
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Dismiss a case (any status but reported/dismissed); only new, stronger evidence reopens it. Records a label."""
    _act(store_dsn, database, as_json, "dismiss", case_id, actor, at, reason, _label(label, reason_code))


@cases_app.command("review")
def review(
    case_id: str = typer.Argument(..., help="case id"),
    training: bool = typer.Option(..., "--training/--not-training", help="the review's finding"),
    note: str = typer.Option("", "--note", help="what the review found (e.g. the customer's answer)"),
    actor: str | None = _ACTOR,
    at: float | None = _AT,
    label: str | None = _LABEL,
    reason_code: str | None = _CODE,
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Decide a needs_review case: --training opens it, --not-training dismisses it."""
    _act(store_dsn, database, as_json, "review", case_id, actor, at, training, note, _label(label, reason_code))


def _yes_no(value: str) -> bool:
    v = value.strip().lower()
    if v not in ("yes", "no"):
        raise typer.BadParameter(f"{value!r}: answer yes or no", param_hint="--training")
    return v == "yes"


@cases_app.command("attest")
def attest(
    case_id: str = typer.Argument(..., help="case id"),
    training: str = typer.Option(..., "--training", help="the customer's answer: yes (training) or no"),
    document: str = typer.Option(..., "--document", help="reference of the signed answer (kept in the audit event)"),
    actor: str | None = _ACTOR,
    at: float | None = _AT,
    label: str | None = _LABEL,
    reason_code: str | None = _CODE,
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Record the customer's answer to a needs_review inquiry: yes opens the case, no closes it as not training."""
    _act(store_dsn, database, as_json, "attest", case_id, actor, at, _yes_no(training), document,
         _label(label, reason_code))


@cases_app.command("label")
def label_cmd(
    case_id: str = typer.Argument(..., help="case id"),
    label: str = typer.Option(..., "--label", help="true_positive or false_positive"),
    reason_code: str = typer.Option(..., "--reason-code", help=", ".join(LABEL_REASON_CODES)),
    actor: str | None = _ACTOR,
    at: float | None = _AT,
    as_json: bool = _JSON,
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Change the label of a closed (reported or dismissed) case."""
    _act(store_dsn, database, as_json, "relabel", case_id, actor, at, (label, reason_code))


def report_cmd(
    case_id: str = typer.Argument(..., help="case id"),
    markdown: bool = typer.Option(False, "--markdown", help="print Markdown (the default)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    store_dsn: str | None = _STORE,
    database: str | None = _DATABASE,
) -> None:
    """Print a case's DRAFT report."""
    if markdown and as_json:
        raise typer.BadParameter("choose one of --markdown and --json")
    with _actions(store_dsn, database) as actions:
        case = actions.get(case_id)
        rep = draft_report(case, policy_of(case, actions.default_policy))
    if as_json:
        _echo_json(rep)
    else:
        typer.echo(render_markdown(rep), nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(cases_app, name="cases")
    app.command("report")(report_cmd)
