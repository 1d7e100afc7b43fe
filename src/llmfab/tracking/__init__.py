"""MLflow tracking used by every stage: a parent run per pipeline run, a nested run per stage."""

from llmfab.tracking.mlflow_tracker import TrackedRun, Tracker, flatten_params, tracking_uri

__all__ = ["TrackedRun", "Tracker", "flatten_params", "tracking_uri"]
