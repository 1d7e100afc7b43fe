"""Errors users see: each names the file, line or field that is wrong."""


class LlmfabError(Exception):
    """Base class for errors that carry a message meant for the user."""


class ConfigError(LlmfabError):
    """A config file or value is invalid; the message names the field."""


class DataError(LlmfabError):
    """A data record is malformed; the message names the file and line (or row)."""


class NoSplitError(DataError):
    """The dataset has no such split (e.g. a single file asked for its 'test' split)."""


class StoreError(LlmfabError):
    """An object-store key, URI or object is invalid or missing."""


class CheckpointError(StoreError):
    """A checkpoint is incomplete or corrupt (missing manifest, size or sha256 mismatch)."""


class TrackingError(LlmfabError):
    """The MLflow tracking server failed or cannot be reached; the message names its URI."""
