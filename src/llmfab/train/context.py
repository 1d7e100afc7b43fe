"""What training code uses of the context a stage runs in, as protocols: train/ stays below the stage layer, and
stages.base.StageContext satisfies both as it is."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from llmfab.storage import ObjectStore


@runtime_checkable
class TrainingContext(Protocol):
    """What the Trainer uses. It must be a dataclass with these fields: ranks other than 0 log through a copy
    (dataclasses.replace) that has no tracking run and shows no progress bar."""

    step_id: str  # names the progress bar
    store: ObjectStore  # resumable checkpoints go below it
    run: object | None
    show_progress: bool

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def progress(self, iterable: Iterable | None = None, **kwargs): ...


@runtime_checkable
class RunContext(TrainingContext, Protocol):
    """What a whole training run (train.causal_lm, train.sft) also uses: parameters and tables to log, the metrics
    logged so far (saved with the model) and where its outputs go."""

    metrics: dict[str, float]

    def log_params(self, params: dict) -> None: ...

    def log_table(self, data: dict[str, list], artifact_file: str) -> None: ...

    def output(self, name: str) -> ObjectStore: ...
