"""What a component does inside its container: artifacts and parameters in, `run_stage`, URIs and metrics out.

Checkpoints and datasets never travel through KFP's artifact store: a stage writes them to the object store,
and its output artifact holds only a pointer, `metadata["store_uri"]` (also written to the artifact's file as
JSON). A downstream component reads that URI back from its input artifact's metadata.
"""

from __future__ import annotations

import gc
import json
import math
import os
from pathlib import Path
from typing import Any

from llmfab.errors import LlmfabError

STORE_URI = "store_uri"  # the artifact metadata key that holds the object-store URI
KFP_RUN_TAG = "llmfab.kfp_run_id"  # on a pipeline's parent MLflow run: the KFP run it belongs to


def artifact_uri(name: str, artifact: Any) -> str:
    """The object-store URI an llmfab component recorded on its output artifact."""
    uri = (getattr(artifact, "metadata", None) or {}).get(STORE_URI)
    if not uri:
        raise LlmfabError(
            f"input {name}: artifact {getattr(artifact, 'uri', artifact)!r} has no metadata {STORE_URI!r} "
            "(it was not written by an llmfab component)"
        )
    return str(uri)


def write_pointer(artifact: Any, uri: str, **metadata: str) -> None:
    """Record `uri` on an output artifact: in its metadata and, as JSON, in its (tiny) file."""
    artifact.metadata[STORE_URI] = uri
    artifact.metadata.update(metadata)
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({STORE_URI: uri, **metadata}), encoding="utf-8")


RUN_ID = "run_id"  # open-run's artifact: a pointer to the run's store prefix, with the parent MLflow run id


def write_run_context(artifact: Any, run_id: str, store_uri: str) -> None:
    """open-run's output artifact: the parent MLflow run and the run's store prefix, for every step task."""
    write_pointer(artifact, store_uri, **{RUN_ID: run_id})


def run_context(artifact: Any) -> tuple[str, str]:
    """(parent MLflow run id, run store URI) from open-run's artifact."""
    return str(artifact.metadata.get(RUN_ID) or ""), artifact_uri("pipeline_run", artifact)


def open_run(
    recipe: str,
    preset: str,
    overrides: list[str],
    store: str,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    parent_run_id: str,
    kfp_run_id: str = "",
    rounds: str = "",
) -> tuple[str, str]:
    """(parent MLflow run id, this run's store URI). With `parent_run_id` given (a local run, whose CLI holds the
    parent run open), only the store location is worked out; else a parent run is created and tagged. `rounds`
    (JSON {block: count}) is what the pipeline's graph was built for: a preset that asks for other counts fails."""
    from llmfab.runs.plan import plan_run, run_store_uri
    from llmfab.tracking import TrackedRun

    if parent_run_id and run_name:  # a local run: the CLI named the run and holds it open
        return parent_run_id, run_store_uri(store or None, run_name)
    plan = plan_run(recipe, preset, overrides, store_uri=store or None, tracking_uri=tracking_uri or None,
                    experiment=experiment or None, run_name=run_name or None)  # fmt: skip
    if rounds and plan.recipe.round_counts() != json.loads(rounds):
        raise LlmfabError(
            f"recipe {recipe}, preset {preset}: rounds {plan.recipe.round_counts()}, but this pipeline was built for "
            f"{json.loads(rounds)}: build it with this preset and overrides (llmfab submit does)"
        )
    if parent_run_id:
        return parent_run_id, plan.run_store_uri
    tracker = plan.tracking.tracker()
    tags = {"mlflow.runName": plan.run_name, **plan.tags(), KFP_RUN_TAG: kfp_run_id}
    # Left RUNNING: the pipeline's exit task (close_run) ends it with the pipeline's status.
    created = tracker.client.create_run(tracker.experiment_id, run_name=plan.run_name, tags=tags)
    parent = TrackedRun(tracker.client, created.info.run_id, tracker.experiment_id)
    plan.log_to(parent)
    return parent.run_id, plan.run_store_uri


def close_run(kfp_run_id: str, adopted_run_id: str, tracking_uri: str, experiment: str, state: str) -> None:
    """End the parent run that open_run opened for KFP run `kfp_run_id`: FINISHED when the pipeline SUCCEEDED,
    else FAILED, with every nested step's final metrics on it as `STEP.METRIC`. A run the caller adopted
    (`llmfab run` holds it open and ends it) is left to the caller."""
    from llmfab.tracking import Tracker
    from llmfab.tracking.mlflow_tracker import copy_child_metrics

    if adopted_run_id:
        return
    tracker = Tracker(tracking_uri or None, experiment or None)
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}'")
    if not runs:
        raise LlmfabError(f"no MLflow run tagged {KFP_RUN_TAG}={kfp_run_id} (did open-run fail?)")
    for run in runs:
        copy_child_metrics(tracker, run.info.run_id)
        tracker.client.set_terminated(run.info.run_id, status="FINISHED" if state == "SUCCEEDED" else "FAILED")


