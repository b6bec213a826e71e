"""Owner messages: what the detect core sends to the owner aggregation (case semantics rule 4), one kind each.

On Kafka they travel on `<app_id>-owners-repartition` keyed by beneficial owner; in process the detect stage applies
them at once. Every message names its kind: nothing is guessed from which fields are empty.

- `contribution`: one run's latest cumulative figures for one owner (replaces what the owner had for the run).
- `retract`: the account's CIP stopped naming the owner.
- `member`: the account's CIP names the owner (an aggregator in event time waits for the account's stream).
- `mark`: how far the owner's accounts on one source partition have got in event time (sent after a batch).
- `tick`: processing time passed (the app's timer): held messages of idle members may be released.

`partition` and `wm` are set by the transport where the message is made (detectors/owner_aggregate.py `stamped`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, RootModel

from schemas.base import Message


class _OwnerBase(Message):
    owner_id: str = Field(min_length=1)
    partition: int | None = None
    wm: float | None = None


class OwnerContribution(_OwnerBase):
    kind: Literal["contribution"] = "contribution"
    account_id: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    entry: dict[str, Any]  # the run's figures as OwnerState.runs holds them
    t: float  # the run's latest window end (where the figures stand)
    start: float | None = None  # start of the window that produced them (interpolating a crossing)
    foreign_since: float | None = None
    determination: dict[str, Any]
    cip_notes: list[dict[str, Any]] = Field(default_factory=list)


class OwnerRetraction(_OwnerBase):
    kind: Literal["retract"] = "retract"
    account_id: str = Field(min_length=1)


class OwnerMembership(_OwnerBase):
    kind: Literal["member"] = "member"
    account_id: str = Field(min_length=1)


class OwnerMark(_OwnerBase):
    kind: Literal["mark"] = "mark"
    marks: dict[str, float]


class OwnerTick(_OwnerBase):
    kind: Literal["tick"] = "tick"


AnyOwnerMessage = Annotated[OwnerContribution | OwnerRetraction | OwnerMembership | OwnerMark | OwnerTick,
                            Field(discriminator="kind")]


class OwnerMessage(RootModel[AnyOwnerMessage]):
    """Any owner message, told apart by `kind` (decode with schemas.serde.decode(OwnerMessage, raw).root)."""
