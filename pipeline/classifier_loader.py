"""Which workload classifier the detect stage gets.

The packaged, versioned artifact by default. A missing, corrupted or incompatible artifact is an error
(ArtifactError), never a quiet switch to another classifier: a detector that silently changed its model would
change which runs become cases. The interim transparent rule is available only when asked for by name ("rule").

A restarted worker should consume again within seconds, and importing scikit-learn and unpickling the model is a
large part of its start (~1.5 CPU s; docs/faust.md, recovery). `background=True` (the faust app) loads the artifact
in a thread while the worker joins its group and replays its changelogs; the first `predict` (or `wait`) blocks
until the model is there, so no window is ever classified by anything else, and a load failure is raised there
(ArtifactError). Measured (benchmarks/results/recovery.json, 2 CPUs at load ~8): a restart consumed again after a
median 9.1 s with it, 17.1 s loading eagerly. TRAINWATCH_BACKGROUND_CLASSIFIER=0 loads eagerly (the benchmark's
baseline). (It did not pay while the CLI imported scikit-learn for its model commands before the worker started.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detectors.classifier_base import RuleClassifier, Verdict, WorkloadClassifier
from schemas.errors import ArtifactError
from schemas.policy import Policy

#: The one model_path value that selects the interim rule instead of a fitted artifact.
RULE = "rule"
BACKGROUND_ENV = "TRAINWATCH_BACKGROUND_CLASSIFIER"


def _load_artifact(model_path: Path | str | None) -> WorkloadClassifier:
    # imported here: detectors.model_artifact imports scikit-learn and joblib (about a second at start)
    from detectors.model_artifact import load_artifact

    est, meta = load_artifact(None if model_path is None else Path(model_path))
    if not callable(getattr(est, "predict", None)):
        raise ArtifactError(f"{model_path or 'packaged artifact'}: {type(est).__name__} is not a workload classifier")
    if meta.model_sha256:  # the model by content: the detect engine keeps its verdicts across restarts under it
        est.memo_id = f"sha256:{meta.model_sha256}"
    return est


class BackgroundClassifier:
    """The artifact's classifier, loading in a daemon thread from construction on. Every use waits for it."""

    def __init__(self, model_path: Path | str | None) -> None:
        self.model_path = model_path
        self._done = threading.Event()
        self._est: WorkloadClassifier | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name="classifier-load", daemon=True).start()

    def _run(self) -> None:
        try:
            self._est = _load_artifact(self.model_path)
        except BaseException as exc:  # kept and raised to whoever needs the model
            self._error = exc
        finally:
            self._done.set()

    @property
    def ready(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> WorkloadClassifier:
        """The loaded classifier (blocking); the load's ArtifactError when it failed."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"classifier still loading after {timeout_s} s")
        if self._error is not None:
            raise self._error
        assert self._est is not None
        return self._est

    def predict(self, history: Sequence[Any]) -> Verdict:
        return self.wait().predict(history)

    def __getattr__(self, name: str) -> Any:  # anything else the estimator offers, once loaded
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.wait(), name)


def load_classifier(model_path: Path | str | None, policy: Policy, *,
                    background: bool = False) -> WorkloadClassifier:
    """`None`: the packaged artifact; a path: that artifact directory (or one of its files); "rule": the interim
    RuleClassifier with the policy's band thresholds. Raises ArtifactError when the artifact cannot be used
    (with `background`, unless TRAINWATCH_BACKGROUND_CLASSIFIER=0: from the first use, see BackgroundClassifier)."""
    if isinstance(model_path, str) and model_path == RULE:
        u = policy.uncertainty
        return RuleClassifier(u.p_training_high, u.p_training_low)
    if background and os.environ.get(BACKGROUND_ENV, "1") not in ("0", "false", "no"):
        if model_path is not None and not Path(model_path).exists():  # the common operator error: still at start
            raise ArtifactError(f"{model_path}: classifier artifact not found")
        return BackgroundClassifier(model_path)
    return _load_artifact(model_path)
