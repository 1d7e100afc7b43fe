"""What a stage is: a typed config, declared inputs/outputs, and a plain function.

    @stage("train_tokenizer", TokenizerConfig, inputs={"corpus": "text dataset"},
           outputs={"tokenizer": "tokenizer checkpoint"})
    def run(config, inputs, ctx) -> dict[str, str]: ...

`inputs` and the returned outputs map names to URIs (object-store locations). `ctx` gives the
stage its output location, metric logging and progress bars; tracking, validation and error
handling live in `run_stage`, so a stage holds only its own logic.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.errors import ConfigError
from llmfab.storage import ObjectStore


class StageConfig(StrictModel):
    """Fields every stage config has."""

    seed: int = Field(0, description="seed for every random choice the stage makes")


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type[StageConfig]
    fn: Callable
    inputs: dict[str, str]
    outputs: dict[str, str]
    optional_inputs: dict[str, str] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)  # short string results (e.g. a gate's decision)

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""

    def make_config(self, data: dict | StageConfig | None, source: str = "config", prefix: str = "") -> StageConfig:
        if isinstance(data, self.config_cls):
            return data
        from llmfab.config.base import validate

        return validate(self.config_cls, data or {}, source, prefix)

    def check_inputs(self, inputs: dict[str, str]) -> None:
        missing = sorted(set(self.inputs) - set(inputs))
        unknown = sorted(set(inputs) - set(self.inputs) - set(self.optional_inputs))
        if missing:
            raise ConfigError(f"stage {self.name}: missing input(s) {', '.join(missing)}")
        if unknown:
            known = sorted({*self.inputs, *self.optional_inputs})
            raise ConfigError(
                f"stage {self.name}: unknown input(s) {', '.join(unknown)}; known: {', '.join(known) or 'none'}"
            )


STAGES: dict[str, StageSpec] = {}
# (stage, input) pairs that take a list of checkpoints (the outputs of a parallel step, or of several steps).
LIST_INPUTS = frozenset(
    {("average", "models"), ("merge", "models"), ("rejection_sampling", "committee"), ("collect_preferences", "models")}
)


def stage(
    name: str,
    config: type[StageConfig],
    *,
    inputs: dict[str, str] | None = None,
    outputs: dict[str, str] | None = None,
    optional_inputs: dict[str, str] | None = None,
    values: dict[str, str] | None = None,
):
    """Register a stage function under `name`. It returns its outputs (name -> URI) and, in the same dict, its
    `values`: short strings a pipeline can branch on (KFP output parameters, `when:` in a recipe)."""

    def register(fn):
        if name in STAGES and STAGES[name].fn is not fn:
            raise RuntimeError(f"stage {name!r} registered twice")
        STAGES[name] = StageSpec(
            name, config, fn, dict(inputs or {}), dict(outputs or {}), dict(optional_inputs or {}), dict(values or {})
        )
        fn.spec = STAGES[name]
        return fn

    return register


def _load_all() -> None:
    import llmfab.stages as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base", "context", "runner"):
            importlib.import_module(f"llmfab.stages.{info.name}")


def get_stage(name: str) -> StageSpec:
    _load_all()
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    return STAGES[name]


def all_stages() -> dict[str, StageSpec]:
    _load_all()
    return dict(sorted(STAGES.items()))


def shipped_stages() -> dict[str, StageSpec]:
    """The stages llmfab itself defines (each has an image and a component); a caller (e.g. a test) may
    register more, which ship in neither."""
    return {name: spec for name, spec in all_stages().items() if spec.fn.__module__.startswith("llmfab.stages.")}


@dataclass
class StageContext:
    """What a running stage gets besides its config and inputs."""

    step_id: str
    store: ObjectStore  # this step's own output location
    run: object | None = None  # TrackedRun, or None when tracking is off
    metrics: dict[str, float] = field(default_factory=dict)
    show_progress: bool = True
    prefix: str = ""  # prepended to metric names (a phase of a multi-phase stage)
    parent_run_id: str | None = None  # the pipeline's MLflow run, when the stage runs inside one

    def output(self, name: str) -> ObjectStore:
        """Where output `name` is written: a prefix below this step's location."""
        return self.store.sub(name)

    def child(self, name: str) -> StageContext:
        """A phase of this stage: its own store prefix (checkpoints), metrics named `name.*`."""
        return StageContext(
            self.step_id,
            self.store.sub(name),
            self.run,
            self.metrics,
            self.show_progress,
            f"{self.prefix}{name}.",
            self.parent_run_id,
        )

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        metrics = {f"{self.prefix}{k}": v for k, v in metrics.items() if v is not None}
        self.metrics.update({k: float(v) for k, v in metrics.items()})
        if self.run is not None:
            self.run.log_metrics(metrics, step)

    def log_params(self, params: dict) -> None:
        if self.run is not None:
            self.run.log_params(params)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self.run is not None:
            self.run.log_dict(data, artifact_file)

    def _artifact_path(self, artifact_file: str) -> str:
        return f"{self.prefix.rstrip('.')}/{artifact_file}" if self.prefix else artifact_file

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        if self.run is not None:
            self.run.log_table(data, self._artifact_path(artifact_file))

    def log_figure(self, figure, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact (e.g. `report.png`)."""
        if self.run is not None:
            self.run.log_figure(figure, self._artifact_path(artifact_file))

    def progress(self, iterable: Iterable | None = None, **kwargs):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=kwargs.pop("desc", self.step_id), disable=not self.show_progress, **kwargs)
