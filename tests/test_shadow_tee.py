"""ShadowTee conformance: every input of DetectStage, called through the tee, reaches the shadow stages.

The rule (what counts as an input): every public method of DetectStage called on an instance — no leading
underscore, not a property, classmethod or staticmethod — except `to_dict` and `held_to_list`, which only read the
stage's state, and `load_held`, which restores one stage's own persisted state (the tee refuses it). Today that is
on_window, on_windows, begin_batch, end_batch, set_quiet, on_cip, on_allocation, on_time and flush. A method added
to DetectStage is an input by this rule: the tee hands it to the shadows by construction, and this test fails until
the script below calls it, so the shadow fed through the tee is compared with one fed directly for it too.

Behaviourally: the same script of calls drives (a) a live and a shadow stage behind a ShadowTee and (b) a copy of
each stage fed directly, carrying outputs as the runner's _carry does; after every call the shadow behind the tee
must be in the same state as the direct one, and its case service must have been handed the same detections and
CIP records. Each input is also shown to matter: the script without that method's calls ends elsewhere, so a tee
that sent it to the live stage only (the on_windows trap of 261f80d) would fail here.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest

from pipeline.detect.stage import DetectOutput, DetectStage
from pipeline.policy_ops import STAGE_READS, ShadowTee, stage_inputs
from schemas.policy import Policy
from schemas.windows import WindowAggregate
from tests.detector_builders import T0, W, alloc, cip, demo

NOT_INPUTS = {"to_dict", "held_to_list", "load_held"}
LIVE = demo()
SHADOW = LIVE.model_copy(update={"version": "9.0.0-tee", "thresholds": LIVE.thresholds.model_copy(
    update={"training_ops": LIVE.thresholds.training_ops * 2})})


def _win(i: int, *, part: int = 0, rev: int = 0, flop: float = 4e17) -> WindowAggregate:
    start = T0 + i * W
    return WindowAggregate(window_id=f"w-{i}-{part}-{rev}", workload_id="wl-a", account_id="acct-a", partition=part,
                           revision=rev, window_start=start, window_end=start + W, sample_count=48, device_count=8,
                           node_count=2, devices=[f"gpu-{part}-{d}" for d in range(8)], nodes=["n-0", "n-1"],
                           device_seconds=480.0, flop=flop, flop_low=flop * 0.9, flop_high=flop * 2,
                           basis="tensor_active", accelerators={"H100": 8},
                           features={"mean_tensor": 0.6, "sync_nodes_tensor": 0.9, "mean_gpu_util": 0.98,
                                     "mean_power": 0.9})


def _script() -> list[tuple[str, tuple[Any, ...]]]:
    """Every input, each where it changes something (fresh each time: on_windows gets a one-shot generator)."""
    return [
        ("on_cip", (cip("acct-a", updated_at=T0 + 30),)),  # ahead of the clock: held
        ("on_allocation", (alloc("acct-a", "reserved", T0 + 10, reserved_until=T0 + 86_400),)),
        ("on_window", (_win(0),)),
        ("on_window", (_win(1),)),
        ("on_windows", ((w for w in (_win(2), _win(3), _win(4))),)),  # the crossing; a generator, read once
        ("begin_batch", ()),
        ("on_window", (_win(1, rev=1, flop=2e17),)),  # a correction of an applied window: waits for end_batch
        ("end_batch", ()),
        ("on_window", (_win(5, part=1),)),  # a second telemetry partition: windows now wait for it too
        ("on_window", (_win(6),)),
        ("set_quiet", ([1],)),  # partition 1 quiet: what waited only for it applies
        ("on_time", ()),  # partials older than the lateness expire
        ("on_cip", (cip("acct-a", updated_at=T0 + 20 * W, us_person=True),)),  # ahead of the clock again
        ("flush", ()),
    ]


def _plain(x: Any) -> Any:
    return sorted(x, key=repr) if isinstance(x, set | frozenset) else repr(x)


def _state(stage: DetectStage) -> str:
    return json.dumps({"stage": stage.to_dict(), "quiet": sorted(stage.quiet), "applied_to": stage.applied_to},
                      sort_keys=True, default=_plain)


class _Cases:
    """A shadow's case service as the tee uses it: records what it is handed, in order."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def process(self, detections: list[Any], now: float, cips: Any = None) -> list[Any]:
        self.calls.append(("process", [d.model_dump(mode="json") for d in detections],
                           sorted((a, c.updated_at) for a, c in (cips or {}).items())))
        return []

    def update_identity(self, rec: Any, now: float) -> list[Any]:
        self.calls.append(("identity", rec.model_dump(mode="json")))
        return []


def _stage(policy: Policy) -> DetectStage:
    return DetectStage(policy, lateness_s=3 * W)


