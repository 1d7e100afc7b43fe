"""The environment of a TrainJob's pods: settings as values, credentials never.

Credentials reach the pods only as references to keys of the Secrets llmfab-s3 / llmfab-mlflow (which the
runtimes also give whole, as envFrom; manifests/README.md, "Secrets") and llmfab-hf-token (HF_TOKEN, for gated hub
repos), so a rendered TrainJob holds none.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from llmfab.errors import ConfigError

if TYPE_CHECKING:
    from llmfab.kube.launch_config import LaunchConfig

# The Secrets the runtimes' pods read and the keys the stages use.
S3_SECRET = "llmfab-s3"
MLFLOW_SECRET = "llmfab-mlflow"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Gated hub repos (Llama 3.1, Gemma 2): key `token` of this Secret as HF_TOKEN, optional (public repos need none).
HF_TOKEN_SECRET = "llmfab-hf-token"
HF_TOKEN_KEY = "token"
HF_TOKEN_ENV = "HF_TOKEN"
# The hub cache every pod shares: PVC llmfab-hf-cache mounted here, HF_HOME pointing at it (manifests/base/runner).
HF_CACHE_PVC = "llmfab-hf-cache"
HF_HOME = "/var/cache/llmfab/hf"
PARENT_RUN_ENV = "LLMFAB_PARENT_RUN_ID"  # llmfab.tracking.mlflow_tracker.PARENT_RUN_ENV, without importing MLflow

CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def pod_env(launch: LaunchConfig) -> list[dict]:
    """The trainer's env entries: MLflow settings, the parent run, `launch.env`, then the Secret references."""
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
    ref = {"name": HF_TOKEN_SECRET, "key": HF_TOKEN_KEY, "optional": True}
    env.append({"name": HF_TOKEN_ENV, "valueFrom": {"secretKeyRef": ref}})
    names = [e["name"] for e in env]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"env: {', '.join(dupes)} set twice (the launcher sets these itself)")
    return env
