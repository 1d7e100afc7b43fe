"""A thin layer over MlflowClient. It talks to one explicit run id instead of MLflow's global
active run, so a stage in a KFP pod, a subprocess or a test nests under the right parent."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from llmfab.errors import TrackingError

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "llmfab"
PARENT_RUN_ENV = "LLMFAB_PARENT_RUN_ID"
MAX_PARAM_CHARS = 6000
METRICS_FLUSH_SECONDS = 5.0  # a run from Tracker.run on a sqlite file sends its metrics at most this late


def tracking_uri(explicit: str | None = None) -> str:
    """The explicit URI, else MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def redact_uri(uri: str) -> str:
    """`uri` without a password in it (http://user:***@host), fit for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _tracking_failures() -> tuple[type[Exception], ...]:
    """What a failing or unreachable tracking server raises (after MLflow's own HTTP retries)."""
    from mlflow.exceptions import MlflowException

    return MlflowException, OSError  # requests' connection errors and timeouts are OSErrors


def flatten_params(data: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists of scalars become JSON; values fit MLflow's limit."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten_params(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and any(isinstance(v, dict) for v in data):
        for i, value in enumerate(data):
            out.update(flatten_params(value, f"{prefix}.{i}"))
        return out
    text = json.dumps(data) if isinstance(data, list) else str(data)
    out[prefix or "value"] = text[:MAX_PARAM_CHARS]
    return out


def git_commit() -> str | None:
    """LLMFAB_GIT_COMMIT (set in images), else the checkout's HEAD if there is one."""
    if os.environ.get("LLMFAB_GIT_COMMIT"):
        return os.environ["LLMFAB_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def system_info() -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": str(os.cpu_count()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = str(torch.cuda.device_count())
    except ImportError:
        pass
    from llmfab import __version__

    info["llmfab"] = __version__
    commit = git_commit()
    if commit:
        info["git_commit"] = commit
    return info


class TrackedRun:
    """One MLflow run, addressed by id. With `flush_seconds`, metrics are sent in batches: held until that long after
    the first one waiting, then sent in one call (a training loop logs every few steps, and each call is a round
    trip: a commit to a sqlite file, a request to a server); `flush()` sends what waits (Tracker.run does at the end).
    """

    def __init__(self, client, run_id: str, experiment_id: str, flush_seconds: float = 0.0):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.flush_seconds = flush_seconds
        self._pending: list = []  # Metrics logged and not yet sent
        self._pending_since = 0.0

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # each metric keeps the time it was logged at, however late it is sent
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.extend(items)
        if len(self._pending) >= 1000 or time.monotonic() - self._pending_since >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Send the metrics that wait (MLflow caps a batch at 1000)."""
        items, self._pending = self._pending, []
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:MAX_PARAM_CHARS]) for k, v in tags.items()])

    def link_artifact(self, name: str, uri: str) -> None:
        """Record where an output lives in the object store (links, not copies)."""
        self.set_tags({f"llmfab.output.{name}": uri})

    def log_dataset(self, name: str, source: str, digest: str, context: str, source_type: str = "llmfab-store") -> None:
        """A dataset the run read, as an MLflow run input (the UI's Datasets column): its store URI as the source,
        its content's sha256 as the digest (MLflow shows 8 characters), `context` train or test."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type=source_type, source=json.dumps({"uri": source}))
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)])

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_system_info(self) -> None:
        self.set_tags({f"llmfab.system.{k}": v for k, v in system_info().items()})


class Tracker:
    """Creates runs in one experiment of one tracking server (sqlite file or `mlflow server`)."""

    def __init__(self, uri: str | None = None, experiment: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(uri)
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        # Before a stage runs (and writes anything): a server that is down fails the stage here, clearly.
        with self._failures("cannot reach it"):
            self.client = MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self.experiment_id = self.client.create_experiment(self.experiment)
                except Exception:  # created concurrently by another stage
                    self.experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
            else:
                self.experiment_id = found.experiment_id

    @contextlib.contextmanager
    def _failures(self, what: str, mlflow_only: bool = False) -> Iterator[None]:
        """MLflow's errors (and, around our own calls, connection errors) as a TrackingError naming the server."""
        from mlflow.exceptions import MlflowException

        caught = (MlflowException,) if mlflow_only else _tracking_failures()
        try:
            yield
        except caught as exc:
            password = urlsplit(self.uri).password
            reason = str(exc).replace(password, "***") if password else str(exc)  # MLflow's message has the URL
            raise TrackingError(f"MLflow tracking server {redact_uri(self.uri)}: {what}: {reason}") from None

    @contextlib.contextmanager
    def run(self, name: str, *, parent_run_id: str | None = None, tags: dict | None = None) -> Iterator[TrackedRun]:
        """Start a run (nested under `parent_run_id` if given); FINISHED on success, FAILED on error."""
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        with self._failures("cannot start a run"):
            created = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        # A sqlite file: batched metrics, each call being a commit to disk. A server: each call at once, so that a
        # stage stops at its next step when the server goes away (its checkpoints kept, see test_reliability).
        batched = METRICS_FLUSH_SECONDS if self.uri.startswith("sqlite:") else 0.0
        run = TrackedRun(self.client, created.info.run_id, self.experiment_id, flush_seconds=batched)
        status = "FAILED"
        try:
            # A stage's own errors pass through; MLflow's (e.g. the server went away mid-stage) name the server.
            with self._failures(f"run {run.run_id} failed", mlflow_only=True):
                yield run
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                with self._failures(f"cannot mark run {run.run_id} {status}"):
                    run.flush()  # a failed run keeps the metrics it logged, as a finished one does
                    self.client.set_terminated(run.run_id, status=status)
            except TrackingError:
                if status == "FINISHED":
                    raise  # the stage's work is done, but it must not look tracked when it is not
                # Already failing: keep that error (the one to act on); the run stays RUNNING, never FINISHED.
                log.warning("MLflow run %s could not be marked %s", run.run_id, status, exc_info=True)

    def child_runs(self, parent_run_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
        )


def copy_child_metrics(tracker: Tracker, parent_run_id: str) -> list:
    """Each nested run's final metrics onto the parent as `RUN_NAME.METRIC` (one place to compare steps);
    returns the nested runs."""
    children = tracker.child_runs(parent_run_id)
    parent = TrackedRun(tracker.client, parent_run_id, tracker.experiment_id)
    for run in children:
        metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")}  # the step's own
        parent.log_metrics({f"{run.info.run_name}.{k}": v for k, v in metrics.items()})
    return children


__all__ = ["PARENT_RUN_ENV", "TrackedRun", "Tracker", "system_info", "tracking_uri"]
