"""A verdict covers the whole run (issue 14): the engine judges every block of HISTORY_K windows as it completes and
keeps a bounded run-level summary, so a long run is not judged on its last 16 windows; the run-level rule is the one
`trainwatch classify` applies to a whole file (classifier.combine_parts)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import pytest

from detectors.classifier import combine_parts
from detectors.classifier_base import Verdict
from detectors.engine import DetectEngine
from detectors.snapshot import from_split, split
from detectors.state import HISTORY_K, VerdictSummary, combine_verdicts
from schemas.detection import Detection
from tests.detector_builders import INFERENCE, T0, W, cip, demo, window

T = 1e18  # demo policy training threshold


def feed(engine: DetectEngine, windows: Sequence[Any]) -> tuple[list[Detection], list[str]]:
    """Windows to the engine; the detections and the run-level band after each window."""
    out: list[Detection] = []
    bands: list[str] = []
    for w in windows:
        out += engine.on_window(w)
        out += engine.apply_owner_messages()
        (run,) = engine.runs.values()
        bands.append(run.verdict["band"])
    return out, bands


def compute_case(dets: list[Detection]) -> Detection:
    (d,) = [d for d in dets if d.detector_id == "compute_threshold"]
    return d


def test_a_long_run_that_trained_early_and_idles_at_the_end_is_still_training_dated_by_its_early_part():
    """48 windows of training below the threshold, then busy non-training work that crosses it: when it crosses,
    the last 16 windows alone say not_training (the old engine opened no case); the run verdict says training, and
    the classification time (knowledge_at) comes from the early part."""
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-f"))
    train = [window("wl-1", "acct-f", i, flop=1e16) for i in range(48)]
    idle = [window("wl-1", "acct-f", 48 + i, flop=3.5e16, features=INFERENCE) for i in range(16)]
    dets, bands = feed(eng, train + idle)
    assert eng.classifier.predict(eng.runs[next(iter(eng.runs))].history).band == "not_training"  # the last 16
    assert set(bands) == {"training"}
    d = compute_case(dets)
    assert d.outcome == "reportable"
    crossing = T0 + 62 * W + (T - 4.8e17 - 14 * 3.5e16) / 3.5e16 * W  # in the 63rd window, inside the idle part
    assert d.event_time == pytest.approx(crossing)
    assert d.evidence["knowledge_at_from"]["classified_training"] == T0  # dated by the early part, not "now"
    basis = d.evidence["run"]["verdict_basis"]
    assert basis["blocks_completed"] == 3 and basis["parts_judged"] == 4
    assert basis["windows_by_band"] == {"training": 48.0, "not_training": 15.0}
    assert basis["training_part"]["start"] == T0 and basis["first_training_part"]["start"] == T0
    assert d.evidence["classifier"]["band"] == "training"


def test_training_in_a_minority_of_a_long_run_is_never_not_training_and_keeps_its_time():
    """16 training windows, then 64 that look idle: less than half the run trained, so the run is uncertain
    (mixed_phases) - never a confident not_training - and a foreign run over the threshold opens needs_review,
    its evidence naming the training block and when it ran."""
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-f"))
    train = [window("wl-1", "acct-f", i, flop=1e16) for i in range(16)]
    idle = [window("wl-1", "acct-f", 16 + i, flop=1.5e16, features=INFERENCE) for i in range(64)]
    dets, bands = feed(eng, train + idle)
    assert "not_training" not in bands[16:]
    d = compute_case(dets)
    assert d.outcome == "needs_review"
    assert d.evidence["classifier"]["band"] == "uncertain" and "mixed_phases" in d.evidence["classifier"]["reasons"]
    basis = d.evidence["run"]["verdict_basis"]
    assert basis["training_part"]["start"] == T0 and basis["training_part"]["end"] == T0 + 16 * W
    assert basis["windows_by_band"]["training"] == 16.0


class _StubClassifier:
    """not_training in distribution with evidence, unless a window of the history is marked out of distribution
    (`features["ood"]`): then uncertain, out_of_distribution - as the fitted model's guard answers."""

    def predict(self, history: Sequence[Any]) -> Verdict:
        if any((getattr(w, "features", None) or w.get("features") or {}).get("ood") for w in history):
            return Verdict(0.1, "uncertain", [("mean_gpu_util__mean", -0.2)], "stub", "1",
                           reasons=("out_of_distribution",), out_features=("mean_power__max",),
                           in_distribution=False)
        return Verdict(0.03, "not_training", [("mean_gpu_util__mean", -0.3)], "stub", "1", in_distribution=True)


