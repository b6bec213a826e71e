"""A confident call that rests on a kind of work the run is unlike is not confident (detectors/kind_support.py)."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.classifier import UNLIKE_KIND, GbmWorkloadClassifier, TierModel, default_gbm
from detectors.kind_support import KindSupport
from tests.test_classifier import synthetic_histories


def _blobs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two features; not training: idle at (-4, 0) and serving at (0, 0); training at (3, 0) and fine-tuning at
    (3, 3); sd 0.6, two providers each."""
    X, y, kinds, groups = [], [], [], []
    for kind, cx, cy, label in (("idle", -4.0, 0.0, 0), ("serving", 0.0, 0.0, 0), ("train", 3.0, 0.0, 1),
                                ("finetune", 3.0, 3.0, 1)):
        for g in ("p1", "p2"):
            X.append(np.column_stack([rng.normal(cx, 0.6, 60), rng.normal(cy, 0.6, 60)]))
            y += [label] * 60
            kinds += [kind] * 60
            groups += [g] * 60
    return np.vstack(X), np.array(y), np.array(kinds), np.array(groups)


def _unlike(support: KindSupport, tier: TierModel, band: str, xt: np.ndarray, z: np.ndarray) -> tuple[str, ...]:
    """`unlike_rows` for one row (the tier reads the same two features the guard would standardise)."""
    return support.unlike_rows(tier, [band], xt[None, :], z[None, :])[0]


@pytest.fixture(scope="module")
def fitted() -> tuple[TierModel, KindSupport]:
    X, y, kinds, groups = _blobs(np.random.default_rng(0))
    tier = TierModel(default_gbm().set_params(max_iter=30, min_samples_leaf=5), cv_folds=2).fit(X, y, groups)
    return tier, KindSupport().fit(tier, X, y, kinds, X, kinds, groups)


def test_a_call_resting_on_one_kind_the_run_is_unlike_is_named(fitted):
    tier, support = fitted
    assert support.kinds_ == ["finetune", "idle", "serving", "train"]
    # a new kind beside serving, away from it on an axis the trees never split on: not training only because
    # serving is there
    edge = np.array([[0.8, 1.8]])
    p = tier.predict_proba(edge)
    assert tier.band(p)[0] == "not_training"
    member = support.members_[support.kinds_.index("serving")]  # fitted without serving: the call leaves its band
    assert tier.calibrator_.predict(member.predict_proba(edge[:, tier.columns_])[:, 1])[0] > tier.t_low_
    assert _unlike(support, tier, "not_training", edge[0], edge[0]) == ("serving",)
    # a kind of the other class is never what a call rests on; nor is a kind beyond `reach` of the row
    assert _unlike(support, tier, "training", edge[0], edge[0]) == ()
    far = np.array([0.8, 5.0])
    assert _unlike(support, tier, "not_training", far, far) == ()


def test_a_run_like_the_kind_it_rests_on_keeps_its_call(fitted):
    tier, support = fitted
    for x in ([0.0, 0.3], [-4.0, -0.3], [3.0, 0.0], [3.0, 3.0]):
        row = np.array([x])
        band = str(tier.band(tier.predict_proba(row))[0])
        assert band != "uncertain"
        assert _unlike(support, tier, band, row[0], row[0]) == ()
    # an uncertain band has nothing to withdraw
    assert _unlike(support, tier, "uncertain", np.array([0.8, 1.8]), np.array([0.8, 1.8])) == ()


def test_a_slimmed_member_predicts_exactly_as_the_estimator_it_was(fitted):
    tier, support = fitted
    X, y, kinds, _ = _blobs(np.random.default_rng(0))
    keep = kinds != "serving"
    whole = tier._new_estimator().fit(X[keep], y[keep])
    member = support.members_[support.kinds_.index("serving")]
    assert sum(len(t) for t in member._bin_mapper.bin_thresholds_) == 0  # the bin edges are gone
    grid = np.random.default_rng(1).uniform(-6, 6, (500, 2))
    np.testing.assert_array_equal(member.predict_proba(grid), whole.predict_proba(grid))


def test_thresholds_are_measured_across_providers_of_each_kind(fitted):
    _, support = fitted
    # each kind's cross-provider 5-NN distance for two N(0, 0.6) clouds: about one sd, never a guess like 0 or inf
    for kind, t in support.threshold_.items():
        assert 0.2 < t < 1.5, (kind, t)


@pytest.fixture(scope="module")
def models() -> tuple[GbmWorkloadClassifier, GbmWorkloadClassifier, list, np.ndarray]:
    H, y, g = synthetic_histories(400, seed=3)
    kinds = np.array(["train", "inference", "hpc", "mining"])[np.arange(len(y)) % 4]
    kinds[(kinds == "train") & (np.arange(len(y)) % 8 == 0)] = "finetune"  # a second kind of training

    def fresh() -> GbmWorkloadClassifier:
        return GbmWorkloadClassifier(TierModel(default_gbm().set_params(max_iter=30, min_samples_leaf=10),
                                               cv_folds=3))

    return fresh().fit(H, y, g), fresh().fit(H, y, g, kinds), H, y


