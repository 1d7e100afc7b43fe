"""Launch a training stage as a Kubeflow Trainer TrainJob and follow it to a terminal state.

    result = launch_stage(
        "pretrain", config, {"corpus": "s3://llmfab/data/text", "tokenizer": "s3://llmfab/tok"},
        output="s3://llmfab/runs/r1/pretrain",
        launch=LaunchConfig(num_nodes=2, gpus_per_node=8, cpu="90", memory="900Gi"),
    )

`launch_stage` renders the TrainJob, submits it, waits for its Complete or Failed condition (reporting each
status change), deletes it as LaunchConfig.cleanup says, and returns what the stage wrote to
OUTPUT/stage-result.json (outputs, metrics, MLflow run id). The pieces, one module each:

    launch_config  LaunchConfig: how a stage runs as a TrainJob (also `llmfab launch`'s options)
    manifest       render_trainjob: the TrainJob object (runtime, image, resources, labels)
    stage_command  the arguments every rank runs (`llmfab stage ...`) and the ranks per node
    pod_env        the pods' environment; credentials only as Secret references
    api            submit_trainjob / wait_for_trainjob / delete_trainjob through the Kubernetes API
    status         a TrainJob's phase and a one-line summary of its status
    errors         LaunchError, TrainJobFailed, TrainJobTimeout

Their public names stay importable from here, where they lived before the split.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmfab.errors import ConfigError
from llmfab.kube.api import (
    MAX_POLL_ERRORS,
    REQUEST_TIMEOUT_S,
    delete_trainjob,
    kube_client,
    submit_trainjob,
    wait_for_trainjob,
)
from llmfab.kube.errors import LaunchError, TrainJobFailed, TrainJobTimeout
from llmfab.kube.launch_config import LaunchConfig
from llmfab.kube.manifest import (
    API_VERSION,
    DEEPSPEED_RUNTIME,
    DEFAULT_NAMESPACE,
    GROUP,
    IN_CLUSTER_NAMESPACE,
    KIND,
    PLURAL,
    RUNTIME_KIND,
    TRAIN_RUNTIME,
    TRAINER_IMAGE_GROUP,
    VERSION,
    check_name,
    default_namespace,
    render_trainjob,
    trainjob_name,
)
from llmfab.kube.pod_env import CREDENTIAL_NAME, MLFLOW_KEYS, MLFLOW_SECRET, PARENT_RUN_ENV, S3_KEYS, S3_SECRET
from llmfab.kube.stage_command import RESULT_FILE, config_overrides
from llmfab.kube.status import (
    COMPLETE,
    CREATED,
    FAILED,
    JOBSET_NAME_LABEL,
    PENDING,
    RUNNING,
    SUSPENDED,
    StatusChange,
    describe_status,
    trainjob_phase,
)

__all__ = [
    "API_VERSION",
    "COMPLETE",
    "CREATED",
    "CREDENTIAL_NAME",
    "DEEPSPEED_RUNTIME",
    "DEFAULT_NAMESPACE",
    "FAILED",
    "GROUP",
    "IN_CLUSTER_NAMESPACE",
    "JOBSET_NAME_LABEL",
    "KIND",
    "MAX_POLL_ERRORS",
    "MLFLOW_KEYS",
    "MLFLOW_SECRET",
    "PARENT_RUN_ENV",
    "PENDING",
    "PLURAL",
    "REQUEST_TIMEOUT_S",
    "RESULT_FILE",
    "RUNNING",
    "RUNTIME_KIND",
    "S3_KEYS",
    "S3_SECRET",
    "SUSPENDED",
    "TRAINER_IMAGE_GROUP",
    "TRAIN_RUNTIME",
    "VERSION",
    "LaunchConfig",
    "LaunchError",
    "LaunchResult",
    "StatusChange",
    "TrainJobFailed",
    "TrainJobTimeout",
    "config_overrides",
    "default_namespace",
    "default_output",
    "delete_trainjob",
    "describe_status",
    "kube_client",
    "launch_stage",
    "read_result",
    "render_trainjob",
    "submit_trainjob",
    "trainjob_name",
    "trainjob_phase",
    "wait_for_trainjob",
]

log = logging.getLogger(__name__)


@dataclass
class LaunchResult:
    name: str
    namespace: str
    outputs: dict[str, str]
    metrics: dict[str, float]
    run_id: str | None
    status: dict
    seconds: float


def default_output(name: str, store: str | None = None) -> str:
    """STORE/stages/NAME, STORE being `store` or $LLMFAB_STORE (an s3:// root)."""
    from llmfab.storage import default_store_uri

    root = store or default_store_uri()
    if not root.startswith("s3://"):
        raise ConfigError(
            f"store {root!r}: a TrainJob's pods write to the object store; give an s3:// output or store "
            "(--output / --store, or $LLMFAB_STORE)"
        )
    return f"{root.rstrip('/')}/stages/{name}"


def read_result(output: str) -> dict:
    """What `llmfab stage --write-result` left below `output`: outputs, metrics, run_id."""
    from llmfab.errors import StoreError
    from llmfab.storage import open_store

    try:
        return json.loads(open_store(output).get_text(RESULT_FILE))
    except (StoreError, FileNotFoundError, KeyError, ValueError) as exc:
        raise LaunchError(
            f"{output}/{RESULT_FILE}: the stage's result is missing or unreadable ({exc}); an image older than "
            "`llmfab stage --write-result`?"
        ) from None


def launch_stage(
    stage: str,
    config: dict | object | None,
    inputs: dict[str, str | list[str]],
    *,
    output: str | None = None,
    store: str | None = None,
    launch: LaunchConfig | None = None,
    api_client=None,
    on_status: Callable[[StatusChange], None] | None = None,
) -> LaunchResult:
    """Run `stage` as a TrainJob, wait for its end, and return the stage's outputs (see module doc)."""
    launch = launch or LaunchConfig()
    launch = launch.model_copy(update={"name": check_name(launch.name or trainjob_name(stage))})
    output = output or default_output(launch.name, store)
    obj = render_trainjob(stage, config, inputs, output, launch)
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    api_client = api_client if api_client is not None else kube_client()
    start = time.time()
    submit_trainjob(obj, api_client, attach=launch.attach)
    log.info("submitted TrainJob %s/%s (runtime %s)", namespace, name, obj["spec"]["runtimeRef"]["name"])
    succeeded = False
    try:
        final = wait_for_trainjob(
            name, namespace, api_client, timeout_s=launch.timeout_s, poll_s=launch.poll_s, on_status=on_status
        )
        succeeded = True
    except LaunchError as exc:
        if launch.cleanup == "always":
            raise
        note = f" The TrainJob is kept; remove it with: kubectl -n {namespace} delete trainjob {name}"
        raise type(exc)(f"{exc}.{note}" if not str(exc).endswith(".") else f"{exc}{note}") from None
    finally:
        if launch.cleanup == "always" or (succeeded and launch.cleanup == "on_success"):
            delete_trainjob(name, namespace, api_client)
    result = read_result(output)
    return LaunchResult(
        name=name,
        namespace=namespace,
        outputs=dict(result.get("outputs") or {}),
        metrics=dict(result.get("metrics") or {}),
        run_id=result.get("run_id"),
        status=final.get("status") or {},
        seconds=time.time() - start,
    )
