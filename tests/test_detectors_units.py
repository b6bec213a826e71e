"""Foreign-person determination, the interim rule classifier and the run stitcher, each on its own."""

from __future__ import annotations

import pytest

from detectors.classifier_base import RuleClassifier
from detectors.foreign_person import determine
from detectors.runs import RunStitcher, footprint_of
from schemas.cip import Reseller
from schemas.policy import load_policy
from tests.detector_builders import INFERENCE, SMI_ONLY, TRAINING, W, cip, demo, owner, window, with_foreign


def test_foreign_person_rules():
    p = demo()
    assert determine(cip("a", us_person=True, country="US"), p).status == "us_person"
    assert determine(cip("a", us_person=False), p).is_foreign
    missing = determine(None, p)
    assert missing.is_foreign and missing.cip_missing and missing.incomplete
    assert not determine(None, with_foreign(p, unknown_is_foreign=False)).is_foreign
    by_owner = determine(cip("a", us_person=True, country="US", owners=[owner("o1", 25.0)]), p)
    assert by_owner.is_foreign and by_owner.foreign_owners == ["o1"]
    small = determine(cip("a", us_person=True, country="US", owners=[owner("o2", 10.0)]), p)
    assert not small.is_foreign
    control = determine(cip("a", us_person=True, country="US", owners=[owner("o3", 5.0, control=True)]), p)
    assert control.foreign_owners == ["o3"]
    resold = cip("a", us_person=True, country="US")
    resold.reseller = Reseller(name="r", country="SG")
    assert determine(resold, p).reasons == ["foreign_reseller:r"]
    assert not determine(resold, with_foreign(p, foreign_reseller_counts=False)).is_foreign


def test_eu_profile_puts_everyone_in_scope():
    d = determine(cip("a", us_person=True, country="US", owners=[owner("o", 40, us_person=True)]),
                  load_policy("eu-ai-act"))
    assert d.is_foreign and d.foreign_owners == ["o"] and "policy_all_in_scope" in d.reasons


@pytest.mark.parametrize("features, nodes, band", [
    (TRAINING, 2, "training"), (INFERENCE, 1, "not_training"), (SMI_ONLY, 2, "uncertain"),
    ({"mean_tensor": 0.4, "fp64_share": 0.8}, 4, "not_training"), ({"mean_tensor": 0.01, "mean_dram": 0.9}, 1,
                                                                   "not_training"), (None, 1, "uncertain"),
])
def test_rule_classifier_bands(features, nodes, band):
    hist = [window("w", "a", i, nodes=nodes, features=features) for i in range(3)]
    v = RuleClassifier(0.8, 0.2).predict(hist)
    assert v.band == band and 0.0 <= v.p_training <= 1.0 and v.model_id == "rule"


def test_stitcher_uses_known_stops_and_round_trips():
    s = RunStitcher(W)
    fp = footprint_of({"NVIDIA H100 80GB HBM3": 8}, 8)
    assert fp == footprint_of({"H100": 8}, 8)
    r1 = s.assign("a", "j1", None, fp, 0.0, 60.0)
    s.note_stop("j1", 90.0)
    s2 = RunStitcher.from_dict(s.to_dict())
    assert s2.assign("a", "j2", None, fp, 60.0, 120.0) == r1  # restarted inside the same aligned window
    assert s.assign("a", "j3", None, fp, 60.0, 120.0) == r1