def test_without_kinds_nothing_changes_and_with_them_known_kinds_keep_their_calls(models):
    plain, with_kinds, H, _ = models
    assert not getattr(plain, "supports_", {})
    assert set(with_kinds.supports_) == {"full", "smi"}
    # members only for kinds of the class whose calls are checked (not_training by default)
    assert with_kinds.supports_["full"].kinds_ == ["hpc", "inference", "mining"]
    X = plain.featurizer_.transform(H)
    a, b = plain.assess(X), with_kinds.assess(X)
    assert [d["p"] for d in a] == [d["p"] for d in b]  # the same trees: the support only withdraws calls
    withdrawn = [d for d in b if UNLIKE_KIND in d["reasons"]]
    confident_nt = sum(d["band"] == "not_training" for d in a)
    assert len(withdrawn) <= 0.1 * confident_nt  # rows of the kinds it was fitted on conform to them
    # asymmetric stakes: training calls are never withdrawn by default
    assert all(da["band"] == db["band"] for da, db in zip(a, b, strict=True) if da["band"] == "training")


def test_a_withdrawn_call_is_uncertain_names_its_kinds_and_stays_in_distribution(models):
    _, model, H, _ = models
    X = model.featurizer_.transform(H)
    before = model.assess(X)
    saved = {t: (dict(s.threshold_), s.reach) for t, s in model.supports_.items()}
    try:
        for s in model.supports_.values():  # every kind now near and unlike every run: each flip withdraws the call
            s.threshold_, s.reach = dict.fromkeys(s.threshold_, 1e-9), 1e15
        after = model.assess(X)
    finally:
        for t, s in model.supports_.items():
            s.threshold_, s.reach = saved[t]
    changed = [(d0, d1) for d0, d1 in zip(before, after, strict=True) if d0["band"] != d1["band"]]
    assert changed, "some not_training call should leave its band when a kind is left out"
    for d0, d1 in changed:
        assert d0["band"] == "not_training" and d1["band"] == "uncertain"
        assert UNLIKE_KIND in d1["reasons"] and d1["in_distribution"]
        assert d1["out_features"] and all(n.startswith("kind:") for n in d1["out_features"])
    # training calls untouched; with kind_bands covering training they too would be withdrawn
    assert all(d1["band"] == "training" for d0, d1 in zip(before, after, strict=True) if d0["band"] == "training")


def test_kind_bands_can_name_a_tier_and_reject_what_they_cannot_mean(models):
    _, _, H, y = models
    kinds = np.array(["train", "inference", "hpc", "mining"])[np.arange(len(y)) % 4]
    kinds[(kinds == "train") & (np.arange(len(y)) % 8 == 0)] = "finetune"
    model = GbmWorkloadClassifier(TierModel(default_gbm().set_params(max_iter=30, min_samples_leaf=10), cv_folds=3),
                                  kind_bands=("not_training", "smi:training")).fit(H, y, np.arange(len(y)) % 3, kinds)
    assert model.kind_bands_of("full") == ("not_training",)
    assert model.kind_bands_of("smi") == ("not_training", "training")
    # a tier's support holds members only for the classes it checks
    assert model.supports_["full"].kinds_ == ["hpc", "inference", "mining"]
    assert model.supports_["smi"].kinds_ == ["finetune", "hpc", "inference", "mining", "train"]
    X = model.featurizer_.transform(H)
    Xs = X.copy()
    Xs[:, model.featurizer_.dcgm_columns_] = np.nan  # what an nvidia-smi-only provider sends: the smi tier
    before = model.assess(np.vstack([X, Xs]))
    saved = {t: (dict(s.threshold_), s.reach) for t, s in model.supports_.items()}
    try:
        for s in model.supports_.values():  # every kind near and unlike every run: each flip withdraws the call
            s.threshold_, s.reach = dict.fromkeys(s.threshold_, 1e-9), 1e15
        after = model.assess(np.vstack([X, Xs]))
    finally:
        for t, s in model.supports_.items():
            s.threshold_, s.reach = saved[t]
    trained = [(d0, d1) for d0, d1 in zip(before, after, strict=True) if d0["band"] == "training"]
    assert {d0["tier"] for d0, _ in trained} == {"full", "smi"}
    assert all(d1["band"] == "training" for d0, d1 in trained if d0["tier"] == "full")  # not checked there
    withdrawn = [d1 for d0, d1 in trained if d0["tier"] == "smi" and d1["band"] == "uncertain"]
    assert withdrawn and all(UNLIKE_KIND in d["reasons"] for d in withdrawn)
    assert {k for d in withdrawn for k in d["out_features"]} <= {"kind:train", "kind:finetune"}
    for bad in (("training:smi",), ("gpu:training",), ("uncertain",)):
        with pytest.raises(ValueError, match="kind_bands entry"):
            GbmWorkloadClassifier(kind_bands=bad).kind_bands_of("full")


def test_a_training_kind_can_have_its_own_conformity_quantile(fitted):
    tier, support = fitted
    X, y, kinds, groups = _blobs(np.random.default_rng(0))
    wider = KindSupport(training_quantile=0.99).fit(tier, X, y, kinds, X, kinds, groups)
    for kind, t in support.threshold_.items():
        if support.class_[kind] == 1:
            assert wider.threshold_[kind] > t  # the 99th percentile of a kind's spread, not its 95th
        else:
            assert wider.threshold_[kind] == t
