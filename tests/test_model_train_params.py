"""model_train's estimator: DEFAULT_PARAMS and overrides reach the nested parts by scikit-learn's set_params names,
and the evaluation paths that build their own tier models take the same names (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.classifier import TierModel
from pipeline.model_eval import migprofiler_cross_hardware, migprofiler_sim_real_fields
from pipeline.model_train import DEFAULT_PARAMS, GBM, TIER, Dataset, build_model

SMALL = {f"{GBM}max_iter": 8, f"{GBM}min_samples_leaf": 5, f"{TIER}cv_folds": 2, "history_k": 4}


def test_build_model_applies_defaults_then_overrides_by_nested_name():
    model = build_model()
    tier = model.estimator
    assert isinstance(tier, TierModel)
    assert tier.threshold_margin == DEFAULT_PARAMS[f"{TIER}threshold_margin"] == 0.0
    assert tier.estimator.max_leaf_nodes == DEFAULT_PARAMS[f"{GBM}max_leaf_nodes"]
    assert model.device_scale is False and model.history_k == 16
    small = build_model(SMALL)
    assert small.estimator.estimator.max_iter == 8 and small.estimator.cv_folds == 2 and small.history_k == 4
    assert build_model().estimator.estimator.max_iter == 150  # an override never leaks into the next build
    with pytest.raises(ValueError, match="Invalid parameter"):
        build_model({"max_iter": 8})  # the old flat name is refused, not silently ignored


def _runs(n: int, seed: int) -> Dataset:
    """MIGProfiler-shaped runs: GRACT + FB used only, two A100 variants, training busier and fuller."""
    rng = np.random.default_rng(seed)
    H, y, arch = [], [], []
    for k in range(n):
        train = k % 3 == 0
        hw = "80g" if k % 2 else "40g"
        feats = {"mean_gr_engine": float(np.clip((0.8 if train else 0.4) + 0.1 * rng.standard_normal(), 0, 1)),
                 "std_gr_engine": 0.05, "mean_fb_used": (0.7 if train else 0.3) + 0.05 * float(rng.standard_normal())}
        H.append([{"workload_id": f"w{k}", "window_start": 60.0 * i, "window_end": 60.0 * (i + 1),
                   "device_count": 1, "node_count": 1, "features": feats} for i in range(3)])
        y.append(int(train))
        arch.append(("train_" if train else "infer_") + hw)
    return Dataset(H, np.array(y), np.array([f"fam{k % 4}" for k in range(n)]), np.array(arch), np.array(arch), "x")


def test_eval_paths_take_the_nested_params():
    sim, mig = _runs(90, 1), _runs(40, 2)
    model = build_model(SMALL).fit(sim.histories, sim.y, sim.groups)
    res = migprofiler_sim_real_fields(model, sim, mig, SMALL)
    assert res["n"] == 40 and "mean_gr_engine__mean" in res["columns"]
    assert 0.0 <= res["bands"]["t_low"] < res["bands"]["t_high"] <= 1.0
    assert res["auc"] is not None and res["auc"] > 0.8  # GRACT and FB separate these runs; the tier learnt it
    cross = migprofiler_cross_hardware(mig, SMALL)
    assert {k: v["n"] for k, v in cross.items()} == {"held_out_A100_80g": 20, "held_out_A100_40g": 20}


def test_seeds_pool_into_one_dataset_with_their_workloads_apart():
    """The shipped model trains on several simulation seeds (TRAIN_SEEDS): each seed's rows kept whole and in order,
    its workload ids prefixed (seeds reuse ids, and a workload's histories must stay one group), the digest over all
    of them in order."""
    a, b = _runs(6, 1), _runs(4, 2)
    pool = Dataset.pooled([("7:", a), ("11:", b)])
    assert len(pool.histories) == len(pool.y) == 10 and pool.histories[6] is b.histories[0]
    assert pool.workloads.tolist() == [f"7:{w}" for w in a.workloads] + [f"11:{w}" for w in b.workloads]
    assert pool.y.tolist() == a.y.tolist() + b.y.tolist() and pool.groups.tolist()[6:] == b.groups.tolist()
    assert pool.twin is None and pool.digest != Dataset.pooled([("11:", b), ("7:", a)]).digest
    assert len(set(pool.workloads.tolist())) == len(set(a.workloads.tolist())) + len(set(b.workloads.tolist()))
