"""Run a family recipe step by step in this process: one parent MLflow run, a nested run per step.

(Issue #6 runs the same stages as a Kubeflow pipeline, locally through kfp.local or on a cluster.)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from llmfab.config.recipe import Recipe, as_refs, is_uri
from llmfab.errors import ConfigError
from llmfab.stages.runner import StageResult, run_stage
from llmfab.storage import open_store
from llmfab.tracking import Tracker


@dataclass
class PipelineResult:
    run_name: str
    run_id: str
    store_uri: str
    steps: dict[str, StageResult] = field(default_factory=dict)


def resolve_input(ref: str | list[str], outputs: dict[str, dict[str, str]]) -> str | list[str]:
    """'step.output' -> that output's URI; anything else is already a URI or path (lists map)."""
    if isinstance(ref, list):
        return [resolve_input(r, outputs) for r in ref]
    if is_uri(ref):
        return ref
    step, _, name = ref.partition(".")
    return outputs[step][name]


def log_pipeline_run(parent, recipe: Recipe, overrides: list[str] | None = None) -> None:
    """What a pipeline's parent MLflow run records, however the pipeline runs: the recipe and this machine."""
    params = {"family": recipe.family, "preset": recipe.preset, "steps": [s.id for s in recipe.steps]}
    parent.log_params({**params, **({"overrides": list(overrides)} if overrides else {})})
    parent.log_dict(recipe.plan(), "recipe_plan.json")
    parent.log_system_info()


def run_recipe(
    recipe: Recipe,
    *,
    store_uri: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    show_progress: bool | None = None,
    only: list[str] | None = None,
    reuse: dict[str, dict[str, str]] | None = None,
) -> PipelineResult:
    """Run the recipe's steps in order (or just `only`, with earlier outputs recomputed as needed). Steps
    named in `reuse` are not run: their outputs are taken from it (e.g. an earlier run's data, as KFP's cache
    would). A rounds block's steps come once per round (`round1/reward`, ..., `round2/reward`, ...), each
    round's inputs naming the previous round's steps: the rounds run as a loop, in order."""
    unknown = sorted(set(only or []) - {s.id for s in recipe.steps})
    if unknown:
        raise ConfigError(f"--only {', '.join(unknown)}: no such step; steps: {', '.join(s.id for s in recipe.steps)}")
    run_name = run_name or f"{recipe.family}-{recipe.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    store = open_store(store_uri).sub(f"runs/{run_name}")
    tracker = Tracker(tracking_uri, experiment)
    tags = recipe.run_tags(store.uri)
    with tracker.run(run_name, tags=tags) as parent:
        log_pipeline_run(parent, recipe)
        result = PipelineResult(run_name, parent.run_id, store.uri)
        outputs: dict[str, dict[str, str | list[str]]] = {}
        values: dict[str, dict[str, str]] = {}
        for step in recipe.steps:
            if only and step.id not in only and not _needed_by(step.id, only, recipe):
                continue
            if reuse and step.id in reuse:
                outputs[step.id] = dict(reuse[step.id])
                parent.set_tags({f"llmfab.reused.{step.id}": json.dumps(outputs[step.id])})
                continue
            if step.when and values.get(step.when.step, {}).get(step.when.value) != step.when.equals:
                parent.set_tags({f"llmfab.skipped.{step.id}": f"{step.when} is false"})
                continue
            inputs = {name: resolve_input(ref, outputs) for name, ref in step.inputs.items()}
            runs = step.runs()  # (run name = store prefix, config)
            for name, config in runs:
                res = run_stage(
                    step.stage,
                    config,
                    inputs,
                    step_id=name,
                    store=store.sub(name),
                    tracker=tracker,
                    parent_run_id=parent.run_id,
                    show_progress=show_progress,
                )
                result.steps[name] = res
                parent.log_metrics({f"{name}.{k}": v for k, v in res.metrics.items()})
            if step.variants:  # a parallel step's outputs are lists, in item order (what dsl.Collected gives)
                outputs[step.id] = {k: [result.steps[n].outputs[k] for n, _ in runs] for k in res.outputs}
            else:
                outputs[step.id], values[step.id] = res.outputs, res.values
        return result


def _needed_by(step_id: str, targets: list[str], recipe: Recipe) -> bool:
    """Whether any target step depends (transitively) on `step_id`."""
    deps = {
        s.id: {ref.partition(".")[0] for refs in s.inputs.values() for ref in as_refs(refs) if not is_uri(ref)}
        for s in recipe.steps
    }
    frontier, seen = list(targets), set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        frontier.extend(deps.get(current, ()))
    return step_id in seen