def _direct(stage: DetectStage, cases: _Cases, skip: str | None = None) -> list[str]:
    """The script fed to `stage` directly (outputs carried as the runner does); its state after each call."""
    cips: dict[str, Any] = {}
    states = []
    for name, args in _script():
        if name != skip:
            out = getattr(stage, name)(*args)
            if isinstance(out, DetectOutput):
                for c in out.cips:
                    if c.account_id not in cips or c.updated_at >= cips[c.account_id].updated_at:
                        cips[c.account_id] = c
                cases.process(out.detections, 1e9, cips)
                for c in out.cips:
                    cases.update_identity(c, 1e9)
        states.append(_state(stage))
    return states


def _inputs_by_rule() -> set[str]:
    out = set()
    for name, raw in inspect.getmembers_static(DetectStage):
        if name.startswith("_") or isinstance(raw, property | classmethod | staticmethod) or not callable(raw):
            continue
        out.add(name)
    return out - NOT_INPUTS


def test_the_script_and_the_tee_cover_every_input_of_detect_stage():
    inputs = _inputs_by_rule()
    assert {"on_window", "on_windows", "begin_batch", "end_batch", "set_quiet", "flush"} <= inputs
    missing = inputs - {name for name, _ in _script()}
    assert not missing, f"DetectStage input(s) {sorted(missing)} not exercised: add them to _script()"
    assert stage_inputs() == inputs  # the tee's own rule (what it tees by construction) says the same


def test_every_input_through_the_tee_reaches_the_shadow_as_if_fed_directly():
    tee_live, tee_shadow, tee_cases = _stage(LIVE), _stage(SHADOW), _Cases()
    tee: Any = ShadowTee(tee_live, [(tee_shadow, tee_cases)], lambda: 1e9)  # type: ignore[list-item]
    ref_live, ref_shadow, ref_cases = _stage(LIVE), _stage(SHADOW), _Cases()
    expected_shadow = _direct(ref_shadow, ref_cases)
    expected_live = _direct(ref_live, _Cases())
    for i, (name, args) in enumerate(_script()):
        getattr(tee, name)(*args)
        assert _state(tee_shadow) == expected_shadow[i], f"call {i} {name}: the shadow behind the tee differs"
        assert _state(tee_live) == expected_live[i], f"call {i} {name}: the live stage behind the tee differs"
    assert tee_cases.calls == ref_cases.calls
    handed = [d for call in tee_cases.calls if call[0] == "process" for d in call[1]]
    assert handed and any(call[0] == "identity" for call in tee_cases.calls)  # the comparison is not of nothing


@pytest.mark.parametrize("name", sorted(_inputs_by_rule()))
def test_each_input_matters_so_a_tee_that_dropped_it_would_fail(name: str):
    full = _direct(_stage(SHADOW), full_cases := _Cases())
    without = _direct(_stage(SHADOW), without_cases := _Cases(), skip=name)
    calls = [i for i, (n, _) in enumerate(_script()) if n == name]
    differs = [i for i in range(len(full)) if i not in calls and full[i] != without[i]]
    assert differs or full_cases.calls != without_cases.calls, f"dropping {name} changes nothing the test sees"


def test_reads_come_from_the_live_stage_settings_go_to_every_stage_and_a_restore_is_refused():
    live, shadow = _stage(LIVE), _stage(SHADOW)
    tee: Any = ShadowTee(live, [(shadow, _Cases())], lambda: 1e9)  # type: ignore[list-item]
    tee.on_window(_win(0))
    for name in STAGE_READS:  # reads change nothing and answer for the live stage
        before = (_state(live), _state(shadow))
        assert getattr(tee, name)() == getattr(live, name)()
        assert (_state(live), _state(shadow)) == before
    assert tee.watermark == live.watermark and tee.held == live.held and tee.policy is LIVE
    tee.partition_wait_s = float("inf")  # a transport's setting reaches every stage, not the tee object alone
    assert live.partition_wait_s == shadow.partition_wait_s == float("inf") and "partition_wait_s" not in vars(tee)
    with pytest.raises(AttributeError, match="no attribute 'partition_wait'"):
        tee.partition_wait = 1.0
    with pytest.raises(TypeError, match="load_held"):
        tee.load_held(live.held_to_list())


def test_an_input_that_returns_no_detect_output_is_refused_loudly():
    class Stage(DetectStage):
        def describe(self) -> dict[str, Any]:  # a read nobody put in STAGE_READS: teed by the rule, so it must fail
            return {"watermark": self.watermark}

    tee: Any = ShadowTee(Stage(LIVE), [(Stage(SHADOW), _Cases())], lambda: 1e9)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="STAGE_READS"):
        tee._tee("describe")
