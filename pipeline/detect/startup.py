"""Where a detect worker's start goes: one log line per phase,
`startup <phase> +<s since the first phase> cpu <process CPU s since exec, all threads> at <epoch>`.

A restarted worker should consume again within seconds (issue 12, docs/faust.md "Recovery after a restart"); these
lines say which phase took the time. benchmarks/bench_recovery.py reads them back (`phases`) and measures each
phase from the kill. The logger is set to INFO so the lines show under the CLI's default WARNING level too (a
handful per start).
"""

from __future__ import annotations

import logging
import re
import time

log = logging.getLogger("trainwatch.startup")
log.setLevel(logging.INFO)

LINE = re.compile(r"startup (?P<phase>[\w-]+) \+[\d.]+s cpu (?P<cpu>[\d.]+)s at (?P<at>[\d.]+)")
_seen: dict[str, float] = {}


def phase(name: str) -> None:
    """Log the first time this process reaches `name` (later calls: nothing)."""
    if name in _seen:
        return
    now = _seen[name] = time.time()
    log.info("startup %s +%.2fs cpu %.2fs at %.3f", name, now - min(_seen.values()), time.process_time(), now)


def phases(text: str) -> dict[str, tuple[float, float]]:
    """Phase -> (epoch time, process CPU seconds), from a log's startup lines (the first of each name)."""
    out: dict[str, tuple[float, float]] = {}
    for m in LINE.finditer(text):
        out.setdefault(m["phase"], (float(m["at"]), float(m["cpu"])))
    return out
