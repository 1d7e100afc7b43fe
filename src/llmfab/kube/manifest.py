"""The TrainJob object a training stage runs as (trainer.kubeflow.org/v1alpha1; tests validate it against
manifests/schemas/trainjob-trainer-v1alpha1.json).

It references the ClusterTrainingRuntime `llmfab-train`, or `llmfab-deepspeed` when the config sets
train.deepspeed (manifests/base/runtimes), and runs the stage's own image (llmfab.images.image_for) with the
arguments of llmfab.kube.stage_command and the environment of llmfab.kube.pod_env.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

from llmfab.errors import ConfigError
from llmfab.kube.launch_config import LaunchConfig
from llmfab.kube.pod_env import pod_env
from llmfab.kube.stage_command import ranks_per_node, stage_args, uses_deepspeed

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainJob"
PLURAL = "trainjobs"
RUNTIME_KIND = "ClusterTrainingRuntime"
TRAIN_RUNTIME = "llmfab-train"
DEEPSPEED_RUNTIME = "llmfab-deepspeed"
TRAINER_IMAGE_GROUP = "deepspeed"  # llmfab.images: the group of every stage that runs the Trainer
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "kubeflow"  # where standalone KFP runs steps, and where manifests/base/runner puts the Secrets

_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # TrainJob's CRD rule: an RFC 1035 label, at most 63
_DNS_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_KEY = re.compile(f"({_DNS_PREFIX})?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(f"({_LABEL_NAME})?")
_QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?\d+)?")


def default_namespace() -> str:
    """This pod's namespace when running in a cluster (a KFP step), else `kubeflow`."""
    try:
        return IN_CLUSTER_NAMESPACE.read_text().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


def trainjob_name(stage: str) -> str:
    """STAGE-YYMMDD-HHMMSS-RAND, e.g. pretrain-250611-140502-9f3a."""
    return f"{stage.replace('_', '-')}-{time.strftime('%y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_name(name: str) -> str:
    """`name`, if the TrainJob CRD takes it."""
    if not (_NAME.fullmatch(name) and len(name) <= 63):
        raise ConfigError(
            f"TrainJob name {name!r}: must be a lowercase RFC 1035 label (a-z, 0-9, '-'; starting with a letter) "
            "of at most 63 characters"
        )
    return name


def _check_remote(what: str, uri: str, *, s3_only: bool) -> None:
    local = uri.startswith(("file://", "/", "./", "../", "~")) or Path(uri).exists()
    if (s3_only and not uri.startswith("s3://")) or local:
        raise ConfigError(
            f"{what} {uri!r}: a TrainJob's pods cannot see this machine's files; give an s3:// URI in the store"
        )


def _check_quantity(what: str, value: str) -> str:
    if not _QUANTITY.fullmatch(value):
        raise ConfigError(f"{what} {value!r}: not a Kubernetes quantity (e.g. '8', '500m', '64Gi')")
    return value


def _resources(launch: LaunchConfig) -> dict | None:
    """resourcesPerNode, which replaces the runtime's resources of the node container (so cpu and memory
    are required with it, keeping every pod bounded)."""
    if launch.cpu is None and launch.memory is None and launch.gpus_per_node is None:
        return None
    if launch.cpu is None or launch.memory is None:
        raise ConfigError(
            "resources per node replace the runtime's resources of each node's container: give cpu and memory "
            "(and gpus_per_node when the nodes have GPUs), or none of them to keep the runtime's"
        )
    amounts = {"cpu": _check_quantity("cpu", launch.cpu), "memory": _check_quantity("memory", launch.memory)}
    if launch.gpus_per_node:
        amounts[launch.gpu_resource] = str(launch.gpus_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _labels(stage: str, launch: LaunchConfig) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/part-of": "llmfab",
        "app.kubernetes.io/managed-by": "llmfab",
        "llmfab.dev/stage": stage,
    }
    for key, value in launch.labels.items():
        if not (_LABEL_KEY.fullmatch(key) and len(key.rpartition("/")[2]) <= 63):
            raise ConfigError(f"label {key!r}: not a valid Kubernetes label key")
        if not (_LABEL_VALUE.fullmatch(value) and len(value) <= 63):
            raise ConfigError(f"label {key}={value!r}: not a valid label value (<= 63 of A-Z a-z 0-9 - _ .)")
        if key in labels and labels[key] != value:
            raise ConfigError(f"label {key}: set by the launcher ({labels[key]})")
        labels[key] = value
    return labels


def render_trainjob(
    stage: str,
    config: dict | object | None,
    inputs: dict[str, str | list[str]],
    output: str,
    launch: LaunchConfig | None = None,
) -> dict:
    """The TrainJob that runs stage `stage` with `config` on `inputs`, writing below `output` (s3://)."""
    from llmfab.images import image_for, stage_group
    from llmfab.stages import get_stage

    launch = launch or LaunchConfig()
    spec = get_stage(stage)
    cfg = spec.make_config(config, source=f"stage {stage}")
    inputs = dict(inputs)
    spec.check_inputs(inputs)
    group = stage_group(stage)
    if group.name != TRAINER_IMAGE_GROUP:
        raise ConfigError(
            f"stage {stage} does not run the Trainer (image group {group.name}): a TrainJob would start one copy "
            "of it per rank; run it as a plain pipeline step"
        )
    _check_remote("output", output, s3_only=True)
    for key, uris in inputs.items():
        for uri in [uris] if isinstance(uris, str) else uris:
            _check_remote(f"input {key}", uri, s3_only=False)

    deepspeed = uses_deepspeed(cfg)
    procs = ranks_per_node(stage, launch, deepspeed)
    runtime = launch.runtime or (DEEPSPEED_RUNTIME if deepspeed else TRAIN_RUNTIME)
    image = launch.image or image_for(stage, launch.registry, launch.tag)
    name = check_name(launch.name or trainjob_name(stage))
    args = stage_args(spec, cfg, inputs, output)

    trainer: dict = {"image": image, "args": args, "env": pod_env(launch), "numNodes": launch.num_nodes}
    if procs is not None:
        trainer["numProcPerNode"] = procs
    resources = _resources(launch)
    if resources is not None:
        trainer["resourcesPerNode"] = resources
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": launch.namespace or default_namespace(),
            "labels": _labels(stage, launch),
            "annotations": {"llmfab.dev/output": output},
        },
        "spec": {"runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": runtime}, "trainer": trainer},
    }
