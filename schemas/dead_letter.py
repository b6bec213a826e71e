"""Dead letters: what could not be used, why, and where it came from. One record from the stage that refuses the
input, through `telemetry.dlq`, to the store's `dead_letters` table.

Encoding on `telemetry.dlq` (`letter_key`, `headers`): the record VALUE is the original bytes, untouched, for a whole
bad message (cut to its first `dlq_max_value_bytes` when larger, with `dlq.size` and `dlq.sha256` of the whole); for
one bad row of a batch or columnar message it is that row as a native TelemetrySample-shaped JSON object. The KEY is
the letter's own deterministic id (topic, partition, offset, reason, row), so a letter re-emitted after a restart
is a duplicate that a keyed store absorbs. Provenance travels in HEADERS (UTF-8): `dlq.reason`, `dlq.detail`,
`dlq.topic`, `dlq.partition`, `dlq.offset`, `dlq.row` (row index inside the message, single-row letters only),
`dlq.key` (the source message's key, raw bytes, when it had one), and the source message's own headers as
`src.<name>`.
"""

from __future__ import annotations

import hashlib

from pydantic import Field

from schemas.base import Message
from schemas.ids import content_id


class DeadLetter(Message):
    """A message (or one row of it) that could not be processed, with where it came from and why."""

    reason: str = Field(description="machine-readable reason, e.g. malformed_json, too_late")
    detail: str = ""
    topic: str
    partition: int = 0
    offset: int | None = Field(default=None, description="None when the source has no offset")
    raw: bytes = Field(default=b"", description="the message's bytes, or the bad row as a JSON object")
    at: float | None = Field(default=None, description="processing time it was dead-lettered (set where stored)")
    row: int | None = Field(default=None, description="row index inside the source message (one bad row of many)")
    key: bytes | None = Field(default=None, description="the source message's key")
    src_headers: list[tuple[str, bytes | None]] | None = Field(default=None, description="the source's headers")
    size: int | None = Field(default=None, description="size of the whole value when `raw` holds its first bytes")
    sha256: str | None = Field(default=None, description="SHA-256 of the whole value when `raw` is cut")
    part: str | None = Field(default=None, description="tells apart letters of one (offset, reason) without a row "
                                                       "(rows merged from several messages)")

    @classmethod
    def of(cls, reason: str, detail: str, topic: str, partition: int, offset: int | None, raw: bytes,
           key: bytes | None = None, row: int | None = None, src_headers: list | None = None, *,
           part: str | None = None) -> DeadLetter:
        """A letter from typed values, unvalidated (the ingest hot path builds many on hostile input)."""
        return cls.model_construct(reason=reason, detail=detail, topic=topic, partition=partition, offset=offset,
                                   raw=raw, key=key, row=row, src_headers=src_headers, part=part)

    def truncate(self, limit: int) -> DeadLetter:
        """Keep the first `limit` bytes of the value, recording the whole value's size and hash."""
        if len(self.raw) > limit:
            self.size, self.sha256 = len(self.raw), hashlib.sha256(self.raw).hexdigest()
            self.raw = self.raw[:limit]
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

    def raw_hash(self) -> str:
        return hashlib.blake2b(self.raw).hexdigest()

    def dead_letter_id(self) -> str:
        """The store's id: a re-delivered letter (same topic, partition, offset, bytes, row) lands on its row."""
        # The row joins the id only when known, so ids of whole-message letters stay what they were.
        parts = (self.topic, self.partition, self.offset, self.raw_hash())
        return content_id("dlq", *parts) if self.row is None else content_id("dlq", *parts, self.row)
