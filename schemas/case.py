"""Cases in the knowledge store and their append-only events."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from schemas.base import Message

CaseStatus = Literal["open", "needs_review", "acknowledged", "reported", "dismissed", "monitored"]
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
