"""Detect never fails on input its schemas accept: odd but valid windows go through, the rest is refused up front.

The demo's windows, CIP and allocations in delivery order, with a seeded share of windows given odd values (zero
or huge counts, times moved by a year, empty or inflated device lists, unknown models, extreme sums). A mutation
the schema refuses is what the stages dead-letter; every accepted one must pass the detect stage without raising.
"""

from __future__ import annotations

import random

import pytest

from detectors.base import Detector
from detectors.engine import DetectEngine
from pipeline.classifier_loader import load_classifier
from pipeline.detect.stage import DetectStage
from schemas.errors import InvalidMessage
from schemas.policy import load_policy
from schemas.serde import validate
from schemas.windows import WindowAggregate

ODD = [0.0, -1.0, 1.0, 1e-30, 1e30, -1e12, 5e9]


def _mutate(rng: random.Random, w: WindowAggregate) -> dict:
    d = w.model_dump()
    for _ in range(rng.randint(1, 3)):
        k = rng.choice(["window_start", "window_end", "sample_count", "device_count", "node_count", "device_seconds",
                        "flop", "flop_low", "flop_high", "revision", "sums", "devices", "accelerators"])
        if k == "sums" and d["sums"]:
            d["sums"][rng.choice(sorted(d["sums"]))] = rng.choice(ODD)
        elif k == "devices":
            d["devices"] = rng.choice([[], d["devices"] * 3, ["x"]])
        elif k == "accelerators":
            d["accelerators"] = rng.choice([{}, {"Mystery X9": 5}, {"NVIDIA H100 80GB HBM3": 10**6}])
        elif k in ("sample_count", "device_count", "node_count", "revision"):
            d[k] = rng.choice([0, 1, 3, 10**9])
        elif k != "sums":
            d[k] = rng.choice(ODD) if rng.random() < 0.5 else d[k] + rng.choice([-365 * 86_400, -60, 60, 1e9])
    return d


def _crashes(engine: DetectEngine) -> dict[str, int]:
    """The engine counts a detector's or the classifier's exception in `errors` and goes on: those counts are crashes.

    The other keys there (a window no allocation names, one beyond the horizon) count input, not failures.
    """
    crashers = {d.id for d in engine.detectors} | {"classifier"}
    return {k: n for k, n in engine.errors.items() if k in crashers and n}


class _Crashing(Detector):
    """No class-level id: defining it would register it for every engine built later (an import side effect)."""

    def __init__(self) -> None:
        self.id = "crashes_on_every_window"  # type: ignore[misc]

    def detect(self, state, event):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")


def _feed(demo_inputs: list, seed: int, stage: DetectStage) -> tuple[int, int]:
    rng = random.Random(seed)
    take = {"win": stage.on_window, "cip": stage.on_cip, "alloc": stage.on_allocation}
    accepted = refused = 0
    for kind, value in demo_inputs:
        if kind == "win" and rng.random() < 0.15:
            try:
                value = validate(WindowAggregate, _mutate(rng, value))
                accepted += 1
            except InvalidMessage:
                refused += 1
                continue
        take[kind](value)
    stage.on_time()
    return accepted, refused


@pytest.mark.parametrize("seed", range(2))
def test_detect_takes_every_window_its_schema_accepts(demo_inputs: list, seed: int) -> None:
    policy = load_policy("demo")
    stage = DetectStage(policy, load_classifier(None, policy), 60.0, 3600.0)
    accepted, refused = _feed(demo_inputs, seed, stage)
    assert accepted > 20 and refused > 5  # both ways are exercised
    assert _crashes(stage.engine) == {}  # a swallowed exception is still a failure here


def test_a_detector_that_crashes_fails_the_fuzz(demo_inputs: list) -> None:
    policy = load_policy("demo")
    stage = DetectStage(policy, load_classifier(None, policy), 60.0, 3600.0)
    stage.engine.detectors.append(_Crashing())
    _feed(demo_inputs[:400], 0, stage)
    assert _crashes(stage.engine).get("crashes_on_every_window", 0) > 0


def test_a_window_without_length_is_refused() -> None:
    t = 1_767_225_600.0
    w = {"window_id": "w", "workload_id": "wl", "window_start": t, "window_end": t, "sample_count": 1,
         "device_count": 1, "node_count": 1, "device_seconds": 1.0, "flop": 0.0, "flop_low": 0.0, "flop_high": 0.0,
         "basis": "none"}
    with pytest.raises(InvalidMessage, match="is not after window_start"):
        validate(WindowAggregate, w)
    assert validate(WindowAggregate, w | {"window_end": t + 60}).window_end == t + 60
    with pytest.raises(InvalidMessage, match="window_start"):  # epoch seconds after 2000 and before 10000
        validate(WindowAggregate, w | {"window_start": 1e30, "window_end": 2e30})


def test_demo_inputs_hold_every_kind(demo_inputs: list) -> None:
    assert {k for k, _ in demo_inputs} == {"win", "cip", "alloc"} and len(demo_inputs) > 1000