def test_one_block_out_of_distribution_means_the_run_is_never_confidently_not_training():
    eng = DetectEngine(demo(), classifier=_StubClassifier())
    eng.on_cip(cip("acct-f"))
    odd = {**INFERENCE, "ood": 1.0}
    ws = [window("wl-1", "acct-f", i, flop=1.5e16, features=odd if i == 20 else INFERENCE) for i in range(80)]
    dets, bands = feed(eng, ws)
    assert bands[:20] == ["not_training"] * 20  # a clean start is judged as it is
    assert "not_training" not in bands[20:]  # once a judged block was out of distribution, never again
    d = compute_case(dets)
    assert d.outcome == "needs_review"
    v = d.evidence["classifier"]
    assert v["band"] == "uncertain" and v["in_distribution"] is False and "out_of_distribution" in v["reasons"]
    assert v["out_features"] == ["mean_power__max"]
    assert d.evidence["run"]["verdict_basis"]["parts_out_of_distribution"] >= 1


def test_a_clean_long_run_is_not_training_and_the_summary_stays_bounded_and_persisted():
    eng = DetectEngine(demo(), classifier=_StubClassifier())
    eng.on_cip(cip("acct-f"))
    sizes = []
    for n in (200, 2000):
        start = next(iter(eng.runs.values())).judged["windows"] if eng.runs else 0
        _, bands = feed(eng, [window("wl-1", "acct-f", i, flop=1e12, features=INFERENCE) for i in range(start, n)])
        assert set(bands) == {"not_training"}
        (run,) = eng.runs.values()
        sizes.append(len(json.dumps([run.judged, run.verdict])))  # (`seen` has its own bound, SEEN_K)
        assert run.judged["windows"] == n and run.judged["blocks"] == n // HISTORY_K
    assert sizes[1] < sizes[0] * 1.1  # bounded: ten times the windows, about the same state
    # persisted: the per-account split a runtime writes carries it, and a restored engine goes on from it
    shared, parts = split(eng)
    back = from_split(shared, parts, demo(), classifier=_StubClassifier())
    assert back.to_dict() == eng.to_dict()
    assert next(iter(back.runs.values())).judged["blocks"] == 2000 // HISTORY_K


def test_a_replayed_window_is_not_judged_twice():
    eng = DetectEngine(demo())
    eng.on_cip(cip("acct-f"))
    ws = [window("wl-1", "acct-f", i, flop=1e15) for i in range(20)]
    feed(eng, ws)
    feed(eng, ws)  # a replay: same figures, nothing changes
    again = [window("wl-1", "acct-f", i, flop=2e15) for i in range(18, 20)]  # a correction: replaces, not adds
    feed(eng, again)
    (run,) = eng.runs.values()
    assert (run.judged["windows"], run.judged["covered"], run.judged["blocks"]) == (20, 16, 1)


def _random_verdict(rng: random.Random) -> Verdict:
    band = rng.choice(["training", "not_training", "uncertain"])
    p = {"training": rng.uniform(0.6, 1.0), "not_training": rng.uniform(0.0, 0.2), "uncertain": rng.uniform(0, 1)}
    reasons = tuple(rng.sample(["out_of_distribution", "missing_information", "between_bands"], rng.randint(1, 2))) \
        if band == "uncertain" else ()
    wide = rng.random() < 0.3
    pt = round(p[band], 4)
    return Verdict(pt, band, [(f"f{rng.randint(0, 9)}", rng.uniform(-1, 1))], "m/full", "5", reasons,
                   tuple(rng.sample(["a", "b", "c"], rng.randint(0, 2))), tuple(rng.sample(["power", "memory"],
                                                                                           rng.randint(0, 1))),
                   max(0.0, pt - 0.1) if wide else None, min(1.0, pt + 0.1) if wide else None,
                   rng.choice([True, True, False, None]))


