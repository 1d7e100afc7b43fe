"""The KFP server executor: compile the family's pipeline for the plan's preset and overrides and start it on a
Kubeflow Pipelines server (kfp.Client), once (optionally followed to its end) or on a cron schedule (a recurring
run). Credentials never travel as arguments: the pods read the Secrets."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmfab.errors import ConfigError, LlmfabError
from llmfab.kubeflow.runtime import KFP_RUN_TAG
from llmfab.runs.kfp_local import step_run
from llmfab.runs.plan import RunPlan
from llmfab.runs.result import PipelineResult

DEFAULT_KFP_EXPERIMENT = "llmfab"


@dataclass
class Scheduled:
    id: str  # the recurring run's
    experiment_id: str
    name: str


def pipeline_arguments(plan: RunPlan, *, with_run_name: bool = True) -> dict:
    """The pipeline parameters to set; left out, a parameter keeps its default (the pod's environment)."""
    args: dict = {"preset": plan.preset}
    if plan.overrides:
        args["overrides"] = list(plan.overrides)
    if plan.named or with_run_name:
        args["run_name"] = plan.run_name
    # Only what the user chose: the pods' environment decides the rest (their store and tracking server).
    for key, value in (("store", plan.store), ("tracking_uri", plan.tracking.uri)):
        if value:
            args[key] = value
    if plan.tracking.experiment:
        args["experiment"] = plan.tracking.experiment
    return args


def cron_line(expr: str) -> str:
    """KFP wants 6 fields (seconds first); a usual 5-field cron line gets '0 ' in front."""
    fields = expr.split()
    if len(fields) == 5:
        return "0 " + expr.strip()
    if len(fields) == 6:
        return expr.strip()
    raise ConfigError(f"--schedule {expr!r}: expected a cron line of 5 (or 6, seconds first) fields")


@dataclass
class KfpServer:
    host: str
    namespace: str | None = None
    kfp_experiment: str = DEFAULT_KFP_EXPERIMENT
    registry: str | None = None  # the images' registry and tag (default: the package's)
    tag: str | None = None
    trainjobs: dict | None = None  # step id -> LaunchConfig: those steps run as TrainJobs
    wait: bool = False
    timeout_s: float = 24 * 3600.0
    client: Any = None  # a kfp.Client (tests give a fake one)
    name = "kfp"

    def _client(self):
        if self.client is None:
            import kfp

            self.client = kfp.Client(host=self.host, namespace=self.namespace or "kubeflow")
        return self.client

    def _package(self, plan: RunPlan, tmp: str) -> Path:
        from llmfab.kubeflow.pipelines import compile_pipeline

        return compile_pipeline(
            plan.recipe_ref,
            Path(tmp) / f"{plan.family}.yaml",
            recipe=plan.recipe,
            overrides=list(plan.overrides),
            registry=self.registry,
            tag=self.tag,
            trainjobs=self.trainjobs,
        )

    def _server_errors(self):
        return _ServerErrors(self.host)

    def run(self, plan: RunPlan) -> PipelineResult:
        """Create the run; with `wait`, follow it to its end (an error unless it SUCCEEDED) and find its MLflow run
        with the step runs."""
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp, self._server_errors():
            package = self._package(plan, tmp)
            created = self._client().create_run_from_pipeline_package(
                str(package),
                arguments=pipeline_arguments(plan),
                run_name=plan.run_name,
                experiment_name=self.kfp_experiment,
                namespace=self.namespace,
            )
        result = PipelineResult(plan.run_name, None, plan.run_store_uri, self.name, kfp_run_id=created.run_id,
                                kfp_experiment_id=created.run_info.experiment_id)  # fmt: skip
        result.state = "RUNNING"
        if not self.wait:
            return result
        try:
            run = self._client().wait_for_run_completion(created.run_id, timeout=self.timeout_s)
        except Exception as exc:  # kfp's TimeoutError or an API error: the server's own words
            raise LlmfabError(f"KFP run {created.run_id}: {type(exc).__name__}: {exc}") from exc
        result.state = str(getattr(run, "state", "") or "")
        if result.state != "SUCCEEDED":
            raise LlmfabError(f"KFP run {created.run_id} ended {result.state or 'without a state'}")
        result.seconds = time.time() - start
        tracker = plan.tracking.tracker()
        found = tracker.client.search_runs([tracker.experiment_id], f"tags.`{KFP_RUN_TAG}` = '{created.run_id}'")
        if found:
            result.run_id = found[0].info.run_id
            result.steps = {r.info.run_name: step_run(r) for r in tracker.child_runs(result.run_id)}
        return result

    def schedule(self, plan: RunPlan, cron: str, max_concurrency: int = 1) -> Scheduled:
        """A recurring run: each of its runs names itself (FAMILY-PRESET-TIME) unless the plan was named."""
        cron = cron_line(cron)
        name = plan.run_name if plan.named else f"{plan.family}-{plan.preset}"
        with tempfile.TemporaryDirectory() as tmp, self._server_errors():
            package = self._package(plan, tmp)
            client = self._client()
            exp = client.create_experiment(self.kfp_experiment, namespace=self.namespace)
            job = client.create_recurring_run(
                exp.experiment_id,
                name,
                cron_expression=cron,
                max_concurrency=max_concurrency,
                no_catchup=True,
                params=pipeline_arguments(plan, with_run_name=False),
                pipeline_package_path=str(package),
                enable_caching=False,
            )
        return Scheduled(job.recurring_run_id, exp.experiment_id, name)


class _ServerErrors:
    """kfp_server_api / urllib3 errors as an LlmfabError with the server's own message."""

    def __init__(self, host: str):
        self.host = host

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, LlmfabError):
            return False
        raise LlmfabError(f"KFP at {self.host}: {type(exc).__name__}: {str(exc).strip()[:2000]}") from exc
