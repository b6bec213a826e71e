"""Base model shared by every message: strict field names, a schema version, no silent extras."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Message(BaseModel):
    """Every wire message and stored record. `SCHEMA_VERSION` bumps on an incompatible change."""

    model_config = ConfigDict(extra="forbid", frozen=False, populate_by_name=True)

    SCHEMA_VERSION: ClassVar[int] = 1
    #: Kafka topic (settings key) the message normally travels on; None for records only stored.
    TOPIC_KEY: ClassVar[str | None] = None
