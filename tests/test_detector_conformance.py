"""One set of shared checks over every registered detector (as scikit-learn's parametrize_with_checks)."""

from __future__ import annotations

import pytest

from detectors import registry
from detectors.base import DetectContext, Detector
from detectors.classifier_base import Verdict
from detectors.compute_threshold import ComputeThreshold
from detectors.foreign_person import determine
from detectors.state import AccountState, OwnerState, RunState
from tests.detector_builders import T0, W, alloc, cip, demo, window

POLICY = demo()
#: What the engine may call on a detector besides `detect`: declared on the base class (detectors/base.py).
HOOKS = ("update", "claims_run")
FLAGS = ("owner_level", "reevaluates_runs_on_cip", "dated_by_first_event", "reads_run_crossing")


def contexts() -> list[DetectContext]:
    """A context rich enough that every shipped detector finds something, and a bare one."""
    record = cip("acct-c", country="KP", updated_at=T0)
    acct = AccountState("acct-c", potential_prev=1e16, potential=5e18, potential_at=T0,
                        held={"r": {"accelerator": "H100", "count": 256, "interconnect_gbps": 400,
                                    "datacenter": "dc1"}},
                        activity={"runs": {"old": {"first": T0 - 9000, "band": "not_training", "crossed": False}}},
                        active=[[T0 + W, T0 + W]])
    crossed = {"at": T0 + 2 * W, "reason": "compute_used", "used": 2e18, "projected": None}
    run = RunState("run-c", "acct-c", used=2e18, used_low=1e18, used_high=4e18, started_at=T0, last_end=T0 + 3 * W,
                   crossed=crossed, verdict={"band": "training", "p_training": 0.9, "since": T0})
    own = OwnerState("own-c", accounts=["acct-b", "acct-c"],
                     crossed={"at": T0, "basis": "used", "account_id": "acct-c", "used": 2e18, "used_low": 1e18,
                              "used_high": 3e18, "projected": 2e18, "runs": {}, "all_training": True})
    rich = DetectContext(POLICY, W, "acct-c", determine(record, POLICY), record, acct, run, ["wl"], [], own,
                         Verdict(0.9, "training", [("tensor_active", 0.6)], "rule", "1"))
    bare = DetectContext(POLICY, W, "acct-z", determine(None, POLICY))
    return [rich, bare]


def events() -> list[object]:
    return [window("wl", "acct-c", 1, features=None), alloc("acct-c", "reserved", T0, count=64,
                                                            reserved_until=T0 + 7200, gbps=400),
            cip("acct-c", country="KP", updated_at=T0), None]


@pytest.mark.parametrize("det_id", sorted(registry.registered()))
def test_detector_conformance(det_id):
    cls = registry.registered()[det_id]
    assert issubclass(cls, Detector)
    assert cls.id == det_id and isinstance(cls.version, int) and cls.version >= 1
    assert cls.severity in ("info", "low", "medium", "high", "critical")
    assert cls.maturity in ("experimental", "test", "stable") and cls.description
    d1, d2 = cls(**cls.example_params), cls(**cls.example_params)
    found = 0
    for ctx in contexts():
        for ev in events():
            a, b = d1.detect(ctx, ev), d2.detect(ctx, ev)
            assert isinstance(a, list)
            assert [x.model_dump() for x in a] == [x.model_dump() for x in b]  # deterministic
            for det in a:
                assert det.detector_id == cls.id and det.detector_version == cls.version
                assert det.policy_id == POLICY.id and det.policy_version == POLICY.version
                assert det.evidence["policy"]["id"] == POLICY.id and det.evidence["detector"]["id"] == cls.id
                assert "foreign_person" in det.evidence and det.account_id == ctx.account_id
                assert isinstance(d1.claims_run(det), bool)
            found += len(a)
    assert found, f"{det_id} found nothing in a context built to trigger it"


@pytest.mark.parametrize("det_id", sorted(registry.registered()))
def test_detector_declares_its_hooks(det_id):
    """Every hook the engine calls is declared on Detector: a detector overrides those and adds no public method
    the engine would have to find by name; its flags are plain booleans; `update` returns None on every input."""
    cls = registry.registered()[det_id]
    for flag in FLAGS:
        assert isinstance(getattr(cls, flag), bool), flag
    public = {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}
    assert public <= {"detect", *HOOKS}, f"undeclared hooks on {det_id}: {sorted(public - {'detect', *HOOKS})}"
    d = cls(**cls.example_params)
    for ctx in contexts():  # fresh contexts: update may write into ctx.account
        for ev in events():
            assert d.update(ctx, ev) is None
        if cls.reads_run_crossing:  # called with no event when a late reservation re-dates a run's crossing
            assert all(det.detector_id == cls.id for det in d.detect(ctx, None))


def test_registry_is_the_one_list():
    assert [c.id for c in registry.DETECTORS] == sorted(registry.registered())
    assert [type(d) for d in registry.build()] == sorted(registry.DETECTORS, key=lambda c: c.id)
    assert sum(c.owner_level for c in registry.DETECTORS) == 1  # the owner aggregate, found by its flag


def test_duplicate_detector_id_fails_at_registration():
    again = type("Again", (Detector,), {"id": "compute_threshold", "description": "dup"})
    with pytest.raises(TypeError, match="already registered"):
        registry.registered((*registry.DETECTORS, again))
    with pytest.raises(TypeError, match="not a Detector"):
        registry.build(classes=(*registry.DETECTORS, Detector))  # no id
    assert registry.registered()["compute_threshold"] is ComputeThreshold  # defining `again` registered nothing
