"""`llmfab submit`: compile a family pipeline and start it on a Kubeflow Pipelines server (kfp.Client), once or
on a cron schedule (a recurring run). Credentials never travel as arguments: the pods read the Secrets."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmfab.errors import ConfigError, LlmfabError

DEFAULT_KFP_EXPERIMENT = "llmfab"


@dataclass
class Submitted:
    kind: str  # "run" or "recurring_run"
    id: str
    experiment_id: str
    name: str


def pipeline_arguments(
    preset: str,
    overrides: list[str] | None = None,
    store: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
) -> dict:
    """The pipeline parameters to set; left out, a parameter keeps its default (the pod's environment)."""
    args: dict = {"preset": preset}
    if overrides:
        args["overrides"] = list(overrides)
    for key, value in (("store", store), ("tracking_uri", tracking_uri), ("experiment", experiment)):
        if value:
            args[key] = value
    if run_name:
        args["run_name"] = run_name
    return args


def _cron(expr: str) -> str:
    """KFP wants 6 fields (seconds first); a usual 5-field cron line gets '0 ' in front."""
    fields = expr.split()
    if len(fields) == 5:
        return "0 " + expr.strip()
    if len(fields) == 6:
        return expr.strip()
    raise ConfigError(f"--schedule {expr!r}: expected a cron line of 5 (or 6, seconds first) fields")


def submit(
    family: str,
    *,
    host: str,
    preset: str = "tiny",
    overrides: list[str] | None = None,
    store: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    kfp_experiment: str = DEFAULT_KFP_EXPERIMENT,
    namespace: str | None = None,
    schedule: str | None = None,
    max_concurrency: int = 1,
    registry: str | None = None,
    tag: str | None = None,
    trainjobs: dict | None = None,
    client=None,
) -> Submitted:
    """Compile `family`'s pipeline and create a run (or, with `schedule`, a recurring run) on the KFP at `host`."""
    from llmfab.config.recipe import load_recipe
    from llmfab.kubeflow.pipelines import compile_pipeline

    recipe = load_recipe(family, preset, overrides or [])  # a bad preset or override fails here, not in a pod
    cron = _cron(schedule) if schedule else None
    args = pipeline_arguments(preset, overrides, store, tracking_uri, experiment, None if schedule else run_name)
    name = run_name or f"{recipe.family}-{preset}"
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(
            family,
            Path(tmp) / f"{recipe.family}.yaml",
            preset=preset,
            overrides=overrides,
            registry=registry,
            tag=tag,
            trainjobs=trainjobs,
        )
        try:
            if client is None:
                import kfp

                client = kfp.Client(host=host, namespace=namespace or "kubeflow")
            if cron is None:
                result = client.create_run_from_pipeline_package(
                    str(package), arguments=args, run_name=name, experiment_name=kfp_experiment, namespace=namespace
                )
                return Submitted("run", result.run_id, result.run_info.experiment_id, name)
            exp = client.create_experiment(kfp_experiment, namespace=namespace)
            job = client.create_recurring_run(
                exp.experiment_id,
                name,
                cron_expression=cron,
                max_concurrency=max_concurrency,
                no_catchup=True,
                params=args,
                pipeline_package_path=str(package),
                enable_caching=False,
            )
            return Submitted("recurring_run", job.recurring_run_id, exp.experiment_id, name)
        except Exception as exc:  # kfp_server_api.ApiException, urllib3 errors: the server's own message
            if isinstance(exc, LlmfabError):
                raise
            raise LlmfabError(f"KFP at {host}: {type(exc).__name__}: {str(exc).strip()[:2000]}") from exc
