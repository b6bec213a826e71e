"""The project's one exception root and its few subclasses."""


class TrainwatchError(Exception):
    """Root of every error trainwatch raises on purpose."""


class InvalidMessage(TrainwatchError):
    """A message or record failed validation; the text names the field and the reason."""

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.field = field
        self.reason = reason


class PolicyError(TrainwatchError):
    """A policy profile could not be loaded; the text names the file, the key and the reason."""


class ArtifactError(TrainwatchError):
    """A model artifact is missing or does not match the code's expected version."""


class ConfigError(TrainwatchError, ValueError):
    """A setting or argument names something that does not exist or is out of range (also a ValueError)."""
