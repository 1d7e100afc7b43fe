"""LaunchConfig: how a stage runs as a TrainJob (everything but the stage's own config and inputs).

Each field's description is also its `llmfab launch` option's help (llmfab.cli derives the options from the
fields), hence the command-line wording.
"""

from typing import Literal

from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.kube.pod_env import MLFLOW_SECRET, PARENT_RUN_ENV, S3_SECRET


class LaunchConfig(StrictModel):
    """How a stage runs as a TrainJob (everything but the stage's own config and inputs)."""

    namespace: str | None = Field(None, description="Namespace [default: this pod's, else kubeflow]")
    # An RFC 1035 label, checked when the TrainJob is rendered.
    name: str | None = Field(None, description="TrainJob name [default: STAGE-TIME-RAND]")
    num_nodes: int = Field(1, ge=1, description="Training nodes (pods)")
    procs_per_node: int | None = Field(
        None, ge=1, description="Ranks per node [default: the runtime's auto: one per GPU]"
    )
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs per node (needs --cpu and --memory)")
    cpu: str | None = Field(None, description="CPU per node, e.g. 16 [default: the runtime's]")
    memory: str | None = Field(None, description="Memory per node, e.g. 64Gi [default: the runtime's]")
    gpu_resource: str = Field("nvidia.com/gpu", description="The extended resource name of a GPU")
    runtime: str | None = Field(
        None, description="ClusterTrainingRuntime [default: llmfab-train, llmfab-deepspeed with DeepSpeed]"
    )
    image: str | None = Field(None, description="Container image [default: the stage's image]")
    registry: str | None = Field(None, description="Image registry [default: $LLMFAB_IMAGE_REGISTRY]")
    tag: str | None = Field(None, description="Image tag [default: $LLMFAB_IMAGE_TAG or the version]")
    tracking_uri: str | None = Field(None, description="MLflow URI for the pods [default: ConfigMap llmfab-env's]")
    experiment: str | None = Field(None, description="MLflow experiment [default: ConfigMap llmfab-env's]")
    parent_run_id: str | None = Field(None, description=f"MLflow parent run [default: ${PARENT_RUN_ENV}]")
    env: dict[str, str] = Field(default_factory=dict, description="More environment, NAME=VALUE (no secrets)")
    labels: dict[str, str] = Field(default_factory=dict, description="More TrainJob labels, KEY=VALUE")
    s3_secret: str | None = Field(S3_SECRET, description="Secret holding AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    mlflow_secret: str | None = Field(MLFLOW_SECRET, description="Secret holding MLFLOW_TRACKING_USERNAME/PASSWORD")
    # None: wait forever (from Python or a pipeline; the command line cannot give None).
    timeout_s: float | None = Field(72 * 3600.0, gt=0, description="Give up after this many seconds [default: 72 h]")
    poll_s: float = Field(15.0, gt=0, description="Seconds between status reads")
    cleanup: Literal["on_success", "always", "never"] = Field(
        "on_success", description="Delete the TrainJob when done: on_success, always or never"
    )
    attach: bool = Field(False, description="Follow an existing TrainJob of this name instead of failing")
