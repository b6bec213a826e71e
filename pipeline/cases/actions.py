"""Analyst actions on cases with their arguments validated: the one core the CLI (and a web console) calls.

Every bad argument is a `CaseActionError` (a TrainwatchError: one line, exit 2 at the CLI), raised before anything
is written:

- `at` (the action's time, epoch seconds) must be finite, not before the case opened (its `opened` event, else
  its earliest event) nor before its latest status change (the audit trail stays in order), and not more than
  `FUTURE_SKEW_S` ahead of the clock. `--at nan` used to be stored and then crash `cases show`; `--at 0` recorded
  an acknowledgement in 1970.
- statuses must be case statuses; actor, filing reference and dismissal reason must not be blank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, get_args

from pipeline.cases.core import CaseError, Label, UnknownCase, check_label
from pipeline.cases.feed import CaseFeedMessage, FeedError, FeedOutcome, publish_case_changes
from pipeline.cases.report import utc
from pipeline.cases.service import CaseService
from pipeline.settings import Settings
from pipeline.store import Store
from schemas.case import Case, CaseEvent, CaseStatus
from schemas.errors import PolicyError
from schemas.policy import Policy, load_policy

STATUSES: tuple[str, ...] = get_args(CaseStatus)
#: How far ahead of this machine's clock an action's time may be (clock skew between analysts' machines).
FUTURE_SKEW_S = 300.0


class CaseActionError(CaseError):
    """An action's argument is not acceptable (the message says which and why)."""


def check_statuses(statuses: Iterable[str] | None) -> list[str] | None:
    """The statuses to filter on (None: all); an unknown one is an error naming the choices."""
    if statuses is None:
        return None
    out = list(statuses)
    bad = [s for s in out if s not in STATUSES]
    if bad:
        raise CaseActionError(f"--status {bad[0]!r}: not a case status (choose from {', '.join(STATUSES)})")
    return out or None


def _text(name: str, value: str) -> str:
    if not value or not value.strip():
        raise CaseActionError(f"{name} must not be blank")
    return value.strip()


def check_at(case: Case, events: Sequence[CaseEvent], at: float, now: float) -> float:
    """`at` if it is a time this action could have happened at on `case` (see the module doc)."""
    if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
        raise CaseActionError(f"--at {at!r}: must be a finite time in epoch seconds")
    opened = [e.at for e in events if e.action == "opened"] or [e.at for e in events]
    start = min(opened) if opened else min(t for t in (case.knowledge_at, case.detected_at) if t is not None)
    if at < start:
        raise CaseActionError(f"--at {at!r} ({utc(at)}) is before case {case.case_id} opened ({utc(start)})")
    changes = [e.at for e in events if e.to_status != e.from_status]
    if changes and at < max(changes):
        raise CaseActionError(f"--at {at!r} ({utc(at)}) is before the case's latest status change "
                              f"({utc(max(changes))})")
    if at > now + FUTURE_SKEW_S:
        raise CaseActionError(f"--at {at!r} ({utc(at)}) is in the future (now {utc(now)})")
    return float(at)


def policy_of(case: Case, fallback: str) -> Policy:
    """The policy that decided the case (shipped profile by id), else `fallback` (a name or TOML path)."""
    try:
        return load_policy(case.policy_id)
    except PolicyError:
        return load_policy(fallback)


def publish(settings: Settings, store: Store, case_ids: Iterable[str]) -> tuple[FeedOutcome | None, FeedError | None]:
    """Acted cases' changes onto the feed (pipeline.cases.feed.publish_case_changes), each under its own policy; a
    failure is returned, not raised, so the CLI and the console can say what they did first. The CLI commands and
    the console both call this, so an action reaches the compliance feed whichever surface took it."""
    try:
        return publish_case_changes(settings, store, case_ids, lambda c: policy_of(c, settings.policy)), None
    except FeedError as exc:
        return None, exc


def feed_publisher(settings: Settings, store: Store) -> Callable[[list[str]], dict[str, Any]]:
    """`publish` as the console wants it: a function of case ids that says, as a dict, what became of their changes
    (a failure too: the action itself is stored either way, and `trainwatch cases publish` sends it later)."""
    def send(case_ids: list[str]) -> dict[str, Any]:
        outcome, failed = publish(settings, store, case_ids)
        if outcome is not None:
            return outcome.to_dict()
        return {"published": 0, "topic": settings.topics.cases, "message_ids": [], "note": str(failed), "error": True}
    return send


class CaseActions:
    """List, show and act on cases in `store`. `clock` gives processing time (the default `at`)."""

    def __init__(self, store: Store, default_policy: str = "bis-2024-proposed",
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.default_policy = default_policy
        self.clock = clock

    def list(self, statuses: Iterable[str] | None = None, policy_id: str | None = None) -> list[Case]:
        return self.store.list_cases(status=check_statuses(statuses), policy_id=policy_id)

    def get(self, case_id: str) -> Case:
        case = self.store.get_case(_text("case id", case_id))
        if case is None:
            raise UnknownCase(f"{case_id}: no such case in database {self.store.database}")
        return case

    def show(self, case_id: str) -> tuple[Case, list[CaseEvent]]:
        case = self.get(case_id)
        return case, self.store.case_events(case.case_id)

    def _act(self, case_id: str, actor: str, at: float | None, method: str, *args: object) -> list[CaseFeedMessage]:
        case, events = self.show(case_id)
        who = _text("--actor", actor)
        now = self.clock()
        when = check_at(case, events, now if at is None else at, now)
        service = CaseService(self.store, policy_of(case, self.default_policy), preload=False)
        return getattr(service, method)(case.case_id, who, when, *args)

    def ack(self, case_id: str, actor: str, at: float | None = None, note: str = "") -> list[CaseFeedMessage]:
        return self._act(case_id, actor, at, "ack", note)

    def report(self, case_id: str, actor: str, at: float | None, filing_reference: str, label: Label = None
               ) -> list[CaseFeedMessage]:
        return self._act(case_id, actor, at, "report", _text("--reference", filing_reference), check_label(label))

    def dismiss(self, case_id: str, actor: str, at: float | None, reason: str, label: Label = None
                ) -> list[CaseFeedMessage]:
        return self._act(case_id, actor, at, "dismiss", _text("--reason", reason), check_label(label))

    def review(self, case_id: str, actor: str, at: float | None, training: bool, note: str = "",
               label: Label = None) -> list[CaseFeedMessage]:
        return self._act(case_id, actor, at, "decide_review", training, note, check_label(label))

    def relabel(self, case_id: str, actor: str, at: float | None, label: tuple[str, str]) -> list[CaseFeedMessage]:
        """A closed case's label, changed (audited as `labelled`)."""
        return self._act(case_id, actor, at, "relabel", check_label(label))

    def attest(self, case_id: str, actor: str, at: float | None, training: bool, document: str,
               label: Label = None) -> list[CaseFeedMessage]:
        """The customer's answer to a needs_review inquiry (CaseBook.attest)."""
        return self._act(case_id, actor, at, "attest", training, _text("--document", document), check_label(label))
