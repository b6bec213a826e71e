"""Dead letters: what could not be used, why, and where it came from.

Encoding on `telemetry.dlq`: the record VALUE is the original bytes, untouched, for a whole bad message (cut to
its first `dlq_max_value_bytes` when larger, with `dlq.size` and `dlq.sha256` of the whole); for one bad row of a
batch or columnar message it is that row as a native TelemetrySample-shaped JSON object. The KEY is the letter's
own deterministic id (`letter_key`: topic, partition, offset, reason, row), so a letter re-emitted after a restart
is a duplicate that a keyed store absorbs. Provenance travels in HEADERS (UTF-8): `dlq.reason`, `dlq.detail`,
`dlq.topic`, `dlq.partition`, `dlq.offset`, `dlq.row` (row index inside the message, single-row letters only),
`dlq.key` (the source message's key, raw bytes, when it had one), and the source message's own headers as
`src.<name>`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

#: Reasons a message or row is dead-lettered.
REASONS = ("malformed_json", "schema_violation", "wrong_type", "out_of_range", "bad_timestamp", "future_timestamp",
           "clock_ahead", "missing_id", "too_late", "oversized")
#: Default cut of a letter's value (bytes): far below the broker's default max.message.bytes (1 MB).
DLQ_MAX_VALUE_BYTES = 65_536


@dataclass(slots=True)
class DeadLetter:
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None  # the source message's key
    row: int | None = None
    #: the source message's headers (copied as `src.<name>`)
    src_headers: list[tuple[str, bytes | None]] | None = None
    #: size and SHA-256 of the whole value when `value` holds only its first bytes
    size: int | None = None
    sha256: str | None = None
    #: tells apart letters of one (offset, reason) that have no row index (rows merged from several messages)
    part: str | None = None

    def truncate(self, limit: int) -> DeadLetter:
        """Keep the first `limit` bytes of the value, recording the whole value's size and hash."""
        if len(self.value) > limit:
            self.size, self.sha256 = len(self.value), hashlib.sha256(self.value).hexdigest()
            self.value = self.value[:limit]
        return self

    def letter_key(self) -> bytes:
        """Deterministic: the same message (or row) rejected for the same reason gets the same key on every replay."""
        k = f"{self.topic}:{self.partition}:{self.offset}:{self.reason}"
        if self.row is not None:
            k += f":{self.row}"
        if self.part is not None:
            k += f":{self.part}"
        return k.encode("utf-8", "replace")

    def headers(self) -> list[tuple[str, bytes]]:
        h = [("dlq.reason", self.reason), ("dlq.detail", self.detail[:1000]), ("dlq.topic", self.topic),
             ("dlq.partition", str(self.partition)), ("dlq.offset", str(self.offset))]
        if self.row is not None:
            h.append(("dlq.row", str(self.row)))
        if self.size is not None:
            h += [("dlq.size", str(self.size)), ("dlq.sha256", self.sha256 or ""), ("dlq.truncated", "true")]
        out = [(k, v.encode("utf-8", "replace")) for k, v in h]  # "replace": a detail quoting odd input never fails
        if self.key is not None:
            out.append(("dlq.key", self.key[:1000]))
        for name, value in (self.src_headers or [])[:32]:
            out.append((f"src.{name}"[:200], (value or b"")[:1000]))
        return out


def count_reasons(letters: list[DeadLetter], counter: Counter) -> None:
    counter.update(d.reason for d in letters)
