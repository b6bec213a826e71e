"""Which workload classifier the detect stage gets.

The packaged, versioned artifact by default. A missing, corrupted or incompatible artifact is an error
(ArtifactError), never a quiet switch to another classifier: a detector that silently changed its model would
change which runs become cases. The interim transparent rule is available only when asked for by name ("rule").
"""

from __future__ import annotations

from pathlib import Path

from detectors.classifier_base import RuleClassifier, WorkloadClassifier
from detectors.model_artifact import load_artifact
from schemas.errors import ArtifactError
from schemas.policy import Policy

#: The one model_path value that selects the interim rule instead of a fitted artifact.
RULE = "rule"


def load_classifier(model_path: Path | str | None, policy: Policy) -> WorkloadClassifier:
    """`None`: the packaged artifact; a path: that artifact directory (or one of its files); "rule": the interim
    RuleClassifier with the policy's band thresholds. Raises ArtifactError when the artifact cannot be used."""
    if isinstance(model_path, str) and model_path == RULE:
        u = policy.uncertainty
        return RuleClassifier(u.p_training_high, u.p_training_low)
    est, _meta = load_artifact(None if model_path is None else Path(model_path))
    if not callable(getattr(est, "predict", None)):
        raise ArtifactError(f"{model_path or 'packaged artifact'}: {type(est).__name__} is not a workload classifier")
    return est
