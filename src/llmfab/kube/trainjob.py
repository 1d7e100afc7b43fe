"""Launch a training stage as a Kubeflow Trainer TrainJob and follow it to a terminal state.

    result = launch_stage(
        "pretrain", config, {"corpus": "s3://llmfab/data/text", "tokenizer": "s3://llmfab/tok"},
        output="s3://llmfab/runs/r1/pretrain",
        launch=LaunchConfig(num_nodes=2, gpus_per_node=8, cpu="90", memory="900Gi"),
    )

`render_trainjob` builds the object (trainer.kubeflow.org/v1alpha1 TrainJob; tests validate it against
manifests/schemas/trainjob-trainer-v1alpha1.json). It references the ClusterTrainingRuntime `llmfab-train`,
or `llmfab-deepspeed` when the config sets train.deepspeed (manifests/base/runtimes), and runs the stage's
own image (llmfab.images.image_for) with the arguments `stage NAME --output URI --write-result --set
FIELD=VALUE ... --input NAME=URI` after the runtime's `torchrun --no-python llmfab`: every rank runs
`llmfab stage`, rank 0 tracks in MLflow and writes. No credential is in it: env entries name keys of the
Secrets llmfab-s3 / llmfab-mlflow (which the runtimes also give whole, as envFrom).

`submit_trainjob` creates it with the kubernetes client's CustomObjectsApi; `wait_for_trainjob` polls it
until its Complete or Failed condition is True (Trainer v2 copies them from the JobSet's terminal
conditions; status.jobsStatus counts each replicated job's active / ready / succeeded / failed Jobs),
reporting each status change, and raises TrainJobFailed or TrainJobTimeout saying what to look at.
The stage writes OUTPUT/stage-result.json (outputs, metrics, MLflow run id), which `launch_stage` returns.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, Field

from llmfab.config.base import StrictModel
from llmfab.errors import ConfigError, LlmfabError

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainJob"
PLURAL = "trainjobs"
RUNTIME_KIND = "ClusterTrainingRuntime"
TRAIN_RUNTIME = "llmfab-train"
DEEPSPEED_RUNTIME = "llmfab-deepspeed"
TRAINER_IMAGE_GROUP = "deepspeed"  # llmfab.images: the group of every stage that runs the Trainer
# The Secrets the runtimes' pods read (manifests/README.md, "Secrets") and the keys the stages use.
S3_SECRET = "llmfab-s3"
MLFLOW_SECRET = "llmfab-mlflow"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
RESULT_FILE = "stage-result.json"  # written below --output by `llmfab stage --write-result`
PARENT_RUN_ENV = "LLMFAB_PARENT_RUN_ID"  # llmfab.tracking.mlflow_tracker.PARENT_RUN_ENV, without importing MLflow
# Trainer v2 condition types (pkg/apis/trainer/v1alpha1/trainjob_types.go); Created is set by releases
# that report JobSet creation. Complete and Failed are terminal.
COMPLETE, FAILED, SUSPENDED, CREATED = "Complete", "Failed", "Suspended", "Created"
RUNNING, PENDING = "Running", "Pending"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on every pod of the TrainJob's JobSet
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "kubeflow"  # where standalone KFP runs steps, and where manifests/base/runner puts the Secrets
REQUEST_TIMEOUT_S = 30
MAX_POLL_ERRORS = 5  # consecutive failed GETs before giving up

CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # TrainJob's CRD rule: an RFC 1035 label, at most 63
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_KEY = re.compile(f"({_DNS_PREFIX})?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(f"({_LABEL_NAME})?")
_QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?\d+)?")


class LaunchError(LlmfabError):
    """The TrainJob could not be submitted or followed, or did not succeed."""


class TrainJobFailed(LaunchError):
    """The TrainJob reached its Failed condition."""


class TrainJobTimeout(LaunchError):
    """The TrainJob did not reach a terminal condition in time."""


class LaunchConfig(StrictModel):
    """How a stage runs as a TrainJob (everything but the stage's own config and inputs)."""

    namespace: str | None = Field(None, description="TrainJob namespace [default: this pod's, else kubeflow]")
    name: str | None = Field(None, description="TrainJob name, an RFC 1035 label [default: STAGE-TIME-RANDOM]")
    num_nodes: int = Field(1, ge=1, description="training nodes (pods)")
    procs_per_node: int | None = Field(
        None, ge=1, description="ranks per node [default: the runtime's `auto`: one per GPU, else per CPU]"
    )
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs each node's container asks for")
    cpu: str | None = Field(None, description="CPU of each node's container, e.g. '16'")
    memory: str | None = Field(None, description="memory of each node's container, e.g. '64Gi'")
    gpu_resource: str = Field("nvidia.com/gpu", description="the extended resource name of a GPU")
    runtime: str | None = Field(None, description="ClusterTrainingRuntime [default: by train.deepspeed]")
    image: str | None = Field(None, description="container image [default: the stage's, llmfab.images.image_for]")
    registry: str | None = Field(None, description="image registry [default: $LLMFAB_IMAGE_REGISTRY]")
    tag: str | None = Field(None, description="image tag [default: $LLMFAB_IMAGE_TAG or the llmfab version]")
    tracking_uri: str | None = Field(None, description="MLflow URI for the pods [default: ConfigMap llmfab-env's]")
    experiment: str | None = Field(None, description="MLflow experiment [default: ConfigMap llmfab-env's]")
    parent_run_id: str | None = Field(None, description=f"MLflow parent run [default: ${PARENT_RUN_ENV}]")
    env: dict[str, str] = Field(default_factory=dict, description="more environment (never credentials)")
    labels: dict[str, str] = Field(default_factory=dict, description="more labels on the TrainJob")
    s3_secret: str | None = Field(S3_SECRET, description="Secret holding AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    mlflow_secret: str | None = Field(MLFLOW_SECRET, description="Secret holding MLFLOW_TRACKING_USERNAME/PASSWORD")
    timeout_s: float | None = Field(72 * 3600.0, gt=0, description="give up waiting after this; None: never")
    poll_s: float = Field(15.0, gt=0, description="seconds between status reads")
    cleanup: Literal["on_success", "always", "never"] = Field(
        "on_success", description="delete the TrainJob when done: after success only, always, or never"
    )
    attach: bool = Field(False, description="follow an existing TrainJob of the same name instead of failing")


@dataclass(frozen=True)
class StatusChange:
    """One reported change of a TrainJob's status."""

    phase: str  # Pending, Created, Running, Suspended, Complete or Failed
    text: str  # one line: phase, conditions, per-job counts
    status: dict = field(default_factory=dict)  # .status as the API served it

    def __str__(self) -> str:
        return self.text


@dataclass
class LaunchResult:
    name: str
    namespace: str
    outputs: dict[str, str]
    metrics: dict[str, float]
    run_id: str | None
    status: dict
    seconds: float


# -- rendering ---------------------------------------------------------------------------------


def default_namespace() -> str:
    """This pod's namespace when running in a cluster (a KFP step), else `kubeflow`."""
    try:
        return IN_CLUSTER_NAMESPACE.read_text().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


def trainjob_name(stage: str) -> str:
    """STAGE-YYMMDD-HHMMSS-RAND, e.g. pretrain-250611-140502-9f3a."""
    return f"{stage.replace('_', '-')}-{time.strftime('%y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _check_name(name: str) -> str:
    if not (_NAME.fullmatch(name) and len(name) <= 63):
        raise ConfigError(
            f"TrainJob name {name!r}: must be a lowercase RFC 1035 label (a-z, 0-9, '-'; starting with a letter) "
            "of at most 63 characters"
        )
    return name


def _train_configs(value) -> list:
    """Every TrainConfig inside a stage config (some stages train in several phases)."""
    from llmfab.train.config import TrainConfig

    if isinstance(value, TrainConfig):
        return [value]
    if isinstance(value, BaseModel):
        return [tc for name in type(value).model_fields for tc in _train_configs(getattr(value, name))]
    if isinstance(value, dict):
        return [tc for v in value.values() for tc in _train_configs(v)]
    if isinstance(value, list | tuple):
        return [tc for v in value for tc in _train_configs(v)]
    return []


def config_overrides(spec, cfg) -> list[str]:
    """`FIELD=VALUE` for every top-level field of a validated config, VALUE as one-line YAML, such that
    `llmfab stage NAME --set ...` rebuilds exactly `cfg` (checked here)."""
    from llmfab.config.base import apply_overrides

    items = []
    for key, value in cfg.model_dump(mode="json").items():
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True, sort_keys=False)
        text = text.strip().removesuffix("...").strip()  # a top-level scalar ends with YAML's document marker
        items.append(f"{key}={text}")
    rebuilt = spec.make_config(apply_overrides({}, items), source=f"stage {spec.name} (rendered --set)")
    if rebuilt != cfg:
        raise ConfigError(f"stage {spec.name}: its config does not survive rendering as --set overrides")
    return items


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


def _env(launch: LaunchConfig) -> list[dict]:
    env: list[dict] = []
    if launch.tracking_uri:
        if urlparse(launch.tracking_uri).password:
            raise ConfigError(
                "tracking_uri carries a password; MLflow credentials come from the Secret "
                f"{launch.mlflow_secret or MLFLOW_SECRET} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
            )
        env.append({"name": "MLFLOW_TRACKING_URI", "value": launch.tracking_uri})
    if launch.experiment:
        env.append({"name": "MLFLOW_EXPERIMENT_NAME", "value": launch.experiment})
    parent = launch.parent_run_id or os.environ.get(PARENT_RUN_ENV)
    if parent:
        env.append({"name": PARENT_RUN_ENV, "value": parent})
    for name, value in sorted(launch.env.items()):
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"env {name!r}: not a valid environment variable name")
        if CREDENTIAL_NAME.search(name):
            raise ConfigError(
                f"env {name}: credentials are never passed as values; pods read them from the Secrets "
                f"{S3_SECRET} and {MLFLOW_SECRET} (LaunchConfig.s3_secret / mlflow_secret)"
            )
        env.append({"name": name, "value": value})
    # By reference only: the Secret's key, never its value. MLflow's are optional (a server without auth).
    for secret, keys, optional in ((launch.s3_secret, S3_KEYS, False), (launch.mlflow_secret, MLFLOW_KEYS, True)):
        if secret:
            for key in keys:
                ref = {"name": secret, "key": key, **({"optional": True} if optional else {})}
                env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    names = [e["name"] for e in env]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"env: {', '.join(dupes)} set twice (the launcher sets these itself)")
    return env


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

    deepspeed = any(tc.deepspeed is not None for tc in _train_configs(cfg))
    procs = launch.procs_per_node
    if deepspeed:
        if launch.num_nodes > 1 or (procs or 1) > 1 or (launch.gpus_per_node or 0) > 1:
            raise ConfigError(
                f"stage {stage}: train.deepspeed runs in one process (multi-rank DeepSpeed is not supported: only "
                "rank 0 uploads checkpoints); use one node, one process and at most one GPU, or drop "
                "train.deepspeed to train data-parallel (DDP) on many"
            )
        procs = 1  # the runtime's `auto` would start one rank per GPU or CPU
    runtime = launch.runtime or (DEEPSPEED_RUNTIME if deepspeed else TRAIN_RUNTIME)
    image = launch.image or image_for(stage, launch.registry, launch.tag)
    name = _check_name(launch.name or trainjob_name(stage))

    args = ["--verbose", "stage", stage, "--output", output, "--write-result"]
    for item in config_overrides(spec, cfg):
        args += ["--set", item]
    for key, uris in sorted(inputs.items()):
        for uri in [uris] if isinstance(uris, str) else uris:
            args += ["--input", f"{key}={uri}"]
    if len(args) > 128:  # the TrainJob CRD's limit
        raise ConfigError(f"stage {stage}: {len(args)} container arguments, more than a TrainJob takes (128)")

    trainer: dict = {"image": image, "args": args, "env": _env(launch), "numNodes": launch.num_nodes}
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


