"""Dead letters of the ingest stage: the reasons, the cut of a letter's value. The letter itself, and its encoding on
`telemetry.dlq`, is `schemas.dead_letter.DeadLetter`, the same record the store keeps.
"""

from __future__ import annotations

from collections import Counter

from schemas.dead_letter import DeadLetter

__all__ = ["DLQ_MAX_VALUE_BYTES", "REASONS", "DeadLetter", "count_reasons"]

#: Reasons a message or row is dead-lettered.
REASONS = ("malformed_json", "schema_violation", "wrong_type", "out_of_range", "bad_timestamp", "future_timestamp",
           "clock_ahead", "missing_id", "too_late", "oversized")
#: Default cut of a letter's value (bytes): far below the broker's default max.message.bytes (1 MB).
DLQ_MAX_VALUE_BYTES = 65_536


def count_reasons(letters: list[DeadLetter], counter: Counter) -> None:
    counter.update(d.reason for d in letters)
