"""`llmfab run`: a family pipeline under kfp.local's SubprocessRunner, every task nested in one MLflow run.

The parent MLflow run is opened here and held open for the pipeline (FINISHED or FAILED with it); its id is the
pipeline's `parent_run_id`, so the open-run task adopts it and every step task is a nested run. Each task is a
subprocess of this Python (use_venv=False: the components' code is this checkout's llmfab), one after another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from llmfab.config.recipe import load_recipe
from llmfab.recipe_runner import log_pipeline_run
from llmfab.storage import open_store
from llmfab.tracking import Tracker
from llmfab.tracking.mlflow_tracker import copy_child_metrics


@dataclass
class StepRun:
    step_id: str
    run_id: str
    seconds: float
    outputs: dict[str, str] = field(default_factory=dict)
    status: str = ""


@dataclass
class LocalPipelineResult:
    run_name: str
    run_id: str
    store_uri: str
    pipeline_root: str
    seconds: float
    steps: dict[str, StepRun] = field(default_factory=dict)


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///REL.db -> sqlite:////ABS/REL.db, so every task subprocess writes to the same database."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def run_local(
    family: str,
    preset: str = "tiny",
    *,
    overrides: list[str] | None = None,
    store_uri: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    pipeline_root: str | None = None,
) -> LocalPipelineResult:
    """Run `family`'s pipeline locally to the end; raises if a task fails (the parent run is then FAILED)."""
    from kfp import local

    from llmfab.kubeflow.pipelines import build_pipeline

    recipe = load_recipe(family, preset, overrides or [])  # fail early, with the recipe's own errors
    recipe_ref = family if "/" not in family and not family.endswith((".yaml", ".yml")) else str(Path(family).resolve())
    run_name = run_name or f"{recipe.family}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = open_store(store_uri)
    run_store = root.sub(f"runs/{run_name}")
    tracker = Tracker(tracking_uri, experiment)
    uri = absolute_tracking_uri(tracker.uri)
    if pipeline_root is None:
        pipeline_root = (
            str(Path(run_store.uri[len("file://") :]) / "kfp") if run_store.uri.startswith("file://") else None
        )
    pipeline_root = str(Path(pipeline_root or "local_outputs").resolve())
    tags = {**recipe.run_tags(run_store.uri), "llmfab.runner": "kfp-local"}
    start = time.time()
    with tracker.run(run_name, tags=tags) as parent:
        log_pipeline_run(parent, recipe, overrides)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=True)
        # One run at a time: the runs of a parallel step would share this machine's cores (each sized for all).
        pipeline = build_pipeline(recipe_ref, preset=preset, overrides=overrides, loop_parallelism=1)
        pipeline(
            preset=preset,
            overrides=list(overrides or []),
            store=root.uri,
            tracking_uri=uri,
            experiment=tracker.experiment,
            run_name=run_name,
            parent_run_id=parent.run_id,
        )
        result = LocalPipelineResult(run_name, parent.run_id, run_store.uri, pipeline_root, time.time() - start)
        names = [name for s in recipe.steps for name, _ in s.runs()]
        order = {name: i for i, name in enumerate(names)}  # recipe order (kfp.local runs in a topological one)
        children = copy_child_metrics(tracker, parent.run_id)
        for run in sorted(children, key=lambda r: (order.get(r.info.run_name, len(order)), r.info.start_time)):
            info = run.info
            outputs = {
                k[len("llmfab.output.") :]: v for k, v in run.data.tags.items() if k.startswith("llmfab.output.")
            }
            seconds = ((info.end_time or info.start_time) - info.start_time) / 1000
            result.steps[info.run_name] = StepRun(info.run_name, info.run_id, seconds, outputs, info.status)
    return result
