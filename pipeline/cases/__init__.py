"""The case stage: detections become cases (core), the report clock and its deadline monitor (deadline), the draft
report (report), the compliance.cases feed (feed), and the store glue used by the runner and the CLI (service)."""

from pipeline.cases.core import CaseBook, CaseChanges, CaseError, IllegalTransition, UnknownCase, case_id_for, due_at
from pipeline.cases.deadline import DeadlineMonitor
from pipeline.cases.feed import CaseFeedMessage, CaseFeedProducer, feed_messages
from pipeline.cases.report import draft_report, render_markdown

__all__ = [
    "CaseBook",
    "CaseChanges",
    "CaseError",
    "CaseFeedMessage",
    "CaseFeedProducer",
    "DeadlineMonitor",
    "IllegalTransition",
    "UnknownCase",
    "case_id_for",
    "draft_report",
    "due_at",
    "feed_messages",
    "render_markdown",
]
