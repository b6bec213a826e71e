"""Merging the partial aggregates of one workload-window as they arrive, for the detect engine.

Ingest emits one partial per (workload, window, source topic and partition, revision). The engine counts a
workload-window once and *replaces* it when it is delivered again (detectors/state.py RunState.add_window), so each
time a new partial arrives the merger hands over the merge of every partial seen so far: the cumulative figures. A
partial seen before (same window_id: a replay or a duplicate delivery) changes nothing and yields nothing.
"""

from __future__ import annotations

from collections.abc import Collection

from detectors.windows import WorkloadWindow, merge_partials
from schemas.windows import WindowAggregate


class WindowMerger:
    def __init__(self, horizon_s: float = 3600.0) -> None:
        #: Partials are kept this long after their window ends (the ingest stage's allowed lateness).
        self.horizon_s = horizon_s
        self._parts: dict[tuple[str, float], dict[str, WindowAggregate]] = {}

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, w: WindowAggregate) -> WorkloadWindow | None:
        parts = self._parts.setdefault((w.workload_id, w.window_start), {})
        if w.window_id in parts:
            return None
        parts[w.window_id] = w
        return merge_partials(parts.values())

    def current(self, w: WindowAggregate) -> WorkloadWindow | None:
        """The merge of the partials of w's workload-window seen so far (None: none), without adding w."""
        return self.current_key((w.workload_id, w.window_start))

    def current_key(self, key: tuple[str, float]) -> WorkloadWindow | None:
        """The merge of the partials seen so far of the workload-window (workload id, window start)."""
        parts = self._parts.get(key)
        return merge_partials(parts.values()) if parts else None

    def has(self, key: tuple[str, float]) -> bool:
        """Whether a partial of the workload-window (workload id, window start) has been seen (and not expired)."""
        return bool(self._parts.get(key))

    def expire(self, watermark: float, keep: Collection[tuple[str, float]] = ()) -> int:
        """Forget windows that ended more than the horizon before `watermark` (event time), except those of `keep`
        (windows still to be applied from their partials). Returns how many."""
        old = [k for k, parts in self._parts.items()
               if next(iter(parts.values())).window_end < watermark - self.horizon_s and k not in keep]
        for k in old:
            del self._parts[k]
        return len(old)

    def to_dict(self) -> dict:
        return {"horizon_s": self.horizon_s,
                "parts": [p.model_dump(mode="json") for parts in self._parts.values() for p in parts.values()]}

    @classmethod
    def from_dict(cls, d: dict) -> WindowMerger:
        m = cls(d.get("horizon_s", 3600.0))
        for raw in d.get("parts", []):
            w = WindowAggregate.model_validate(raw)
            m._parts.setdefault((w.workload_id, w.window_start), {})[w.window_id] = w
        return m
