"""Deterministic ids from content keys: replays and retries produce the same id, so sinks can upsert."""

from __future__ import annotations

import hashlib


def content_id(prefix: str, *parts: object) -> str:
    """A short stable id: `prefix-` + 20 hex chars of BLAKE2b over the parts, joined unambiguously."""
    h = hashlib.blake2b(digest_size=10)
    for p in parts:
        b = repr(p).encode() if not isinstance(p, str) else p.encode()
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return f"{prefix}-{h.hexdigest()}"
