"""A detector's finding, with everything an analyst needs to defend it."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from schemas.base import EpochSeconds, Message

Severity = Literal["info", "low", "medium", "high", "critical"]
Outcome = Literal["reportable", "needs_review", "monitored", "info"]


class Detection(Message):
    TOPIC_KEY: ClassVar[str] = "detections"

    schema_version: Literal[1] = 1
    detection_id: str = Field(description="hash of detector id, policy, subject and reason")
    detector_id: str
    detector_version: int
    severity: Severity
    policy_id: str
    policy_version: str
    outcome: Outcome
    reason: str = Field(description="machine-readable reason, e.g. compute_used, compute_projected")
    account_id: str
    beneficial_owner_id: str | None = None
    run_id: str | None = None
    workload_ids: list[str] = Field(default_factory=list)
    event_time: EpochSeconds = Field(description="event time of the evidence that first met the standard")
    summary: str = ""
    evidence: dict[str, Any] = Field(default_factory=dict)
    source_windows: list[str] = Field(default_factory=list)
