"""What goes wrong when a stage runs as a TrainJob."""

from llmfab.errors import LlmfabError


class LaunchError(LlmfabError):
    """The TrainJob could not be submitted or followed, or did not succeed."""


class TrainJobFailed(LaunchError):
    """The TrainJob reached its Failed condition."""


class TrainJobTimeout(LaunchError):
    """The TrainJob did not reach a terminal condition in time."""
