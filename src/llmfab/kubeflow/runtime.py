"""What a component does inside its container: artifacts and parameters in, `run_stage`, URIs and metrics out.

Checkpoints and datasets never travel through KFP's artifact store: a stage writes them to the object store,
and its output artifact holds only a pointer, `metadata["store_uri"]` (also written to the artifact's file as
JSON). A downstream component reads that URI back from its input artifact's metadata.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from llmfab.errors import LlmfabError

STORE_URI = "store_uri"  # the artifact metadata key that holds the object-store URI


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


def open_run(
    family: str,
    preset: str,
    store: str,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    parent_run_id: str,
) -> tuple[str, str]:
    """(parent MLflow run id, this run's store URI). With `parent_run_id` given (a local run, whose CLI holds the
    parent run open), only the store location is worked out; else a parent run is created and tagged."""
    from llmfab.storage import open_store
    from llmfab.tracking import Tracker

    run_name = run_name or f"{family}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_store = open_store(store or None).sub(f"runs/{run_name}")
    if parent_run_id:
        return parent_run_id, run_store.uri
    tracker = Tracker(tracking_uri or None, experiment or None)
    tags = {"llmfab.kind": "pipeline", "llmfab.family": family, "llmfab.preset": preset, "llmfab.store": run_store.uri}
    with tracker.run(run_name, tags=tags) as parent:
        parent.log_params({"family": family, "preset": preset})
        parent.log_system_info()
    return parent.run_id, run_store.uri


def run_component(
    stage: str,
    *,
    recipe: str,
    preset: str,
    overrides: list[str],
    step_id: str,
    store_uri: str,
    tracking_uri: str,
    experiment: str,
    parent_run_id: str,
    inputs: dict[str, Any],
    list_inputs: dict[str, list[str]],
    outputs: dict[str, Any],
    metrics: Any,
) -> tuple[str, ...]:
    """Run recipe step `step_id` (its config from the recipe preset) as a nested MLflow run; fill the outputs."""
    from llmfab.config.recipe import load_recipe
    from llmfab.stages.runner import run_stage
    from llmfab.storage import open_store
    from llmfab.tracking import Tracker

    step = load_recipe(recipe, preset, list(overrides or [])).step(step_id)
    if step.stage != stage:
        raise LlmfabError(f"step {step_id} of recipe {recipe} is stage {step.stage}, not {stage}")
    resolved: dict[str, str | list[str]] = {
        name: artifact_uri(name, art) for name, art in inputs.items() if art is not None
    }
    resolved.update({name: [str(u) for u in uris] for name, uris in list_inputs.items() if uris})
    tracker = Tracker(tracking_uri or None, experiment or None)
    result = run_stage(
        stage,
        step.config,
        resolved,
        step_id=step_id,
        store=open_store(store_uri).sub(step_id),
        tracker=tracker,
        parent_run_id=parent_run_id or None,
        show_progress=False,
    )
    for name, artifact in outputs.items():
        write_pointer(artifact, result.outputs[name], stage=stage, step=step_id, mlflow_run_id=result.run_id or "")
    for key, value in sorted(result.metrics.items()):
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics.log_metric(key, float(value))
    return tuple(result.outputs[name] for name in outputs)
