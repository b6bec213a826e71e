"""Missing information is never evidence, abstention outside the fitted region, whole-run verdicts, and the
policy's asymmetric stakes for a `not_training` verdict."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

from detectors.classifier import GbmWorkloadClassifier, TierModel, combine_parts, default_gbm
from detectors.classifier_base import Verdict
from detectors.compute import BASIS_NONE, BASIS_UTIL_POWER, estimate_flop
from detectors.compute_threshold import not_training_check, outcome_for
from schemas.policy import load_policy

TDP, MEM = 700.0, 80 * 1024.0


def _win(i: int, util: float, pfrac: float, fb: float, devices: int = 8) -> dict:
    f = {"mean_gpu_util": util, "std_gpu_util": 0.05, "mean_power": pfrac, "std_power": 0.02,
         "mean_power_watts": pfrac * TDP, "std_power_watts": 0.02 * TDP, "mean_fb_used": fb, "std_fb_used": 0.01,
         "mean_fb_used_mib": fb * MEM, "std_fb_used_mib": 0.01 * MEM, "mean_fb_total_mib": None}
    return {"workload_id": "w", "window_start": 60.0 * i, "window_end": 60.0 * (i + 1), "device_count": devices,
            "node_count": 1, "basis": "utilisation_power", "features": f}


def _hist(rng: np.random.Generator, training: bool, n: int) -> list[dict]:
    # power separates the classes; utilisation and memory overlap (as on real fleets)
    p = rng.uniform(0.6, 0.9) if training else rng.uniform(0.12, 0.35)
    return [_win(i, float(rng.uniform(0.3, 1.0)), float(np.clip(p + rng.normal(0, 0.02), 0, 1)),
                 float(rng.uniform(0.3, 0.9))) for i in range(n)]


@pytest.fixture(scope="module")
def power_model() -> GbmWorkloadClassifier:
    rng = np.random.default_rng(5)
    H, y, g = [], [], []
    for k in range(300):
        t = k % 2 == 0
        H.append(_hist(rng, t, int(rng.integers(2, 17))))
        y.append(int(t))
        g.append(f"fam{k % 5}")
    tier = TierModel(default_gbm().set_params(max_iter=30, min_samples_leaf=10), cv_folds=3)
    return GbmWorkloadClassifier(tier, history_k=16).fit(H, y, g)


def _strip(h: list[dict], keys: tuple[str, ...]) -> list[dict]:
    return [{**w, "features": {k: v for k, v in w["features"].items() if k not in keys}} for w in h]


def test_unknown_accelerator_widens_instead_of_calling_not_training(power_model):
    rng = np.random.default_rng(9)
    h = _hist(rng, True, 8)
    assert power_model.predict(h).band == "training"
    # what ingest sends for an unknown or absent model name: watts and MiB, no fractions of TDP / memory
    v = power_model.predict(_strip(h, ("mean_power", "std_power", "mean_fb_used", "std_fb_used")))
    assert v.band != "not_training"
    t_low = power_model.tiers_["smi"].t_low_
    assert v.p_training > t_low and v.p_low is not None and v.p_low <= v.p_training <= v.p_high
    assert any(m.startswith("power") for m in v.missing)


def test_absent_field_widens_the_answer_towards_neither_class(power_model):
    rng = np.random.default_rng(10)
    for training in (True, False):
        h = _strip(_hist(rng, training, 8), ("mean_power", "std_power", "mean_power_watts", "std_power_watts"))
        v = power_model.predict(h)
        assert v.band == "uncertain" and "missing_information" in v.reasons and "power" in v.missing
        assert 0.15 < v.p_training < 0.85  # the mean over both classes' power, not a guess from the model's NaN branch
        assert v.p_low < v.p_high


def test_outside_the_fitted_region_is_uncertain_and_names_the_features(power_model):
    rng = np.random.default_rng(11)
    h = _hist(rng, True, 8)
    for w in h:
        w["features"]["mean_gpu_util"] = 0.02  # never seen with training-level power
        w["features"]["mean_fb_used"] = 0.005
    v = power_model.predict(h)
    assert v.band == "uncertain" and "out_of_distribution" in v.reasons and v.in_distribution is False
    assert v.out_features and all("__" in f for f in v.out_features)
    assert power_model.predict(_hist(rng, True, 8)).in_distribution is True


def test_a_verdict_covers_the_whole_run(power_model):
    rng = np.random.default_rng(12)
    train = _hist(rng, True, 40)
    idle = _hist(rng, False, 40)
    run = [*train[:30], *idle[:16]]
    for i, w in enumerate(run):
        w["window_start"], w["window_end"] = 60.0 * i, 60.0 * (i + 1)
    assert power_model.predict(run[-16:]).band == "not_training"  # the last 16 windows alone
    assert power_model.predict(run).band == "training"  # the whole run: 30 of 46 windows train
    mostly_idle = [*idle[:30], *train[:10]]
    for i, w in enumerate(mostly_idle):
        w["window_start"], w["window_end"] = 60.0 * i, 60.0 * (i + 1)
    v = power_model.predict(mostly_idle)
    assert v.band == "uncertain" and "mixed_phases" in v.reasons  # never a confident not_training


def test_combine_parts_rules():
    t = Verdict(0.95, "training", [("a", 0.3)], "m/smi", "4", in_distribution=True)
    n = Verdict(0.02, "not_training", [("a", -0.3)], "m/smi", "4", in_distribution=True)
    u = Verdict(0.5, "uncertain", [], "m/smi", "4", reasons=("between_bands",), in_distribution=True)
    assert combine_parts([n, n], [16, 16]).band == "not_training"
    assert combine_parts([n, t], [16, 16]).band == "training"
    c = combine_parts([n, n, u], [16, 16, 16])
    assert c.band == "uncertain" and c.reasons[0] == "mixed_phases"


def test_not_training_closes_only_when_confident_in_distribution_and_explained():
    needs = load_policy("demo").uncertainty.not_training_needs
    assert set(needs) == {"confident", "in_distribution", "evidence"}
    good = Verdict(0.03, "not_training", [("mean_power__mean", -0.4)], "m/smi", "4", in_distribution=True)
    assert good.closes_not_training(needs) == (True, [])
    assert outcome_for(True, "not_training", not_training_check(good, needs)["unmet"]) is None
    ood = Verdict(0.03, "not_training", [("mean_power__mean", -0.4)], "m/smi", "4", in_distribution=False)
    silent = Verdict(0.03, "not_training", [], "m/smi", "4", in_distribution=True)
    rule = Verdict(0.05, "not_training", [("tensor_active", 0.01)], "rule", "1")  # no fitted region: not checked
    assert rule.closes_not_training(needs) == (True, [])
    assert Verdict(0.05, "not_training", [], "rule", "1").closes_not_training(needs) == (False, ["evidence"])
    for v, unmet in ((ood, ["in_distribution"]), (silent, ["evidence"])):
        check = not_training_check(v, needs)
        assert check["unmet"] == unmet and not check["closes"]
        assert outcome_for(True, "not_training", check["unmet"]) == "needs_review"  # foreign: the case opens
        assert outcome_for(False, "not_training", check["unmet"]) is None  # not foreign: nothing to report
    assert Verdict.from_dict(ood.to_dict()) == ood


def test_power_only_and_util_only_compute_estimates_have_a_basis_and_a_band():
    nan = np.array([np.nan])
    one, peak = np.array([1.0]), np.array([1e15])
    point, low, high, basis = estimate_flop(one, peak, peak, peak * 2, nan, nan, np.array([0.6]))
    assert basis[0] == BASIS_UTIL_POWER and 0 < low[0] < point[0] < high[0]
    assert high[0] / low[0] >= 4  # power cannot tell matrix work from memory traffic: an honest, wide band
    _, _, _, b_none = estimate_flop(one, peak, peak, peak * 2, nan, nan, nan)
    assert b_none[0] == BASIS_NONE
    _, l_u, _, b_u = estimate_flop(one, peak, peak, peak * 2, nan, np.array([0.8]), nan)
    _, l_up, _, _ = estimate_flop(one, peak, peak, peak * 2, nan, np.array([0.8]), np.array([0.9]))
    assert b_u[0] == BASIS_UTIL_POWER and l_u[0] < l_up[0]  # without power the low end is wider


def test_catalog_has_the_rented_parts_each_with_a_source_and_pcie_is_not_sxm():
    from detectors.catalog import load_catalog, resolve

    assert all(a.source and a.peak_flops.get("bf16") for a in load_catalog().values())
    for name, key in (("Tesla V100-SXM2-32GB", "V100"), ("Tesla V100-PCIE-16GB", "V100-PCIE"), ("Tesla T4", "T4"),
                      ("NVIDIA A10G", "A10G"), ("NVIDIA L40", "L40"), ("NVIDIA L4", "L4"),
                      ("NVIDIA RTX 6000 Ada Generation", "RTX6000-ADA"), ("NVIDIA GH200 480GB", "GH200"),
                      ("AMD Instinct MI210", "MI210"), ("NVIDIA H20", "H20"),
                      ("NVIDIA A100-PCIE-40GB", "A100-PCIE-40GB"),
                      ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA A100-SXM4-80GB", "A100")):
        assert resolve(name).key == key, name
    pcie = resolve("NVIDIA A100-PCIE-40GB")
    assert (pcie.tdp_w, pcie.memory_gib) == (250.0, 40.0)  # not the SXM row's 400 W / 80 GiB
    assert resolve("TITAN X") is None  # unknown stays unknown: the classify basis says unknown_accelerator


#: The first window of a simulated 24-GPU pretraining run on nvidia-smi-only nodes (eval scenario seed 7,
#: wl-0a3db6233a7bf6e3f864, hopper-cloud), its nvidia-smi-level features as the engine hands them over: version 5's
#: smi tier gave it P 0.000 on its first three windows (issue 14, young runs).
PRETRAIN_SMI_WINDOW = {
    "mean_gpu_util": 0.9778, "std_gpu_util": 0.0224, "mean_mem_copy_util": 0.2986, "std_mem_copy_util": 0.0169,
    "mean_power": 0.4795, "std_power": 0.0133, "mean_fb_used": 0.8492, "std_fb_used": 0.0028,
    "mean_sm_clock": 1525.5579, "std_sm_clock": 32.3138, "mean_mem_clock": 4000.0, "std_mem_clock": 0.0,
    "sync_devices_util": 0.1494, "sync_nodes_util": 0.7795, "sync_devices_power": 0.071, "sync_nodes_power": 0.4188,
    "profile_cv_util": 0.0075, "profile_ac1_util": 0.1157, "profile_cv_power": 0.0062, "profile_ac1_power": 0.0013,
    "mem_occupancy": 0.8492, "devices_per_node": 8.0,
}


def _pretrain_run(n: int) -> list[dict]:
    """The first `n` windows of a 24-GPU pretraining run as an nvidia-smi-only provider sends them."""
    return [{"workload_id": "pre", "window_start": 60.0 * i, "window_end": 60.0 * (i + 1), "device_count": 24,
             "node_count": 3, "basis": "utilisation_power", "features": dict(PRETRAIN_SMI_WINDOW)} for i in range(n)]


def _young_prefixes(seed: int) -> tuple[list[list[dict]], list[int]]:
    """Every prefix (1..16 windows) of 80 runs, half training; a training run's first three windows look idle
    (loading data, compiling), so P from them alone is confidently wrong."""
    rng = np.random.default_rng(seed)
    prefixes, y = [], []
    for k in range(80):
        t = k % 2 == 0
        h = _hist(rng, t, 16)
        if t:
            for w in h[:3]:
                w["features"].update(mean_power=0.15, mean_power_watts=0.15 * TDP)
        prefixes += [h[:n] for n in range(1, 17)]
        y += [int(t)] * 16
    return prefixes, y


def test_a_young_pretraining_run_is_never_confidently_not_training():
    from detectors.classifier import SHORT_HISTORY, UNLIKE_KIND
    from detectors.model_artifact import load_artifact

    model, meta = load_artifact(None)
    need = model.min_windows("smi")
    assert 1 < need <= model.history_k and meta.metrics["min_history_windows"]["smi"] == need
    run = _pretrain_run(need)
    x = model.featurizer_.transform([run[:1]])
    # what the tier alone says of its first window: up to 6.2, P in the not_training band (the error the rule exists
    # for), withdrawn by the kind support (it rests on a serving kind the run is unlike); 6.3, fitted on four seeds,
    # puts it above the band. Never a confident not_training either way.
    first = model.assess(x, young=np.array([False]))[0]
    assert first["band"] != "not_training" and first["in_distribution"]
    assert first["p"] > model.tiers_["smi"].t_low_ or first["reasons"] == (UNLIKE_KIND,)
    for n in range(1, need):  # uncertain: short_history where P reads not_training (6.3: the kind support here)
        v = model.predict(run[:n])
        assert v.model_id.endswith("/smi") and v.band == "uncertain", (n, v)
        assert SHORT_HISTORY in v.reasons or v.p_training > model.tiers_["smi"].t_low_, (n, v)
    # its first window marked young: uncertain (short history where P reads not_training; 6.3: the kind support)
    young = model.assess(x, young=np.array([True]))[0]
    assert young["band"] == "uncertain" and ({SHORT_HISTORY, UNLIKE_KIND} & set(young["reasons"]))


def test_fit_young_measures_the_windows_a_not_training_call_needs(power_model):
    from detectors.classifier import SHORT_HISTORY

    prefixes, y = _young_prefixes(13)
    model = copy.deepcopy(power_model)  # the module's fixture stays unmeasured
    assert model.min_windows("smi") == 1  # unmeasured: no rule
    table = model.fit_young(prefixes, y)
    need = model.min_windows("smi")
    assert need > 3 and table["smi"]["min_history_windows"] == need
    assert table["smi"]["per_length"]["1"]["of_them_training"] > 0  # what it measured: young runs called idle
    young = [h for h, t in zip(prefixes, y, strict=True) if t and len(h) < need]
    verdicts = [model.predict(h) for h in young]
    assert all(v.band != "not_training" for v in verdicts)
    assert any(SHORT_HISTORY in v.reasons for v in verdicts)


def test_an_old_runs_history_of_corrections_is_not_young():
    from detectors.classifier import SHORT_HISTORY
    from detectors.model_artifact import load_artifact

    model, _ = load_artifact(None)
    need = model.min_windows("smi")
    win = _pretrain_run(model.history_k // 2)
    assert len(win) < need
    # what the engine holds for an old run whose every window came twice (a late partial, then its correction)
    engine_history = [w for w in win for _ in (0, 1)][-model.history_k :]
    assert len(engine_history) == model.history_k
    assert SHORT_HISTORY not in model.predict(engine_history).reasons
    assert SHORT_HISTORY in model.predict(win).reasons  # the same windows delivered once each: a young run


def test_a_young_runs_p_reads_towards_the_prior_and_makes_no_call_confident(power_model):
    prefixes, y = _young_prefixes(17)
    model = copy.deepcopy(power_model)
    assert not getattr(model, "young_shrink_", {})  # unmeasured: P as the tier gives it
    table = model.fit_young(prefixes, y)
    fit = model.young_shrink_["smi"]
    w = fit["weights"]
    assert len(w) == model.history_k and w[-1] == 1.0 and all(a <= b for a, b in itertools.pairwise(w))
    assert w[0] < 0.9 and table["smi"]["shrink"]["brier"]["1"]["shrunk"] < table["smi"]["shrink"]["brier"]["1"]["raw"]
    X = model.featurizer_.transform(prefixes)
    raw = model.assess(X, young=np.zeros(len(X), dtype=bool))
    young = model.assess(X, young=np.ones(len(X), dtype=bool))
    n = X[:, model.featurizer_.feature_names_out_.index("history_windows")]
    for a, b, m in zip(raw, young, n, strict=True):
        assert b["band"] in (a["band"], "uncertain")  # shrinking never makes a call confident
        if m < model.history_k:  # between the tier's P and the prior, by the windows seen
            assert min(a["p"], fit["prior"]) - 1e-9 <= b["p"] <= max(a["p"], fit["prior"]) + 1e-9
        else:
            assert b["p"] == a["p"]


def test_the_packaged_models_first_window_of_a_pretraining_run_reads_near_the_prior():
    from detectors.model_artifact import load_artifact

    model, meta = load_artifact(None)
    fit = model.young_shrink_["smi"]
    run = _pretrain_run(2)
    x = model.featurizer_.transform([run[:1]])
    alone = model.assess(x, young=np.array([False]))[0]["p"]  # the tier alone: 0.000 in 5.1, 0.026 in 6.0, 0.73 in 6.3
    v = model.predict(run[:1])
    # missing history is no evidence: P read towards the base rate (never past it), above the scope baseline's p_low
    # (0.2), still uncertain
    assert v.band == "uncertain" and v.p_training > 0.2
    assert abs(v.p_training - fit["prior"]) < abs(alone - fit["prior"])
    assert min(alone, fit["prior"]) <= v.p_training <= max(alone, fit["prior"])
    assert meta.metrics["young_runs"]["smi"]["shrink"]["weights"] == fit["weights"]


def test_the_packaged_model_checks_training_calls_against_the_kinds_they_rest_on():
    """Version 6.3: on both tiers a confident training call is checked by the kind support too, with a member for
    each training kind (6.2 checked the nvidia-smi tier's only; fitted on four seeds the full tier's check costs no
    F1, and without it H200 capture B's batch inference was confidently training there: model card)."""
    from detectors.model_artifact import load_artifact

    model, meta = load_artifact(None)
    for tier in ("smi", "full"):
        assert model.kind_bands_of(tier) == ("not_training", "training")
        support = model.supports_[tier]
        assert {support.class_[k] for k in support.kinds_} == {0, 1}
    assert meta.params["kind_bands"] == ["not_training", "training"]
    assert meta.params["seeds"] == [7, 11, 1, 2] and meta.model_version == "6.3"


def test_a_not_training_call_is_withdrawn_when_the_run_is_busier_than_any_training_run() -> None:
    """Issue 14 (benchmarks/real_stretch.py): the real captures' training runs, judged whole, drew 0.99 of TDP, past
    every simulated training run, and 6.3 closed them as not_training at P 0.000. The same history of a real idle
    GPU, its power alone raised past the training runs' range: the not_training call is withdrawn and says why; the
    rule off, the call stands (so it is the rule, not P, that moved)."""
    from detectors.classifier import BUSIER, training_load_bounds
    from detectors.model_artifact import load_artifact
    from pipeline.gpu_capture import CAPTURE_DIR, capture_runs, stretch_run
    from pipeline.model_train import histories_from_messages
    from schemas.serde import dumps

    if not (CAPTURE_DIR / "samples.jsonl").is_file():
        pytest.skip("capture not in this checkout")
    model, _ = load_artifact(None)
    names = model.featurizer_.feature_names_out_
    bounds = {names[k]: v for k, v in training_load_bounds(model.supports_["smi"], model.guards_["smi"],
                                                            names).items()}
    assert 0.3 < bounds["mean_power__mean"] < 0.9 and bounds["mean_power__min"] <= bounds["mean_power__mean"]
    idle = stretch_run(capture_runs(tier="smi")["h200-idle"], 20, interval_s=10.0, devices=4)
    hb, _ = histories_from_messages((dumps(s) for s in idle), idle[-1]["ts"] + 3600.0)
    x = model.featurizer_.transform([hb.entries["h200-idle"][-16:]])
    old = np.array([False])
    assert model.assess(x, young=old)[0]["band"] == "not_training"
    busy = x.copy()
    for f in ("mean_power__mean", "mean_power__min"):
        busy[0, names.index(f)] = 0.99
    a = model.assess(busy, young=old)[0]
    assert a["band"] == "uncertain" and a["reasons"] == (BUSIER,) and a["in_distribution"]
    assert set(a["out_features"]) == {"mean_power__mean", "mean_power__min"}
    model._withdraw_busier = lambda *args, **kw: None  # this object only (the artifact is loaded afresh per call)
    assert model.assess(busy, young=old)[0]["band"] == "not_training"