# -- status --------------------------------------------------------------------------------------


def _condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def _is_true(status: dict, kind: str) -> bool:
    cond = _condition(status, kind)
    return cond is not None and cond.get("status") == "True"


def trainjob_phase(obj: dict) -> str:
    """Complete / Failed (terminal), Suspended, Running (a child Job has active pods), Created, or Pending."""
    status = obj.get("status") or {}
    if _is_true(status, COMPLETE):
        return COMPLETE
    if _is_true(status, FAILED):
        return FAILED
    if _is_true(status, SUSPENDED):
        return SUSPENDED
    jobs = status.get("jobsStatus") or []
    if any((job.get("active") or 0) > 0 for job in jobs):
        return RUNNING
    if _is_true(status, CREATED) or jobs:
        return CREATED
    return PENDING


def _jobs_text(status: dict) -> str:
    parts = []
    for job in status.get("jobsStatus") or []:
        counts = ", ".join(f"{job.get(k) or 0} {k}" for k in ("active", "ready", "succeeded", "failed"))
        suspended = f", {job['suspended']} suspended" if job.get("suspended") else ""
        parts.append(f"{job.get('name', '?')}: {counts}{suspended}")
    return "; ".join(parts)


def describe_status(obj: dict) -> StatusChange:
    status = obj.get("status") or {}
    phase = trainjob_phase(obj)
    conds = ", ".join(
        f"{c.get('type')}={c.get('status')}" + (f" ({c['reason']})" if c.get("reason") else "")
        for c in status.get("conditions") or []
    )
    jobs = _jobs_text(status)
    text = phase + (f" | conditions: {conds}" if conds else "") + (f" | jobs: {jobs}" if jobs else "")
    return StatusChange(phase, text, status)


