"""One value for one pipeline run, built once before it starts: the recipe (loaded once), the run's name, where
its checkpoints go, where it is tracked, and the tags its MLflow run carries (the data fingerprint among them).
Every executor (in process, kfp.local, a KFP server) takes this value; `llmfab retrain` decides on it.

Containers never receive it: a pipeline's tasks get (recipe, preset, overrides) and load the recipe themselves.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmfab.config.recipe import Recipe, list_families, load_recipe, recipe_path
from llmfab.data.version import DATA_FINGERPRINT_TAG, data_fingerprint
from llmfab.storage import open_store
from llmfab.tracking import Tracker, tracking_uri


def default_run_name(family: str, preset: str) -> str:
    """FAMILY-PRESET-YYYYmmdd-HHMMSS: the name of a pipeline run nobody named (its MLflow run and store prefix)."""
    return f"{family}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_store_uri(store_uri: str | None, run_name: str) -> str:
    """STORE/runs/RUN_NAME: where a pipeline run's steps write."""
    return open_store(store_uri).sub(f"runs/{run_name}").uri


def pipeline_tags(recipe: Recipe, run_store: str, fingerprint: str) -> dict[str, str]:
    """The tags of a pipeline's MLflow run: what the registry's lineage and `llmfab retrain` read."""
    return {
        "llmfab.kind": "pipeline",
        "llmfab.family": recipe.family,
        "llmfab.preset": recipe.preset,
        "llmfab.store": run_store,
        DATA_FINGERPRINT_TAG: fingerprint,
    }


@dataclass(frozen=True)
class TrackingSettings:
    """Where the MLflow records go, as given: None leaves it to the environment (MLFLOW_TRACKING_URI,
    MLFLOW_EXPERIMENT_NAME) or MLflow's default, resolved where the run is tracked (this machine, or a pod)."""

    uri: str | None = None
    experiment: str | None = None

    @property
    def resolved_uri(self) -> str:
        """The URI this machine tracks to; a relative sqlite file made absolute, so subprocesses share it."""
        uri, prefix = tracking_uri(self.uri), "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
            return prefix + str(Path(uri[len(prefix) :]).resolve())
        return uri

    def tracker(self) -> Tracker:
        return Tracker(self.resolved_uri, self.experiment)


@dataclass(frozen=True)
class RunPlan:
    recipe: Recipe
    recipe_ref: str  # what the tasks load: a packaged family's name, or a recipe file's absolute path
    overrides: tuple[str, ...]
    run_name: str
    named: bool  # the user chose run_name (a recurring run names each of its runs itself otherwise)
    store: str | None = None  # the object store's root as given (None: LLMFAB_STORE, else ./llmfab-store)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

    @property
    def family(self) -> str:
        return self.recipe.family

    @property
    def preset(self) -> str:
        return self.recipe.preset

    @property
    def store_uri(self) -> str:
        """The store's root on this machine."""
        return open_store(self.store).uri

    @property
    def run_store_uri(self) -> str:
        return run_store_uri(self.store, self.run_name)

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """Computed once, when first asked (it hashes every dataset URI the recipe reads)."""
        return data_fingerprint(self.recipe)

    def tags(self) -> dict[str, str]:
        return pipeline_tags(self.recipe, self.run_store_uri, self.data_fingerprint)

    def log_to(self, run) -> None:
        """What a pipeline's MLflow run records, however it runs: the recipe, its plan and this machine."""
        params = {"family": self.family, "preset": self.preset, "steps": [s.id for s in self.recipe.steps]}
        run.log_params({**params, **({"overrides": list(self.overrides)} if self.overrides else {})})
        run.log_dict(self.recipe.plan(), "recipe_plan.json")
        if self.recipe.description:
            run.set_tags({"mlflow.note.content": self.recipe.description})
        run.log_system_info()


def recipe_ref(recipe: Recipe) -> str:
    """What a task loads: a packaged family by its name, a recipe file by its absolute path (tasks run elsewhere)."""
    source = Path(recipe.source).resolve()
    packaged = recipe.family in list_families() and source == recipe_path(recipe.family).resolve()
    return recipe.family if packaged else str(source)


def plan_recipe(
    recipe: Recipe,
    overrides: list[str] | tuple[str, ...] | None = None,
    *,
    store_uri: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
) -> RunPlan:
    """The run of a loaded recipe (`overrides`: those it was loaded with, which the tasks apply again)."""
    return RunPlan(
        recipe=recipe,
        recipe_ref=recipe_ref(recipe),
        overrides=tuple(overrides or ()),
        run_name=run_name or default_run_name(recipe.family, recipe.preset),
        named=bool(run_name),
        store=store_uri,
        tracking=TrackingSettings(tracking_uri, experiment),
    )


def plan_run(
    family: str,
    preset: str = "tiny",
    overrides: list[str] | tuple[str, ...] | None = None,
    **settings: str | None,
) -> RunPlan:
    """The run of `family` (a packaged family or a recipe file) at `preset`: a bad preset or override fails here,
    before anything runs. `settings`: store_uri, tracking_uri, experiment, run_name (None: the defaults)."""
    return plan_recipe(load_recipe(family, preset, list(overrides or ())), overrides, **settings)
