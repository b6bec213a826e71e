"""The detect stage's core, without Kafka: window aggregates, CIP records and allocations in; detections out.

The faust app (pipeline/detect/faust_app.py) and the in-process runner (pipeline/runner.py) both drive this.
"""

from __future__ import annotations

from typing import Any

from detectors.classifier_base import WorkloadClassifier
from detectors.engine import DetectEngine
from pipeline.detect.merger import WindowMerger
from schemas.allocation import AllocationEvent
from schemas.cip import CipRecord
from schemas.detection import Detection
from schemas.policy import Policy
from schemas.windows import WindowAggregate


class DetectStage:
    def __init__(self, policy: Policy, classifier: WorkloadClassifier | None = None, window_s: float = 60.0,
                 lateness_s: float = 3600.0) -> None:
        self.policy = policy
        self.engine = DetectEngine(policy, classifier, window_s)
        self.merger = WindowMerger(lateness_s)
        self.watermark = float("-inf")

    def on_window(self, w: WindowAggregate) -> list[Detection]:
        merged = self.merger.add(w)
        if merged is None:  # a partial seen before: replays change nothing
            return []
        self.watermark = max(self.watermark, w.window_end)
        return self.engine.on_window(merged)

    def on_cip(self, rec: CipRecord) -> list[Detection]:
        return self.engine.on_cip(rec)

    def on_allocation(self, ev: AllocationEvent) -> list[Detection]:
        return self.engine.on_allocation(ev)

    def on_time(self) -> list[Detection]:
        """Let time-driven rules run and idle state expire, at the event-time watermark."""
        if self.watermark == float("-inf"):
            return []
        self.merger.expire(self.watermark)
        return self.engine.on_time(self.watermark)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.to_dict(), "merger": self.merger.to_dict(), "watermark": self.watermark}

    @classmethod
    def from_dict(cls, d: dict[str, Any], policy: Policy, classifier: WorkloadClassifier | None = None,
                  window_s: float = 60.0) -> DetectStage:
        stage = cls(policy, classifier, window_s)
        stage.engine = DetectEngine.from_dict(d["engine"], policy, classifier)
        stage.merger = WindowMerger.from_dict(d["merger"])
        stage.watermark = d["watermark"]
        return stage