def _reference_rule(parts: Sequence[Verdict], weights: Sequence[float]) -> Verdict:
    """The whole-run rule spelled out over the full list of parts (what the bounded summary must reproduce)."""
    total = sum(weights)
    p = sum(v.p_training * w for v, w in zip(parts, weights, strict=True)) / total
    trained = sum(w for v, w in zip(parts, weights, strict=True) if v.band == "training")
    if all(v.band == "not_training" for v in parts):
        band, reasons = "not_training", ()
    elif trained / total >= 0.5:
        band, reasons = "training", ()
    else:
        band = "uncertain"
        mixed = ["mixed_phases"] if len({v.band for v in parts}) > 1 else []
        reasons = tuple(dict.fromkeys([*mixed, *(r for v in parts for r in v.reasons)])) or ("between_bands",)
    strong = [v for v in parts if v.band == "training"]
    lead = max(strong, key=lambda v: v.p_training) if band == "training" else parts[-1]
    wide = any(v.p_low is not None for v in parts)

    def avg(side: str) -> float:
        return round(sum((getattr(v, side) if getattr(v, side) is not None else v.p_training) * w
                         for v, w in zip(parts, weights, strict=True)) / total, 4)

    ind = [v.in_distribution for v in parts]
    return Verdict(round(p, 4), band, list(lead.top_features), lead.model_id, lead.model_version, reasons,
                   tuple(dict.fromkeys(f for v in parts for f in v.out_features)),
                   tuple(dict.fromkeys(f for v in parts for f in v.missing)),
                   avg("p_low") if wide else None, avg("p_high") if wide else None,
                   None if None in ind else all(ind))


@pytest.mark.parametrize("seed", range(5))
def test_the_engine_rule_is_the_one_classify_applies_to_a_whole_run(seed: int):
    """One definition: `trainwatch classify` (classifier.combine_parts, over a whole file) and the engine (a run's
    bounded summary, folded block by block with the open block judged last) give the whole-run rule spelled out
    over every part, part for part."""
    rng = random.Random(seed)
    for _ in range(200):
        parts = [_random_verdict(rng) for _ in range(rng.randint(1, 7))]
        weights = [rng.choice([16, 16, 16, 9]) for _ in parts]
        want = _rounded(_reference_rule(parts, weights))
        assert _rounded(combine_parts(parts, weights)) == want, (parts, weights)
        engine = VerdictSummary()  # as the engine: completed blocks folded, the newest judged as the open one
        for v, w in zip(parts[:-1], weights[:-1], strict=True):
            engine.fold(v, w)
        got = engine.decide(parts[-1], weights[-1]) if engine.blocks else combine_verdicts(parts, weights)
        assert _rounded(got) == want, (parts, weights)


def _rounded(v: Verdict) -> dict[str, Any]:
    """A verdict's fields, P to 3 places (the two sum in another order: the fourth place may differ)."""
    d = v.to_dict()
    return {**d, **{k: None if d[k] is None else round(d[k], 3) for k in ("p_training", "p_low", "p_high")}}


def test_summary_merge_is_folding_the_older_parts_first():
    rng = random.Random(7)
    parts = [_random_verdict(rng) for _ in range(6)]
    older, newer, whole = VerdictSummary(), VerdictSummary(), VerdictSummary()
    for i, v in enumerate(parts):
        (older if i < 3 else newer).fold(v, 16)
        whole.fold(v, 16)
    newer.merge(older)
    assert _rounded(newer.decide()) == _rounded(whole.decide())
