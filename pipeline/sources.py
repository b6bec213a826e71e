"""Reading a simulator (or captured) folder as the stream the pipeline would see, without Kafka.

Telemetry lines are delivered in file order — the order a stream delivers them, late and duplicated ones
included. CIP records and allocation events are interleaved by event time: each is delivered once the telemetry
stream's newest event time has reached it, so a CIP record dated after the telemetry also *arrives* after it.
`held_back` delivers one stream late, as a partition a broker failover holds back would be (benchmarks/late_inputs.py).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# File names of a scenario folder (docs/simulator.md) and the settings topic key each feeds.
FILES = {"cip": "cip.jsonl", "allocations": "allocations.jsonl", "telemetry": "telemetry.jsonl"}


@dataclass(frozen=True, slots=True)
class Record:
    """One message as a consumer sees it: which stream, its position in that stream, raw bytes."""

    stream: str  # "telemetry" | "allocations" | "cip"
    offset: int
    value: bytes
    ts: float | None  # event time when cheaply known (None for unparseable lines)


def _event_time(line: bytes, field: str) -> float | None:
    try:
        v = orjson.loads(line).get(field)
        return float(v) if isinstance(v, (int, float)) else None
    except (orjson.JSONDecodeError, AttributeError):
        return None


def _lines(path: Path) -> Iterator[bytes]:
    if not path.exists():
        return
    with path.open("rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if line:
                yield line


#: A telemetry time this far past the newest seen waits for a second line near it (ingest's default clock skew).
JUMP_CONFIRM_S = 300.0


def read_folder(folder: Path) -> Iterator[Record]:
    """Yield every record of a scenario folder in delivery order (see the module docstring)."""
    side: list[tuple[float, int, Record]] = []
    seq = 0
    for stream, field in (("cip", "updated_at"), ("allocations", "ts")):
        for off, line in enumerate(_lines(folder / FILES[stream])):
            ts = _event_time(line, field)
            heapq.heappush(side, (ts if ts is not None else float("-inf"), seq, Record(stream, off, line, ts)))
            seq += 1
    newest, unconfirmed = float("-inf"), float("-inf")
    for off, line in enumerate(_lines(folder / FILES["telemetry"])):
        ts = _ts_prefix(line)
        if ts is not None and ts > newest:
            # One line far ahead of the rest (a bad clock, which ingest letters) must not release the side records
            # early: a jump counts once a second line confirms it, as ingest's watermark does.
            if ts <= newest + JUMP_CONFIRM_S or abs(ts - unconfirmed) <= JUMP_CONFIRM_S:
                newest = ts
            else:
                unconfirmed = ts
        while side and side[0][0] <= newest:
            yield heapq.heappop(side)[2]
        yield Record("telemetry", off, line, ts)
    while side:
        yield heapq.heappop(side)[2]


def _ts_prefix(line: bytes) -> float | None:
    # Telemetry is the bulk of the data: find "ts" without a full parse when the line starts with it.
    if line.startswith(b'{"ts":'):
        end = line.find(b",", 6)
        try:
            return float(line[6:end])
        except ValueError:
            return None
    return _event_time(line, "ts")


def held_back(records: Iterable[Record], stream: str, delay_s: float) -> Iterator[Record]:
    """`records` with one stream delivered `delay_s` of event time late (a topic read behind the others): each of
    its records comes once the other streams have reached `delay_s` past where it came (its event time, or the
    newest time seen when it came if that is later: a CIP record dated long before the telemetry came with it, not
    a month earlier; one that came before any time, from the first time seen), the rest at the end. Each stream
    keeps its own order; nothing is dropped."""
    held: deque[list[Any]] = deque()  # [release time (None: until a time is seen), record]
    newest = float("-inf")

    def release(rec: Record) -> float | None:
        came = max(rec.ts if rec.ts is not None else newest, newest)
        return came + delay_s if newest > float("-inf") else None

    for rec in records:
        if rec.stream == stream:
            held.append([release(rec), rec])
            continue
        if rec.ts is not None:
            newest = max(newest, rec.ts)
            for h in held:
                if h[0] is None:
                    h[0] = release(h[1])
        while held and held[0][0] is not None and held[0][0] <= newest:
            yield held.popleft()[1]
        yield rec
    yield from (rec for _, rec in held)
