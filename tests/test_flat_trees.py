"""The flat tree walk gives scikit-learn's probabilities bit for bit (detectors/flat_trees.py)."""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from detectors.flat_trees import _flat_of, proba_one
from detectors.model_artifact import load_artifact


def _rows(rng: np.random.Generator, est: HistGradientBoostingClassifier, n: int = 400) -> np.ndarray:
    """Random rows, a third missing, and a third of the values set exactly on a split threshold of their feature
    (where `<=` decides)."""
    X = rng.normal(0.0, 3.0, (n, est.n_features_in_))
    for it in est._predictors:
        nodes = it[0].nodes[~it[0].nodes["is_leaf"].astype(bool)]
        pick = rng.random(len(nodes)) < 0.3
        for f, t in zip(nodes["feature_idx"][pick], nodes["num_threshold"][pick], strict=True):
            X[rng.integers(n), f] = t
    X[rng.random(X.shape) < 0.33] = np.nan
    return X


def test_the_packaged_models_trees_walked_flat_give_scikit_learns_probabilities_exactly():
    model, _ = load_artifact(None)
    rng = np.random.default_rng(0)
    checked = 0
    for t, tier in model.tiers_.items():
        for est in (tier.estimator_, *model.supports_[t].members_):
            assert _flat_of(est) is not None
            X = _rows(rng, est)
            np.testing.assert_array_equal(proba_one(est, X), est.predict_proba(X)[:, 1])
            np.testing.assert_array_equal(proba_one(est, X[:1]), est.predict_proba(X[:1])[:, 1])
            checked += 1
    assert checked >= 20


def test_what_cannot_be_walked_flat_goes_to_the_estimator():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3))
    y = (X[:, 0] + rng.normal(0, 0.3, 200) > 0).astype(int)
    lr = LogisticRegression().fit(X, y)
    np.testing.assert_array_equal(proba_one(lr, X), lr.predict_proba(X)[:, 1])
    Xc = np.column_stack([X[:, :2], rng.integers(0, 4, 200)])
    cat = HistGradientBoostingClassifier(max_iter=10, categorical_features=[2]).fit(Xc, y)
    assert _flat_of(cat) is None
    np.testing.assert_array_equal(proba_one(cat, Xc), cat.predict_proba(Xc)[:, 1])
    # a wrong width is the estimator's own error, not a silent answer
    hgb = HistGradientBoostingClassifier(max_iter=10).fit(X, y)
    try:
        proba_one(hgb, X[:, :2])
    except ValueError as e:
        assert "features" in str(e)
    else:
        raise AssertionError("a row of the wrong width was scored")
