"""Running stages on Kubernetes: Kubeflow Trainer TrainJobs for multi-node training stages.

What is where: the module map in llmfab.kube.trainjob.
"""

from llmfab.kube.api import submit_trainjob, wait_for_trainjob
from llmfab.kube.errors import LaunchError, TrainJobFailed, TrainJobTimeout
from llmfab.kube.launch_config import LaunchConfig
from llmfab.kube.manifest import render_trainjob
from llmfab.kube.trainjob import LaunchResult, launch_stage

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