def _launch(stage, config, inputs, output: str, launch: str, tracking_uri, experiment, parent_run_id):
    """Run the stage as a TrainJob (its ranks in their own pods, rank 0 tracking under the pipeline's run)."""
    from llmfab.kube.trainjob import LaunchConfig, launch_stage
    from llmfab.stages.runner import StageResult

    cfg = LaunchConfig.model_validate_json(launch)
    cfg = cfg.model_copy(
        update={
            "tracking_uri": cfg.tracking_uri or tracking_uri or None,
            "experiment": cfg.experiment or experiment or None,
            "parent_run_id": parent_run_id or cfg.parent_run_id,
        }
    )
    result = launch_stage(stage, config, inputs, output=output, launch=cfg, on_status=lambda s: print(s, flush=True))
    return StageResult(result.outputs, result.metrics, result.run_id, result.seconds)


def run_component(
    stage: str,
    *,
    recipe: str,
    preset: str,
    overrides: list[str],
    step_id: str,
    variant: str,
    tracking_uri: str,
    experiment: str,
    pipeline_run: Any,
    inputs: dict[str, Any],
    list_inputs: dict[str, list[str]],
    outputs: dict[str, Any],
    metrics: Any,
    launch: str = "",
) -> tuple[str, ...]:
    """Run recipe step `step_id` (its config from the recipe preset; one item of it for a parallel step) as a nested
    MLflow run; fill the outputs. Returns the outputs' URIs, then the stage's values. With `launch` (a
    LaunchConfig as JSON) the stage runs as a Kubeflow TrainJob that this task submits and follows to its end."""
    from llmfab.config.recipe import load_recipe, run_name_of
    from llmfab.stages.runner import run_stage
    from llmfab.storage import open_store
    from llmfab.tracking import Tracker

    parent_run_id, store_uri = run_context(pipeline_run)
    step = load_recipe(recipe, preset, list(overrides or [])).step(step_id)
    if step.stage != stage:
        raise LlmfabError(f"step {step_id} of recipe {recipe} is stage {step.stage}, not {stage}")
    resolved: dict[str, str | list[str]] = {
        name: artifact_uri(name, art) for name, art in inputs.items() if art is not None
    }
    resolved.update({name: [str(u) for u in uris] for name, uris in list_inputs.items() if uris})
    item = json.loads(variant) if variant else None
    prefix = run_name_of(step_id, item)
    if launch:
        result = _launch(stage, step.config_for(item), resolved, open_store(store_uri).sub(prefix).uri, launch,
                         tracking_uri, experiment, parent_run_id)  # fmt: skip
    else:
        tracker = Tracker(tracking_uri or None, experiment or None)
        _freeze_heap()  # what is imported by now (torch, MLflow, the stages) lives as long as the task
        result = run_stage(
            stage,
            step.config_for(item),
            resolved,
            step_id=prefix,
            store=open_store(store_uri).sub(prefix),
            tracker=tracker,
            parent_run_id=parent_run_id or None,
            show_progress=os.environ.get("LLMFAB_TASK_PROGRESS") == "1",  # kfp.local's quiet runner shows them
            description=step.description,
        )
    for name, artifact in outputs.items():
        write_pointer(artifact, result.outputs[name], stage=stage, step=step_id, mlflow_run_id=result.run_id or "")
    for key, value in sorted(result.metrics.items()):
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics.log_metric(key, float(value))
    _freeze_heap()  # the process exits next: its final collection need not walk the heap again
    return (*(result.outputs[name] for name in outputs), *result.values.values())


def _freeze_heap() -> None:
    """In a KFP task's process (one task, ended when its function returns), move every object allocated so far out of
    the cyclic garbage collector's reach (gc.freeze). A stage task holds ~500k long-lived objects from its imports,
    which each full collection walks again: during the stage and once more at exit, where that took ~1.5 s a task.
    Frozen objects are still freed by reference counting; only cycles among them wait for the process's end.
    Elsewhere (a test, `llmfab run --runner inprocess`: a process that lives on) this does nothing."""
    if os.environ.get("_KFP_RUNTIME") == "true":  # set by the component's command, in a pod and under kfp.local
        gc.freeze()
