"""Coarse-sampled twins in the training data (pipeline/model_train.py `simulated_entries(coarse_twins=True)`): each is
its original's samples on every k-th point of its grid, trained on with its family and never scored."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.model_eval import loso_simulated
from pipeline.model_train import (
    COARSE_TWIN_INTERVALS,
    GBM,
    TIER,
    TWIN_SUFFIX,
    dataset_from_entries,
    simulated_entries,
)


@pytest.fixture(scope="module")
def small_eval() -> tuple:
    """The eval scenario at a small scale (22 workloads over 1.2 h), with and without twins."""
    return simulated_entries("eval", 3, scale=0.1), simulated_entries("eval", 3, scale=0.1, coarse_twins=True)


def test_twins_are_the_originals_sampled_coarser(small_eval) -> None:
    (plain, truth0, digest0), (entries, truth, digest) = small_eval
    twins = {w for w in entries if w.endswith(TWIN_SUFFIX)}
    assert twins and {w for w in entries if w not in twins} == set(plain)
    for w in plain:  # the originals' histories do not depend on the twins
        assert entries[w] == plain[w]
    assert digest != digest0  # another training set, another digest
    for w in twins:
        orig = truth[w]["twin_of"]
        assert w == orig + TWIN_SUFFIX and {k: v for k, v in truth[w].items() if k != "twin_of"} == truth0[orig]
        # the same windows' activity, from fewer samples: a twin has no window its original lacks
        starts = {e["window_start"] for e in entries[w]}
        assert starts <= {e["window_start"] for e in plain[orig]}


def test_a_twin_takes_every_kth_sample_at_k_times_the_interval(small_eval) -> None:
    from pipeline.simulator.scenarios import build

    (_plain, _t0, _d0), (entries, truth, _d) = small_eval
    sc = build("eval", 3, scale=0.1)
    iv = {w.workload_id: w.interval_s for w in sc.workloads}
    for w in (w for w in entries if w.endswith(TWIN_SUFFIX)):
        assert iv[truth[w]["twin_of"]] < max(COARSE_TWIN_INTERVALS)
    fine = [w for w in iv if iv[w] < min(COARSE_TWIN_INTERVALS) and entries.get(w)]
    assert fine and all(w + TWIN_SUFFIX in entries for w in fine)  # every finely sampled workload got one


def test_dataset_marks_twins_and_keeps_the_originals_histories(small_eval) -> None:
    (plain, truth0, _), (entries, truth, _) = small_eval
    ds0 = dataset_from_entries(plain, truth0, "", 3, 4)
    ds = dataset_from_entries(entries, truth, "", 3, 4)
    assert ds0.twin is None and ds.twin is not None and ds.twin.any()
    assert np.array_equal(ds.twin, np.char.endswith(ds.workloads.astype(str), TWIN_SUFFIX))
    orig = ds.subset(~ds.twin)
    assert orig.histories == ds0.histories and np.array_equal(orig.y, ds0.y)
    assert not ds.subset(ds.twin).scored.any() and ds0.scored.all()


def test_leave_one_family_out_trains_on_twins_and_scores_only_originals(small_eval) -> None:
    (_plain, _t0, _), (entries, truth, _) = small_eval
    ds = dataset_from_entries(entries, truth, "", 3, 4)
    small = {f"{GBM}max_iter": 8, f"{GBM}min_samples_leaf": 5, f"{TIER}cv_folds": 2, "kind_bands": ()}
    res = loso_simulated(ds, small)
    scored = sum(f["n"] for f in res["folds"])
    assert scored == int((~ds.twin).sum()) < len(ds.y)
    assert res["as_sent"]["n"] == scored


def test_families_held_out_whole_score_no_twin(small_eval) -> None:
    from pipeline.model_eval import heldout_families

    (_plain, _t0, _), (entries, truth, _) = small_eval
    ds = dataset_from_entries(entries, truth, "", 3, 4)
    small = {f"{GBM}max_iter": 8, f"{GBM}min_samples_leaf": 5, f"{TIER}cv_folds": 2, "kind_bands": ()}
    fam = next(a for a in ("serving", "pretrain", "finetune_full") if ((ds.archetypes == a) & ds.twin).any())
    res = heldout_families(ds, ds, (fam,), small)
    assert res[fam]["held_out_as_sent"]["n"] == int(((ds.archetypes == fam) & ~ds.twin).sum())
