"""Cases in the knowledge store and their append-only events."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from schemas.base import Message

CaseStatus = Literal["open", "needs_review", "acknowledged", "reported", "dismissed", "monitored", "shadow"]
#: Statuses that count as a report obligation the provider must act on.
REPORTABLE_STATUSES: tuple[str, ...] = ("open", "needs_review", "acknowledged", "reported")


class Case(Message):
    TOPIC_KEY: ClassVar[str] = "cases"

    schema_version: Literal[1] = 1
    case_id: str = Field(description="hash of policy id, subject (account or owner) and run")
    account_id: str
    beneficial_owner_id: str | None = None
    run_id: str | None = None
    policy_id: str
    policy_version: str
    reason: str
    status: CaseStatus
    knowledge_at: float | None = Field(description="event time the standard was first met; None = clock not started")
    detected_at: float = Field(description="processing time the pipeline first recorded it")
    due_at: float | None = None
    updated_at: float
    detectors: list[str] = Field(default_factory=list)
    evidence: dict[str, Any] = Field(default_factory=dict)
    identity: dict[str, Any] = Field(default_factory=dict, description="the foreign person's identity for the report")
    suggested_inquiry: str | None = None
    filing_reference: str | None = None
    dismiss_reason: str | None = None
    version: int = Field(default=1, ge=1, description="bumps on every change; the store keeps the highest")


class CaseEvent(Message):
    TOPIC_KEY: ClassVar[str] = "case_events"

    schema_version: Literal[1] = 1
    event_id: str = Field(description="hash of case id, action and event time")
    case_id: str
    at: float = Field(description="event time")
    recorded_at: float = Field(description="processing time")
    actor: str = Field(description="'pipeline' or the analyst's id")
    action: str
    from_status: str | None = None
    to_status: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


SuppressionScope = Literal["account", "owner", "run"]


class Suppression(Message):
    """Known-good activity silenced for a time (pipeline/cases/suppressions.py). Times are event time, like every
    clock in trainwatch: a finding whose event time is in [starts_at, end) and that matches the scope is held."""

    TOPIC_KEY: ClassVar[str] = "suppressions"

    schema_version: Literal[1] = 1
    suppression_id: str = Field(description="hash of scope, subject, detector, window, reason and author")
    scope: SuppressionScope
    subject: str = Field(min_length=1, description="the account, beneficial owner or run id")
    detector_id: str | None = Field(default=None, description="only this detector's findings; None = all")
    reason: str = Field(min_length=1)
    created_by: str = Field(min_length=1)
    created_at: float = Field(description="processing time it was added")
    starts_at: float = Field(description="event time from which findings are held")
    expires_at: float = Field(description="event time it lapses (bounded by the policy's suppressions.max_days)")
    ended_at: float | None = Field(default=None, description="event time it was ended early")
    ended_by: str | None = None
    end_reason: str | None = None
    version: int = Field(default=1, ge=1)

    @property
    def ends_at(self) -> float:
        """When it stops holding findings: its expiry, or when it was ended early."""
        return self.expires_at if self.ended_at is None else min(self.expires_at, self.ended_at)


class SuppressionEvent(Message):
    """Append-only audit of a suppression: added, ended, held (a finding), released (a finding, at the end)."""

    TOPIC_KEY: ClassVar[str] = "suppression_events"

    schema_version: Literal[1] = 1
    event_id: str
    suppression_id: str
    at: float = Field(description="event time")
    recorded_at: float = Field(description="processing time")
    actor: str
    action: str
    details: dict[str, Any] = Field(default_factory=dict)


LabelValue = Literal["true_positive", "false_positive"]
#: Reason codes an analyst gives with a label (what made the flag right or wrong).
LABEL_REASON_CODES: tuple[str, ...] = (
    "confirmed_training", "customer_attested_training", "reported",
    "not_training", "customer_attested_not_training", "inference_or_serving", "us_person", "below_threshold",
    "duplicate", "data_error", "known_good", "other",
)


class CaseLabel(Message):
    """An analyst's verdict on a flag, recorded when the case is closed (reported or dismissed)."""

    TOPIC_KEY: ClassVar[str] = "case_labels"

    schema_version: Literal[1] = 1
    case_id: str
    label: LabelValue
    reason_code: str
    actor: str
    at: float
    recorded_at: float
    policy_id: str
    account_id: str
    run_id: str | None = None
    detectors: list[str] = Field(default_factory=list)
    bands: list[str] = Field(default_factory=list, description="classifier bands the case's findings carried")
    workload_ids: list[str] = Field(default_factory=list)
