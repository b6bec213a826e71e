"""The workload classifier: feature extraction, tiers and degraded fields, artifact versioning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sklearn

from detectors.classifier import (
    SAMPLING_FEATURES,
    STATS,
    GbmWorkloadClassifier,
    HistoryFeaturizer,
    TierModel,
    default_gbm,
    feature_tier,
)
from detectors.classifier_base import Verdict, WorkloadClassifier
from detectors.model_artifact import ARTIFACT_FORMAT, SIDECAR_FILE, ArtifactMeta, load_artifact, save_artifact
from schemas.errors import ArtifactError
from schemas.serde import dumps, loads

DCGM = ("tensor_active", "dram_active", "fp64_active")
SMI = ("gpu_util", "power_w", "fb_used_mib")


def _window(i: int, feats: dict[str, float | None], devices: int = 8, nodes: int = 1) -> dict:
    return {"workload_id": "w", "account_id": "a", "window_start": 60.0 * i, "window_end": 60.0 * (i + 1),
            "device_count": devices, "node_count": nodes, "device_seconds": 60.0 * devices, "features": feats}


def synthetic_histories(n: int, seed: int, smi_share: float = 0.3) -> tuple[list[list[dict]], np.ndarray, np.ndarray]:
    """Training: tensor busy + multi-node; negatives: inference (low tensor), HPC (fp64), mining (dram).
    nvidia-smi-level fields overlap between classes, as in reality."""
    rng = np.random.default_rng(seed)
    H, y, g = [], [], []
    for k in range(n):
        kind = k % 4
        is_train = kind == 0
        tensor = {0: 0.6, 1: 0.15, 2: 0.02, 3: 0.01}[kind] + rng.normal(0, 0.05)
        fp64 = 0.5 if kind == 2 else 0.01
        dram = 0.8 if kind == 3 else 0.3
        nodes = int(rng.integers(2, 9)) if is_train else int(rng.integers(1, 3))
        smi = rng.random() < smi_share
        hist = []
        for i in range(int(rng.integers(1, 7))):
            f: dict[str, float | None] = {
                "gpu_util_mean": float(np.clip(rng.normal(0.75, 0.15), 0, 1)),
                "power_w_mean": float(rng.normal(400, 80)),
                "fb_used_mib_mean": float(rng.normal(50_000, 15_000)),
            }
            if not smi:
                f.update({"tensor_active_mean": float(np.clip(tensor + rng.normal(0, 0.03), 0, 1)),
                          "dram_active_mean": dram + rng.normal(0, 0.05), "fp64_active_mean": fp64})
            hist.append(_window(i, f, devices=8 * nodes, nodes=nodes))
        H.append(hist)
        y.append(int(is_train))
        g.append(f"fam{k % 5}")
    return H, np.array(y), np.array(g)


def small_model(cv_folds: int, **gbm: float) -> GbmWorkloadClassifier:
    """The shipped estimator's shape with smaller trees: boosting settings on the inner classifier, calibration
    folds on the TierModel."""
    return GbmWorkloadClassifier(TierModel(default_gbm().set_params(**gbm), cv_folds=cv_folds))


@pytest.fixture(scope="module")
def tiny_model() -> GbmWorkloadClassifier:
    H, y, g = synthetic_histories(600, seed=1)
    return small_model(max_iter=40, min_samples_leaf=10, cv_folds=3).fit(H, y, g)


def test_featurizer_statistics_over_history():
    hist = [_window(i, {"tensor_active_mean": v, "sample_count": 60.0, "interval_s": 1.0})
            for i, v in enumerate([0.2, 0.4, 0.6, None])]
    hist[-1]["features"]["tensor_active_mean"] = None
    f = HistoryFeaturizer(history_k=5).fit([hist])
    assert f.window_features_ == ("tensor_active_mean",)  # interval-bearing features are dropped by name
    x = dict(zip(f.feature_names_out_, f.transform_one(hist), strict=True))
    assert x["tensor_active_mean__mean"] == pytest.approx(0.4)
    assert x["tensor_active_mean__std"] == pytest.approx(np.std([0.2, 0.4, 0.6]))
    assert x["tensor_active_mean__trend"] == pytest.approx(0.2)  # per window
    assert x["tensor_active_mean__last"] == pytest.approx(0.6)  # last *present* value, never a filled zero
    assert x["tensor_active_mean__max"] == pytest.approx(0.6) and x["tensor_active_mean__min"] == pytest.approx(0.2)
    assert x["scale_devices"] == 8 and x["history_windows"] == 4
    assert x["duration_log_s"] == pytest.approx(math.log10(1 + 240.0))


def test_featurizer_missing_stays_missing_and_history_is_cut_to_k():
    hist = [_window(i, {"tensor_active_mean": float(i), "gpu_util_mean": None}) for i in range(10)]
    f = HistoryFeaturizer(history_k=3).fit([hist])
    x = dict(zip(f.feature_names_out_, f.transform_one(hist), strict=True))
    assert x["tensor_active_mean__mean"] == pytest.approx(8.0)  # windows 7, 8, 9 only
    assert all(math.isnan(x[f"gpu_util_mean__{s}"]) for s in STATS)
    assert x["duration_log_s"] == pytest.approx(math.log10(1 + 600.0))  # duration spans the whole history


def test_derived_ratios_follow_their_parts():
    feats = [{"mean_tensor": 0.3, "mean_gr_engine": 0.6, "mean_power": 0.5, "mean_gpu_util": 0.01},
             {"mean_tensor": 0.1, "mean_gr_engine": 0.005, "mean_power": 0.4, "mean_gpu_util": 0.8},
             {"mean_tensor": None, "mean_gr_engine": 0.5, "mean_power": 0.6, "mean_gpu_util": 0.6}]
    hist = [_window(i, f) for i, f in enumerate(feats)]
    f = HistoryFeaturizer(history_k=5).fit([hist])
    assert "tensor_per_gr_engine" in f.window_features_ and "fb_used_cv" not in f.window_features_  # parts absent
    m = f.window_matrix(hist)
    col = {n: m[:, i] for i, n in enumerate(f.window_features_)}
    assert col["tensor_per_gr_engine"][0] == pytest.approx(0.5)
    assert math.isnan(col["tensor_per_gr_engine"][1])  # an idle engine has no ratio, not a huge one
    assert math.isnan(col["tensor_per_gr_engine"][2])  # a missing part stays missing
    assert math.isnan(col["power_per_util"][0]) and col["power_per_util"][2] == pytest.approx(1.0)
    assert feature_tier("tensor_per_gr_engine") == "dcgm"  # built from profiling fields: never in the smi tier
    assert feature_tier("dram_per_gr_engine") == "dcgm"
    assert feature_tier("fb_used_cv") == feature_tier("power_per_util") == "smi"
    assert HistoryFeaturizer(history_k=5, derived=False).fit([hist]).derived_ == {}


def test_dropped_features_never_reach_the_model_nor_do_ratios_built_from_them():
    feats = [{"mean_power": 0.5, "mean_gpu_util": 0.6, "std_gpu_util": 0.1, "profile_cv_util": 0.3,
              "mean_fb_used": 0.4, "std_fb_used": 0.01} for _ in range(3)]
    hist = [_window(i, f) for i, f in enumerate(feats)]
    kept = HistoryFeaturizer(history_k=5).fit([hist])
    assert {"std_gpu_util", "profile_cv_util", "fb_used_cv", "power_per_util"} <= set(kept.window_features_)
    f = HistoryFeaturizer(history_k=5, drop=(*SAMPLING_FEATURES, "power_per_util")).fit([hist])
    assert not {"std_gpu_util", "profile_cv_util", "std_fb_used", "fb_used_cv", "power_per_util"} & set(
        f.window_features_)
    assert {"mean_gpu_util", "mean_power", "mean_fb_used"} <= set(f.window_features_)
    assert f.transform([hist]).shape[1] == len(f.feature_names_out_)
    model = small_model(max_iter=5, min_samples_leaf=5, cv_folds=2).set_params(drop_features=("std_gpu_util",))
    H = [[_window(i, {**feats[0], "mean_gpu_util": 0.3 + 0.5 * (k % 2)}) for i in range(3)] for k in range(40)]
    model.fit(H, np.arange(40) % 2, np.arange(40) % 3)
    assert not any(n.startswith("std_gpu_util__") for n in model.featurizer_.feature_names_out_)


def test_hiding_a_metric_hides_the_ratios_built_from_it():
    rng = np.random.default_rng(0)
    H = [[_window(i, {"mean_tensor": float(rng.random()), "mean_gr_engine": 0.5 + 0.1 * float(rng.random()),
                      "mean_dram": 0.3, "mean_gpu_util": 0.7}) for i in range(3)] for _ in range(60)]
    y = np.arange(60) % 2
    model = small_model(max_iter=5, min_samples_leaf=5, cv_folds=2).fit(H, y, np.arange(60) % 3)
    f = model.featurizer_
    X = f.transform(H)
    masked = model._mask_random_metrics(X, np.random.default_rng(1))
    names = f.feature_names_out_
    tensor, gract = names.index("mean_tensor__mean"), names.index("mean_gr_engine__mean")
    ratio = names.index("tensor_per_gr_engine__mean")
    hidden = np.isnan(masked[:, tensor]) | np.isnan(masked[:, gract])
    assert hidden.any() and (~hidden).any()
    assert np.isnan(masked[hidden, ratio]).all()


def test_bands_never_contradict_their_probability():
    """1000 clear positives beside a small cluster that is training 1 time in 3: the cumulative precision of
    P >= 1/3 still beats the target, but a history with P = 1/3 is no confident training call."""
    x = np.concatenate([np.ones(1000), np.full(30, 0.5), np.zeros(1000)])[:, None]
    y = np.concatenate([np.ones(1000), (np.arange(30) % 3 == 0).astype(float), np.zeros(1000)]).astype(int)
    tm = TierModel(default_gbm().set_params(max_iter=10, min_samples_leaf=5), cv_folds=2)
    tm.fit(x, y, np.arange(len(y)) % 4)
    p_mid = tm.predict_proba(np.array([[0.5]]))
    assert 0.2 < p_mid[0] < 0.5
    assert tm.t_high_ >= 0.5 >= tm.t_low_
    assert tm.band(p_mid)[0] != "training"  # more likely not training, so never called training
    assert tm.band(tm.predict_proba(np.array([[1.0], [0.0]]))).tolist() == ["training", "not_training"]


# --- scikit-learn estimator conventions (issue 17: the inner estimator is a parameter, cloned per tier) -------------
def test_nested_params_reach_the_inner_estimator():
    model = small_model(max_iter=40, min_samples_leaf=10, cv_folds=3)
    params = model.get_params(deep=True)
    assert params["estimator__cv_folds"] == 3 and params["estimator__estimator__max_iter"] == 40
    assert "max_iter" not in params and "cv_folds" not in params  # no copies of the inner model's settings
    assert model.set_params(estimator__estimator__max_leaf_nodes=7, estimator__threshold_margin=0.0) is model
    assert model.estimator.estimator.max_leaf_nodes == 7 and model.estimator.threshold_margin == 0.0
    with pytest.raises(ValueError, match="Invalid parameter"):
        model.set_params(max_iter=3)


def test_clone_round_trips_and_init_does_no_work():
    from sklearn.base import clone
    from sklearn.utils.estimator_checks import (
        check_get_params_invariance,
        check_no_attributes_set_in_init,
        check_parameters_default_constructible,
        check_set_params,
    )

    model = small_model(max_iter=40, min_samples_leaf=10, cv_folds=3).set_params(history_k=7, model_version="9")
    twin = clone(model)
    assert twin is not model and twin.estimator is not model.estimator
    assert repr(twin.get_params(deep=True)) == repr(model.get_params(deep=True))
    for est in (GbmWorkloadClassifier(), model, TierModel(), TierModel(default_gbm())):
        name = type(est).__name__
        check_no_attributes_set_in_init(name, est)  # __init__ only stores its arguments
        check_get_params_invariance(name, est)
        check_set_params(name, est)
    check_parameters_default_constructible("GbmWorkloadClassifier", GbmWorkloadClassifier())
    check_parameters_default_constructible("TierModel", TierModel())
    est = default_gbm()
    assert GbmWorkloadClassifier(est).estimator is est  # stored as given, not copied or validated in __init__


def test_fit_clones_the_estimator_per_tier_and_leaves_it_unfitted(tiny_model):
    from sklearn.utils.validation import check_is_fitted

    assert set(tiny_model.tiers_) == {"full", "smi"}
    full, smi = tiny_model.tiers_["full"], tiny_model.tiers_["smi"]
    assert full is not smi and full is not tiny_model.estimator and full.estimator_ is not smi.estimator_
    assert full.get_params()["cv_folds"] == 3 and full.estimator_.max_iter == 40  # the given settings, per tier
    assert not hasattr(tiny_model.estimator, "calibrator_") and not hasattr(tiny_model.estimator.estimator, "n_iter_")
    fitted = [a for a in vars(tiny_model) if not a.startswith("_") and a not in tiny_model.get_params(deep=False)]
    assert fitted and all(a.endswith("_") for a in fitted)  # whatever fit learns ends with "_"
    assert all(a.endswith("_") for a in vars(full) if a not in full.get_params(deep=False))
    check_is_fitted(tiny_model)
    with pytest.raises(TypeError, match="predict_proba"):
        GbmWorkloadClassifier(TierModel(estimator=object())).fit(*synthetic_histories(40, seed=2))


def test_a_bare_classifier_is_wrapped_in_the_default_tier_model():
    """Passing the inner classifier alone is the same model as passing it inside a default TierModel."""
    H, y, g = synthetic_histories(200, seed=3)
    gbm = default_gbm().set_params(max_iter=20, min_samples_leaf=10)
    bare = GbmWorkloadClassifier(gbm).fit(H, y, g)
    wrapped = GbmWorkloadClassifier(TierModel(gbm)).fit(H, y, g)
    assert isinstance(bare.tiers_["full"], TierModel) and bare.tiers_["full"].estimator_ is not gbm
    Ht, _, _ = synthetic_histories(30, seed=8)
    assert [bare.predict(h) for h in Ht] == [wrapped.predict(h) for h in Ht]


def test_feature_tiers_by_name():
    assert feature_tier("tensor_active_mean") == "dcgm"
    assert feature_tier("power_w_std") == "smi"
    assert feature_tier("gpu_util_mean") == "smi"
    assert feature_tier("sample_count") == "interval"
    assert feature_tier("sync_corr") == "dcgm"  # unknown provenance never feeds the nvidia-smi tier


def test_model_implements_protocol_and_separates_with_dcgm(tiny_model):
    as_protocol: WorkloadClassifier = tiny_model  # the detect stage holds it through the protocol
    H, y, _ = synthetic_histories(200, seed=2, smi_share=0.0)
    verdicts = [as_protocol.predict(h) for h in H]
    assert all(isinstance(v, Verdict) and v.band in ("training", "not_training", "uncertain") for v in verdicts)
    called = np.array([v.band == "training" for v in verdicts])
    assert called.sum() > 0.8 * y.sum()
    assert (called & (y == 0)).sum() == 0
    assert all(v.model_id.endswith("/full") for v in verdicts)
    top = verdicts[0].top_features
    assert 0 < len(top) <= tiny_model.top_k and all(isinstance(n, str) and isinstance(c, float) for n, c in top)


def test_smi_only_routes_to_smi_tier_with_wider_uncertainty(tiny_model):
    H, y, _ = synthetic_histories(300, seed=3, smi_share=0.0)
    full = [tiny_model.predict(h) for h in H]
    stripped = [[{**w, "features": {k: v for k, v in w["features"].items() if not k.startswith(DCGM)}} for w in h]
                for h in H]
    smi = [tiny_model.predict(h) for h in stripped]
    assert all(v.model_id.endswith("/smi") for v in smi)
    called = np.array([v.band == "training" for v in smi])
    # Only scale separates the classes without DCGM: confident calls stay right, and many more are left open.
    assert (called & (y == 0)).sum() <= 0.05 * max(called.sum(), 1)
    assert np.mean([v.band == "uncertain" for v in smi]) > np.mean([v.band == "uncertain" for v in full]) + 0.2


def test_no_activity_signal_is_uncertain(tiny_model):
    hist = [_window(i, {"fb_used_mib_mean": 70_000.0}, devices=512, nodes=64) for i in range(5)]
    v = tiny_model.predict(hist)
    assert v.band == "uncertain"
    assert tiny_model.predict([]).band == "uncertain"


def test_artifact_roundtrip(tmp_path, tiny_model):
    meta = ArtifactMeta(model_id="m", model_version="3", training_data_sha256="ab" * 32, params={"a": 1},
                        metrics={"f1": 0.9})
    save_artifact(tiny_model, meta, tmp_path)
    est, got = load_artifact(tmp_path, expect_version="3")
    assert got.model_id == "m" and got.sklearn_version == sklearn.__version__ and got.artifact_format == ARTIFACT_FORMAT
    H, _, _ = synthetic_histories(20, seed=4)
    assert [est.predict(h) for h in H] == [tiny_model.predict(h) for h in H]


def test_artifact_errors_are_clear(tmp_path, tiny_model):
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "nowhere")
    save_artifact(tiny_model, ArtifactMeta("m", "1", "00"), tmp_path)
    with pytest.raises(ArtifactError, match="version 1 found, 2 expected"):
        load_artifact(tmp_path, expect_version="2")
    side = tmp_path / SIDECAR_FILE
    doc = loads(side.read_bytes())
    side.write_bytes(dumps({**doc, "artifact_format": ARTIFACT_FORMAT + 1}))
    with pytest.raises(ArtifactError, match="artifact format"):
        load_artifact(tmp_path)
    side.write_bytes(dumps({**doc, "sklearn_version": "0.1"}))
    with pytest.raises(ArtifactError, match="scikit-learn"):
        load_artifact(tmp_path)
    side.write_bytes(dumps({**doc, "model_sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(tmp_path)


def test_packaged_artifact_loads():
    est, meta = load_artifact()
    assert meta.model_id and meta.training_data_sha256 and meta.metrics
    assert isinstance(est.predict([]), Verdict)


def test_neighbour_distances_are_sklearns_bit_for_bit():
    # the guard's and the kind support's own distances (reference parts derived once per fitted owner) must stay
    # what nan_euclidean_distances gives: a verdict may sit on a kNN threshold
    from sklearn.metrics.pairwise import nan_euclidean_distances

    from detectors.neighbours import distances

    est, _ = load_artifact()
    rng = np.random.default_rng(0)
    owners = [(g, g.ref_) for g in est.guards_.values()] + [(s, s._stack()[0]) for s in est.supports_.values()]
    for owner, ref in owners:
        for i in range(30):
            q = ref[rng.integers(len(ref), size=1 + i % 3)] + rng.normal(0, [0.0, 0.01, 3.0][i % 3], (1 + i % 3, 1))
            q[rng.random(q.shape) < 0.02 * i] = np.nan
            want = nan_euclidean_distances(q, ref)
            assert np.array_equal(distances(q, owner, ref), want, equal_nan=True)
            assert np.array_equal(distances(q, None, ref), want, equal_nan=True)


# --- the detect engine's history shape, and the loader ------------------------------------------------------------
def _messages(t0: float) -> list[bytes]:
    """Two workloads on 60 s windows, 10 s samples, plus late samples that make ingest emit a correction."""
    out = []
    for wl, n_dev, tensor in (("wl-train", 8, 0.5), ("wl-serve", 2, 0.05)):
        for i in range(30):
            for d in range(n_dev):
                out.append(dumps({"ts": t0 + 10.0 * i, "node": f"n-{wl}-{d // 4}", "device": f"GPU-{wl}-{d}",
                                  "accelerator": "NVIDIA H100 80GB HBM3", "workload_id": wl, "account_id": "a-1",
                                  "interval_s": 10.0, "tensor_active": tensor, "gpu_util": 90.0, "power_w": 500.0}))
    late = {"ts": t0 + 5.0, "node": "n-wl-train-0", "device": "GPU-wl-train-0", "accelerator": "NVIDIA H100 80GB HBM3",
            "workload_id": "wl-train", "account_id": "a-1", "interval_s": 10.0, "tensor_active": 0.9}
    return [*out, dumps(late)]


def test_training_histories_are_the_engines_histories():
    from detectors.classifier import history_entry, normalise_history
    from detectors.state import HISTORY_K
    from pipeline.detect.stage import DetectStage
    from pipeline.ingest.stage import IngestCore, SourceMessage
    from pipeline.model_train import HistoryBuilder
    from schemas.policy import load_policy

    class Recorder:
        def __init__(self) -> None:
            self.seen: list[list[dict]] = []

        def predict(self, history):
            self.seen.append([dict(h) for h in history])
            return Verdict(0.5, "uncertain")

    t0 = 1_767_225_600.0
    core = IngestCore()
    core.process("t", 0, [SourceMessage(i, v) for i, v in enumerate(_messages(t0))], now=t0 + 3600)
    partials = core.ready() + core.drain()
    assert any(p.revision > 0 for p in partials)  # the late samples came as a correction
    rec = Recorder()
    stage = DetectStage(load_policy("demo"), rec)
    hb = HistoryBuilder()
    for p in partials:
        stage.on_window(p)
    hb.add(partials)
    for end in (False, True):  # while the last windows settle, and after the end of input applied them
        if end:
            stage.flush()
            hb.finish()
        # The engine's newest history per workload is exactly the training path's last entries, and every history
        # it handed over is a run of the recorded windows (each once, in window order).
        for wid in ("wl-train", "wl-serve"):
            calls = [h for h in rec.seen if h[-1]["workload_id"] == wid]
            got = hb.entries[wid]
            assert calls and calls[-1] == got[-HISTORY_K:]
            starts = [e["window_start"] for e in got]
            assert starts == sorted(set(starts))
            for c in calls:
                cs = [e["window_start"] for e in c]
                assert cs == sorted(set(cs)) and set(cs) <= set(starts)
    # A correction replaces its window's entry (engine since ec0083c): the history holds each window once, at its
    # latest merge, which is what normalise_history keeps of a history holding both deliveries.
    train = hb.entries["wl-train"]
    assert normalise_history(train) == train
    corrected = [p for p in partials if p.revision > 0 and p.workload_id == "wl-train"]
    assert corrected and any(e["window_start"] == corrected[0].window_start for e in train)
    merged = stage.merger.add(partials[0])  # a replayed partial: nothing new, so rebuild from the builder's input
    assert merged is None and set(history_entry(train[0])) == set(train[0])


def test_real_feature_names_are_tiered_for_routing():
    from detectors.windows import FEATURE_NAMES

    tiers = {n: feature_tier(n) for n in FEATURE_NAMES}
    # provenance features would let the model learn the provider, and would send nvidia-smi rows to the full tier
    assert tiers["fields_present"] == tiers["tensor_basis_share"] == tiers["log10_flop_rate"] == "interval"
    assert tiers["mean_tensor"] == tiers["sync_devices_tensor"] == tiers["fp64_share"] == "dcgm"
    assert tiers["mean_gpu_util"] == tiers["sync_devices_power"] == tiers["devices_per_node"] == "smi"


def test_load_classifier_packaged_rule_and_errors(tmp_path):
    from detectors.classifier_base import RuleClassifier
    from pipeline.classifier_loader import load_classifier
    from schemas.policy import load_policy

    policy = load_policy("demo")
    assert isinstance(load_classifier(None, policy), GbmWorkloadClassifier)
    rule = load_classifier("rule", policy)
    assert isinstance(rule, RuleClassifier) and rule.p_training_high == policy.uncertainty.p_training_high
    with pytest.raises(ArtifactError, match="not found"):
        load_classifier(tmp_path / "nowhere", policy)  # never a silent fall back to the rule
    with pytest.raises(ArtifactError):
        load_classifier(tmp_path, policy)


def test_migprofiler_signal_transfer_keeps_direction_from_the_other_source():
    """A signal that points the same way on both hardware variants transfers; one that flips does not."""
    from types import SimpleNamespace

    from pipeline.model_eval import migprofiler_signal_transfer
    from pipeline.model_train import Dataset

    rng = np.random.default_rng(5)
    H, y, arch = [], [], []
    for hw in ("80g", "40g"):
        for k in range(80):
            train = k % 4 == 0
            flip = 1.0 if (hw == "80g") == train else -1.0  # GRACT spread: higher for training on one variant only
            # the same spread of inference FB on both variants, so a threshold at 5 % FPR on one is one on the other
            feats = {"mean_fb_used": 0.06 + 0.001 * float(rng.standard_normal()) if train else 0.02 + 0.0001 * k,
                     "mean_gr_engine": 0.8 + 0.05 * float(rng.standard_normal()),
                     "std_gr_engine": 0.05 + 0.02 * flip + 0.002 * float(rng.standard_normal())}
            H.append([_window(i, feats, devices=1) for i in range(3)])
            y.append(int(train))
            arch.append(("train_" if train else "infer_") + hw)
    ds = Dataset(H, np.array(y), np.array(["mig"] * len(y)), np.array(arch), np.array(arch), "x")
    model = SimpleNamespace(featurizer_=HistoryFeaturizer(history_k=16).fit(H))
    res = migprofiler_signal_transfer(model, ds)
    for held in ("held_out_A100_80g", "held_out_A100_40g"):
        block = res[held]
        assert block["n"] == 80 and block["positives"] == 20
        assert block["fb_occupancy"]["recall"] == 1.0 and block["fb_occupancy"]["fpr"] <= 0.05
        assert block["gract_spread"]["auc"] < 0.1  # direction learnt on the other variant is backwards here


def test_migprofiler_path_is_found_from_any_directory_and_a_missing_set_is_said(tmp_path, monkeypatch, capsys):
    from pipeline.model_train import MIGPROFILER_DIR, REPO_ROOT, migprofiler_dataset, resolve_data_dir

    assert MIGPROFILER_DIR.is_absolute()
    monkeypatch.chdir(tmp_path)  # another working directory: `../shared/...` is the repository's, not the cwd's
    rel = "../shared/data/migprofiler_a100"
    assert resolve_data_dir(rel) == (REPO_ROOT / rel).resolve()
    assert migprofiler_dataset(tmp_path / "absent") is None
    err = capsys.readouterr().err
    assert "MIGProfiler set not found" in err and str(tmp_path / "absent") in err
