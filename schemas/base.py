"""Base model shared by every message: strict field names, a schema version, no silent extras."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field

#: Epoch seconds a record may carry: after 2000-01-01 (earlier is a unit or clock error) and before the year 10000
#: (what the store's DateTime64 views and microsecond versions can hold).
EpochSeconds = Annotated[float, Field(gt=946_684_800, lt=253_402_300_800)]


class Message(BaseModel):
    """Every wire message and stored record. `SCHEMA_VERSION` bumps on an incompatible change."""

    model_config = ConfigDict(extra="forbid", frozen=False, populate_by_name=True)

    SCHEMA_VERSION: ClassVar[int] = 1
    #: Kafka topic (settings key) the message normally travels on; None for records only stored.
    TOPIC_KEY: ClassVar[str | None] = None
