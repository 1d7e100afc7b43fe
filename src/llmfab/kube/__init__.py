"""Running stages on Kubernetes: Kubeflow Trainer TrainJobs for multi-node training stages."""

from llmfab.kube.trainjob import (
    LaunchConfig,
    LaunchError,
    LaunchResult,
    TrainJobFailed,
    TrainJobTimeout,
    launch_stage,
    render_trainjob,
    submit_trainjob,
    wait_for_trainjob,
)

__all__ = [
    "LaunchConfig",
    "LaunchError",
    "LaunchResult",
    "TrainJobFailed",
    "TrainJobTimeout",
    "launch_stage",
    "render_trainjob",
    "submit_trainjob",
    "wait_for_trainjob",
]
