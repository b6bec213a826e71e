"""A versioned classifier artifact: the pickled estimator (joblib) beside a JSON sidecar that says what it is.

The sidecar carries the model id and version, ARTIFACT_FORMAT, the scikit-learn version it was fitted with, the
sha256 of its training data, its parameters and its metrics. Loading checks the sidecar *before* unpickling, so a
missing file or a format / library mismatch fails with a clear ArtifactError instead of a confusing unpickle error
(or, worse, an estimator that silently behaves differently).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import joblib
import sklearn

from schemas.errors import ArtifactError
from schemas.serde import dumps, loads

#: Bump when the pickled object's layout or the sidecar's keys change; old artifacts then refuse to load.
#: 3: the estimator takes its per-tier model as `estimator` (cloned per tier; TierModel wraps its own classifier).
ARTIFACT_FORMAT = 3
MODEL_FILE = "classifier.joblib"
SIDECAR_FILE = "classifier.json"
#: The artifact shipped in the package.
PACKAGED_DIR = "model"


@dataclass(slots=True)
class ArtifactMeta:
    model_id: str
    model_version: str
    training_data_sha256: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    artifact_format: int = ARTIFACT_FORMAT
    sklearn_version: str = sklearn.__version__
    model_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "model_version": self.model_version,
            "artifact_format": self.artifact_format,
            "sklearn_version": self.sklearn_version,
            "training_data_sha256": self.training_data_sha256,
            "model_sha256": self.model_sha256,
            "params": self.params,
            "metrics": self.metrics,
        }


def sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def packaged_dir() -> Path:
    return Path(str(resources.files("detectors.data").joinpath(PACKAGED_DIR)))


def save_artifact(estimator: Any, meta: ArtifactMeta, out_dir: str | Path) -> Path:
    """Write estimator + sidecar into `out_dir` (created); returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    joblib.dump(estimator, model_path, compress=3)
    meta.model_sha256 = _file_sha256(model_path)
    (out / SIDECAR_FILE).write_bytes(dumps(meta.to_json(), sort_keys=True) + b"\n")
    return out


def read_meta(path: str | Path) -> ArtifactMeta:
    """Read and check the sidecar only. `path` is the artifact directory (or either of its files)."""
    d = Path(path)
    if d.suffix in (".json", ".joblib"):
        d = d.parent
    side = d / SIDECAR_FILE
    if not side.is_file():
        raise ArtifactError(f"{side}: classifier artifact sidecar not found (train one with `trainwatch model train`)")
    try:
        raw = loads(side.read_bytes())
    except Exception as exc:  # malformed JSON is as fatal as a missing file
        raise ArtifactError(f"{side}: unreadable sidecar: {exc}") from exc
    fmt = raw.get("artifact_format")
    if fmt != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{side}: artifact format {fmt!r} does not match this code's format {ARTIFACT_FORMAT}; retrain with "
            "`trainwatch model train`"
        )
    skv = raw.get("sklearn_version")
    if skv != sklearn.__version__:
        raise ArtifactError(
            f"{side}: fitted with scikit-learn {skv!r} but {sklearn.__version__} is installed; pickles are not "
            "portable across versions, retrain with `trainwatch model train`"
        )
    missing = [k for k in ("model_id", "model_version", "training_data_sha256") if not raw.get(k)]
    if missing:
        raise ArtifactError(f"{side}: sidecar lacks {', '.join(missing)}")
    return ArtifactMeta(
        model_id=raw["model_id"],
        model_version=str(raw["model_version"]),
        training_data_sha256=raw["training_data_sha256"],
        params=raw.get("params") or {},
        metrics=raw.get("metrics") or {},
        artifact_format=fmt,
        sklearn_version=skv,
        model_sha256=raw.get("model_sha256", ""),
    )


def load_artifact(path: str | Path | None = None, *, expect_version: str | None = None) -> tuple[Any, ArtifactMeta]:
    """Load (estimator, meta). `path` None = the packaged artifact. Any mismatch raises ArtifactError."""
    d = packaged_dir() if path is None else Path(path)
    if d.suffix in (".json", ".joblib"):
        d = d.parent
    meta = read_meta(d)
    if expect_version is not None and meta.model_version != expect_version:
        raise ArtifactError(f"{d}: model version {meta.model_version} found, {expect_version} expected")
    model_path = d / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: classifier model file not found")
    if meta.model_sha256 and _file_sha256(model_path) != meta.model_sha256:
        raise ArtifactError(f"{model_path}: sha256 does not match its sidecar (file replaced or corrupted)")
    try:
        est = joblib.load(model_path)
    except Exception as exc:
        raise ArtifactError(f"{model_path}: could not load the estimator: {exc}") from exc
    return est, meta
