"""Dead letters: what could not be used, why, and where it came from.

Encoding on `telemetry.dlq`: the record VALUE is the original bytes, untouched, for a whole bad message; for one
bad row of a batch or columnar message it is that row as a native TelemetrySample-shaped JSON object. Provenance
travels in HEADERS (all UTF-8 strings): `dlq.reason`, `dlq.detail`, `dlq.topic`, `dlq.partition`, `dlq.offset`,
and `dlq.row` (row index inside the message, only for single-row letters). The key is the source message's key.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

#: Reasons a message or row is dead-lettered.
REASONS = ("malformed_json", "schema_violation", "out_of_range", "bad_timestamp", "future_timestamp", "missing_id",
           "too_late")


@dataclass(slots=True)
class DeadLetter:
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    row: int | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        h = [("dlq.reason", self.reason), ("dlq.detail", self.detail[:1000]), ("dlq.topic", self.topic),
             ("dlq.partition", str(self.partition)), ("dlq.offset", str(self.offset))]
        if self.row is not None:
            h.append(("dlq.row", str(self.row)))
        return [(k, v.encode()) for k, v in h]


def count_reasons(letters: list[DeadLetter], counter: Counter) -> None:
    counter.update(d.reason for d in letters)
