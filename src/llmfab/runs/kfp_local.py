"""The kfp.local executor: the family's Kubeflow pipeline under kfp.local's SubprocessRunner, every task nested in
one MLflow run.

The parent MLflow run is opened here and held open for the pipeline (FINISHED or FAILED with it); its id is the
pipeline's `parent_run_id`, so the open-run task adopts it and every step task is a nested run. Each task is a
subprocess of this Python (use_venv=False: the components' code is this checkout's llmfab), one after another.
Quiet by default: what the tasks print goes to one log file per task (`TaskLogs`); `verbose` streams it all.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from llmfab.runs.plan import RunPlan
from llmfab.runs.result import PipelineResult, StepRun
from llmfab.runs.task_logs import TaskLogs
from llmfab.tracking.mlflow_tracker import copy_child_metrics

TASK_PROGRESS_ENV = "LLMFAB_TASK_PROGRESS"  # set: a task shows its progress bars (read by the component)


@dataclass
class KfpLocal:
    pipeline_root: str | None = None  # default: the run's store folder /kfp (a local store), else ./local_outputs
    verbose: bool = False
    name = "kfp-local"

    def run(self, plan: RunPlan, on_step=None, on_task=None, on_progress=None) -> PipelineResult:
        """Run to the end; raises RuntimeError if a task fails (the parent run is then FAILED). Callbacks:
        `on_step(StepRun)` as each step run finishes, `on_task(task, status, log_path)` as each task ends,
        `on_progress(task, done, total)` while a task trains."""
        from kfp import local

        from llmfab.kubeflow.pipelines import build_pipeline

        run_store = plan.run_store_uri
        root = self.pipeline_root or (
            str(Path(run_store[len("file://") :]) / "kfp") if run_store.startswith("file://") else "local_outputs"
        )
        pipeline_root = str(Path(root).resolve())
        tracker = plan.tracking.tracker()
        start = time.time()
        with tracker.run(plan.run_name, tags={**plan.tags(), "llmfab.runner": self.name}) as parent:
            plan.log_to(parent)
            result = PipelineResult(plan.run_name, parent.run_id, run_store, self.name)
            reported: set[str] = set()

            def report_steps() -> None:  # the step runs that finished since the last task
                for run in sorted(tracker.child_runs(parent.run_id), key=lambda r: r.info.end_time or 0):
                    if run.info.status != "RUNNING" and run.info.run_name not in reported:
                        reported.add(run.info.run_name)
                        if on_step:
                            on_step(step_run(run))

            def task_done(task: str, status: str, path: Path) -> None:
                report_steps()
                if on_task:
                    on_task(task, status, path)

            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=True)
            # One run at a time: the runs of a parallel step would share this machine's cores (each sized for all).
            pipeline = build_pipeline(plan.recipe_ref, recipe=plan.recipe, overrides=list(plan.overrides),
                                      loop_parallelism=1)  # fmt: skip
            arguments = dict(
                preset=plan.preset,
                overrides=list(plan.overrides),
                store=plan.store_uri,
                tracking_uri=plan.tracking.resolved_uri,
                experiment=tracker.experiment,
                run_name=plan.run_name,
                parent_run_id=parent.run_id,
            )
            if self.verbose:
                pipeline(**arguments)
            else:
                result.log_dir = str(Path(pipeline_root) / "logs" / plan.run_name)
                logs = TaskLogs(result.log_dir, on_finished=task_done, on_progress=on_progress)
                with _quiet(logs):
                    pipeline(**arguments)
                logs.close()
            result.seconds = time.time() - start
            names = [name for s in plan.recipe.steps for name, _ in s.runs()]
            order = {name: i for i, name in enumerate(names)}  # recipe order (kfp.local runs in a topological one)
            children = copy_child_metrics(tracker, parent.run_id)
            for run in sorted(children, key=lambda r: (order.get(r.info.run_name, len(order)), r.info.start_time)):
                result.steps[run.info.run_name] = step_run(run)
        return result


@contextlib.contextmanager
def _quiet(logs: TaskLogs):
    """Everything kfp.local and its tasks print goes to `logs`; tasks show their progress bars (parsed there)."""
    before = os.environ.get(TASK_PROGRESS_ENV)
    os.environ[TASK_PROGRESS_ENV] = "1"
    try:
        with (
            contextlib.redirect_stdout(logs),
            contextlib.redirect_stderr(logs),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # kfp.local's notes on settings it cannot honour locally, per task
            yield
    finally:
        if before is None:
            os.environ.pop(TASK_PROGRESS_ENV, None)
        else:
            os.environ[TASK_PROGRESS_ENV] = before


def step_run(run) -> StepRun:
    """A step's nested MLflow run as a StepRun."""
    info, tags = run.info, run.data.tags
    outputs = {k[len("llmfab.output.") :]: v for k, v in tags.items() if k.startswith("llmfab.output.")}
    values = {k[len("llmfab.value.") :]: v for k, v in tags.items() if k.startswith("llmfab.value.")}
    seconds = ((info.end_time or info.start_time) - info.start_time) / 1000
    return StepRun(info.run_name, outputs, dict(run.data.metrics), info.run_id, seconds, values, info.status)
