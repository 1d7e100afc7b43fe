"""Creating, following and deleting TrainJobs through the Kubernetes API (the kubernetes client's
CustomObjectsApi). Errors become LaunchError messages that say what to check.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from llmfab.kube.errors import LaunchError, TrainJobFailed, TrainJobTimeout
from llmfab.kube.manifest import GROUP, PLURAL, VERSION
from llmfab.kube.status import COMPLETE, FAILED, StatusChange, describe_status, failure_message

# The launch logs under one name, as before it was split into modules (so `--verbose` output keeps it).
log = logging.getLogger("llmfab.kube.trainjob")

REQUEST_TIMEOUT_S = 30
MAX_POLL_ERRORS = 5  # consecutive failed GETs before giving up


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
                raise TrainJobFailed(failure_message(obj, namespace, name))
        if deadline is not None and time.monotonic() >= deadline:
            seen = last.text if last is not None else "never read"
            raise TrainJobTimeout(
                f"TrainJob {namespace}/{name} did not finish within {timeout_s:g} s (last status: {seen})"
            )
        pause = poll_s if deadline is None else min(poll_s, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)
