"""Run one stage: validate, track in MLflow (nested under the pipeline's run), call, record outputs."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmfab.errors import LlmfabError
from llmfab.hub import is_hub_uri, repo_type_of, snapshot
from llmfab.stages.base import StageConfig, StageContext, get_stage
from llmfab.storage import ObjectStore, open_store
from llmfab.storage.content import DATA, content_hash
from llmfab.tracking import Tracker, timing
from llmfab.tracking.mlflow_tracker import PARENT_RUN_ENV

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    outputs: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0
    values: dict[str, str] = field(default_factory=dict)


def default_output_store(step_id: str, root: ObjectStore | None = None) -> ObjectStore:
    """STORE/stages/STEP-TIME: where a stage run outside a pipeline writes."""
    return (root or open_store()).sub(f"stages/{step_id}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_stage(
    stage: str,
    config: dict | StageConfig | None = None,
    inputs: dict[str, str] | None = None,
    *,
    step_id: str | None = None,
    store: ObjectStore | None = None,
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
    track: bool = True,
    show_progress: bool | None = None,
    description: str = "",
) -> StageResult:
    """Run stage `stage` with `config` on `inputs` (name -> URI), writing below `store`. `description` (the
    recipe's words for the step) becomes the MLflow run's description."""
    spec = get_stage(stage)
    cfg = spec.make_config(config, source=f"stage {stage}")
    inputs = dict(inputs or {})
    spec.check_inputs(inputs)
    step_id = step_id or stage
    store = store or default_output_store(step_id)
    parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    if show_progress is None:
        show_progress = os.environ.get("LLMFAB_PROGRESS", "1") != "0"
    start, spent_before = time.time(), timing.totals()

    def call(run) -> StageResult:
        ctx = StageContext(
            step_id=step_id, store=store, run=run, show_progress=show_progress, parent_run_id=parent_run_id
        )
        if run is not None:
            run.log_params(cfg.model_dump(mode="json"))
            run.set_tags(
                {
                    "llmfab.stage": stage,
                    "llmfab.step": step_id,
                    "llmfab.store": store.uri,
                    **{f"llmfab.input.{k}": v for k, v in inputs.items()},
                    **({"mlflow.note.content": description} if description else {}),
                }
            )
            run.log_system_info()
            log_datasets(run, stage, inputs)
        returned = spec.fn(cfg, inputs, ctx) or {}
        missing = sorted((set(spec.outputs) | set(spec.values)) - set(returned))
        if missing:
            raise LlmfabError(f"stage {stage} did not produce output(s) {', '.join(missing)}")
        outputs = {k: v for k, v in returned.items() if k not in spec.values}
        values = {k: str(returned[k]) for k in spec.values}
        seconds = time.time() - start
        spent = {f"time_{k}_s": v - spent_before[k] for k, v in timing.totals().items()}
        ctx.log_metrics({"stage_seconds": seconds, **spent})  # where the time went: the overhead benchmark
        if run is not None:
            for name, uri in outputs.items():
                run.link_artifact(name, uri)
            if values:
                run.set_tags({f"llmfab.value.{k}": v for k, v in values.items()})
        return StageResult(dict(outputs), dict(ctx.metrics), run.run_id if run else None, seconds, values)

    log.info("stage %s (%s) -> %s", step_id, stage, store.uri)
    if not track:
        return call(None)
    tracker = tracker or Tracker()
    training = "train" in type(cfg).model_fields
    with (
        tracker.run(step_id, parent_run_id=parent_run_id, tags={"llmfab.kind": "stage"}) as run,
        system_metrics(run, tracker.uri, enabled=training),
    ):
        return call(run)


TEST_INPUTS = ("eval_prompts",)  # inputs read for measuring, not training; evaluate reads everything for that
NOT_DATASETS = ("report", "registration")  # records the stage reads, not data it learns from or measures on


def log_datasets(run, stage: str, inputs: dict[str, str | list[str]]) -> None:
    """Every dataset among the inputs as an MLflow run input: its store URI and its content's sha256 (a hub dataset:
    its hf:// URI and the commit it resolved to), train or test."""
    for name, refs in inputs.items():
        context = "test" if stage == "evaluate" or name in TEST_INPUTS else "train"
        for uri in [refs] if isinstance(refs, str) else refs:
            if is_hub_uri(uri):
                if repo_type_of(uri, name) == "dataset":
                    # The stage reads this snapshot next: resolving it here costs nothing more.
                    run.log_dataset(name, uri, Path(snapshot(uri, "dataset")).name, context, source_type="hf")
                continue
            kind, digest = content_hash(uri) if name not in NOT_DATASETS else (None, None)
            if kind == DATA and digest:
                run.log_dataset(name, uri, digest, context)


@contextlib.contextmanager
def system_metrics(run, uri: str, enabled: bool):
    """MLflow's system metrics (CPU, memory, disk, network, GPU) every few seconds while a training stage runs;
    LLMFAB_SYSTEM_METRICS=0 turns them off."""
    if not enabled or os.environ.get("LLMFAB_SYSTEM_METRICS", "1") == "0":
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        published = 0

        def publish_metrics(self, metrics):
            super().publish_metrics(metrics)
            self.published += 1

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    # MLflow's own setting, when given (a short stage needs a short interval to be sampled at all); else 5 s.
    interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 5))
    monitor = Monitor(run.run_id, sampling_interval=interval, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # A stage shorter than one interval ends before MLflow's loop publishes: log the sample it took at start.
        if not monitor.published and (sampled := monitor.aggregate_metrics()):
            monitor.publish_metrics(sampled)
            monitor.mlflow_logger.flush()
