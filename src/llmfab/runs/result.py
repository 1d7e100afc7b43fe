"""What a pipeline run gives back, whichever executor ran it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepRun:
    """One step run (a parallel step's item, a round's step): its nested MLflow run and what it wrote."""

    name: str
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0
    values: dict[str, str] = field(default_factory=dict)  # its parameter outputs (register's `decision`)
    status: str = "FINISHED"


@dataclass
class PipelineResult:
    run_name: str
    run_id: str | None  # the pipeline's MLflow run (None: a KFP run not waited for)
    store_uri: str  # the run's store prefix
    runner: str  # inprocess | kfp-local | kfp
    seconds: float = 0.0
    steps: dict[str, StepRun] = field(default_factory=dict)
    kfp_run_id: str | None = None
    kfp_experiment_id: str | None = None
    state: str = "SUCCEEDED"  # a KFP run's final state; RUNNING when not waited for
    log_dir: str | None = None  # kfp.local: one log file per task
