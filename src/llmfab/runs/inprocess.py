"""The in-process executor: the recipe's steps in order in this Python process, one parent MLflow run and a nested
run per step run. A rounds block's steps come once per round (`round1/reward`, ..., `round2/reward`), each round's
inputs naming the previous round's steps: the rounds run as a loop, in order."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from llmfab.config.recipe import Recipe, as_refs, is_uri
from llmfab.errors import ConfigError
from llmfab.runs.plan import RunPlan
from llmfab.runs.result import PipelineResult, StepRun
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store


def resolve_input(ref: str | list[str], outputs: dict[str, dict[str, str]]) -> str | list[str]:
    """'step.output' -> that output's URI; anything else is already a URI or path (lists map)."""
    if isinstance(ref, list):
        return [resolve_input(r, outputs) for r in ref]
    if is_uri(ref):
        return ref
    step, _, name = ref.partition(".")
    return outputs[step][name]


@dataclass
class InProcess:
    """`only`: just these steps (and what they need). `reuse`: steps not run, their outputs given (e.g. an earlier
    run's data, as KFP's cache would)."""

    only: list[str] | None = None
    reuse: dict[str, dict[str, str]] = field(default_factory=dict)
    show_progress: bool | None = None
    name = "inprocess"

    def run(self, plan: RunPlan, on_step=None) -> PipelineResult:
        """`on_step(StepRun)` is called as each step run finishes."""
        recipe = plan.recipe
        unknown = sorted(set(self.only or []) - {s.id for s in recipe.steps})
        if unknown:
            ids = ", ".join(s.id for s in recipe.steps)
            raise ConfigError(f"--only {', '.join(unknown)}: no such step; steps: {ids}")
        store = open_store(plan.run_store_uri)
        tracker = plan.tracking.tracker()
        start = time.time()
        with tracker.run(plan.run_name, tags={**plan.tags(), "llmfab.runner": self.name}) as parent:
            plan.log_to(parent)
            result = PipelineResult(plan.run_name, parent.run_id, store.uri, self.name)
            outputs: dict[str, dict[str, str | list[str]]] = {}
            values: dict[str, dict[str, str]] = {}
            for step in recipe.steps:
                if self.only and step.id not in self.only and not _needed_by(step.id, self.only, recipe):
                    continue
                if step.id in self.reuse:
                    outputs[step.id] = dict(self.reuse[step.id])
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
                        show_progress=self.show_progress,
                        description=step.description,
                    )
                    done = StepRun(name, res.outputs, res.metrics, res.run_id, res.seconds, res.values)
                    result.steps[name] = done
                    parent.log_metrics({f"{name}.{k}": v for k, v in res.metrics.items()})
                    if on_step:
                        on_step(done)
                if step.variants:  # a parallel step's outputs are lists, in item order (what dsl.Collected gives)
                    outputs[step.id] = {k: [result.steps[n].outputs[k] for n, _ in runs] for k in res.outputs}
                else:
                    outputs[step.id], values[step.id] = res.outputs, res.values
            result.seconds = time.time() - start
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