def _failure(obj: dict, namespace: str, name: str) -> str:
    status = obj.get("status") or {}
    cond = _condition(status, FAILED) or {}
    reason = cond.get("reason") or "no reason given"
    message = f": {cond['message']}" if cond.get("message") else ""
    jobs = f" Jobs: {_jobs_text(status)}." if status.get("jobsStatus") else ""
    return (
        f"TrainJob {namespace}/{name} failed ({reason}{message}).{jobs} Logs: kubectl -n {namespace} logs "
        f"-l {JOBSET_NAME_LABEL}={name} --all-containers --prefix --tail=200"
    )


# -- the API ----------------------------------------------------------------------------------------


def kube_client(context: str | None = None):
    """A kubernetes ApiClient: the pod's service account in a cluster, else the kubeconfig (`context`)."""
    from kubernetes import client, config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            # $KUBECONFIG as it is now (the client reads it once, at import), else ~/.kube/config.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, context=context)
    except (config.ConfigException, OSError) as exc:
        raise LaunchError(
            f"no Kubernetes API access: {exc} (a pod uses its service account; elsewhere ~/.kube/config or $KUBECONFIG)"
        ) from None
    return client.ApiClient()


def _custom_objects(api_client):
    from kubernetes import client

    return client.CustomObjectsApi(api_client)


def _api_message(exc) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return exc.reason or str(exc.body or "")


def _api_problem(exc, doing: str, namespace: str, verb: str) -> str:
    hints = {
        401: "the API server refused the credentials",
        403: (
            f"the service account may not {verb} trainjobs.{GROUP} in namespace {namespace} "
            "(manifests/base/runner/rbac.yaml grants it to pipeline-runner in kubeflow)"
        ),
        404: "is Kubeflow Trainer installed? (kubectl apply --server-side -k manifests/upstream/trainer)",
        409: "a TrainJob of that name exists: choose another name, delete it, or attach to it",
        422: "the API server rejected the object",
    }
    hint = hints.get(exc.status)
    return f"{doing}: HTTP {exc.status} {_api_message(exc)}" + (f"; {hint}" if hint else "")


def _unreachable(api_client, exc: Exception) -> str:
    host = getattr(getattr(api_client, "configuration", None), "host", "?")
    return f"cannot reach the Kubernetes API at {host}: {type(exc).__name__}: {exc}"


def submit_trainjob(obj: dict, api_client=None, *, attach: bool = False) -> dict:
    """Create the TrainJob; with `attach`, an existing one of that name is returned instead."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api = _custom_objects(api_client)
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        return api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, obj, _request_timeout=REQUEST_TIMEOUT_S
        )
    except ApiException as exc:
        if exc.status == 409 and attach:
            log.info("TrainJob %s/%s exists: following it", namespace, name)
            try:
                return api.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT_S
                )
            except ApiException as again:
                problem = _api_problem(again, f"reading TrainJob {namespace}/{name}", namespace, "get")
                raise LaunchError(problem) from None
        raise LaunchError(_api_problem(exc, f"creating TrainJob {namespace}/{name}", namespace, "create")) from None
    except (HTTPError, OSError) as exc:
        raise LaunchError(f"creating TrainJob {namespace}/{name}: {_unreachable(api_client, exc)}") from None


def delete_trainjob(name: str, namespace: str, api_client=None) -> bool:
    """Delete the TrainJob (its JobSet and pods go with it); False when it was already gone."""
    from kubernetes.client.exceptions import ApiException

    try:
        _custom_objects(api_client).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background", _request_timeout=REQUEST_TIMEOUT_S
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise LaunchError(_api_problem(exc, f"deleting TrainJob {namespace}/{name}", namespace, "delete")) from None
    return True


def wait_for_trainjob(
    name: str,
    namespace: str,
    api_client=None,
    *,
    timeout_s: float | None = None,
    poll_s: float = 15.0,
    on_status: Callable[[StatusChange], None] | None = None,
) -> dict:
    """Poll the TrainJob until Complete (returned) or Failed (TrainJobFailed), reporting each change of its
    status; TrainJobTimeout after `timeout_s`. A few API errors in a row are retried, not fatal."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api = _custom_objects(api_client)
    report = on_status or (lambda change: log.info("TrainJob %s/%s: %s", namespace, name, change.text))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last, errors = None, 0
    while True:
        try:
            obj = api.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT_S
            )
            errors = 0
        except ApiException as exc:
            if exc.status == 404:
                raise LaunchError(f"TrainJob {namespace}/{name} no longer exists (deleted while followed)") from None
            if exc.status in (401, 403) or errors >= MAX_POLL_ERRORS:
                raise LaunchError(_api_problem(exc, f"reading TrainJob {namespace}/{name}", namespace, "get")) from None
            obj, errors = None, errors + 1
            log.warning("reading TrainJob %s/%s: HTTP %s (retrying)", namespace, name, exc.status)
        except (HTTPError, OSError) as exc:
            if errors >= MAX_POLL_ERRORS:
                raise LaunchError(f"reading TrainJob {namespace}/{name}: {_unreachable(api_client, exc)}") from None
            obj, errors = None, errors + 1
            log.warning("reading TrainJob %s/%s: %s (retrying)", namespace, name, exc)
        if obj is not None:
            change = describe_status(obj)
            if last is None or change.text != last.text:
                report(change)
            last = change
            if change.phase == COMPLETE:
                return obj
            if change.phase == FAILED:
                raise TrainJobFailed(_failure(obj, namespace, name))
        if deadline is not None and time.monotonic() >= deadline:
            seen = last.text if last is not None else "never read"
            raise TrainJobTimeout(
                f"TrainJob {namespace}/{name} did not finish within {timeout_s:g} s (last status: {seen})"
            )
        pause = poll_s if deadline is None else min(poll_s, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)


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
    launch = launch.model_copy(update={"name": _check_name(launch.name or trainjob_name(stage))})
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
