"""Family recipes: an ordered list of steps (stage + inputs) and presets that configure them.

A recipe file (recipes/<family>.yaml):

    family: qwen2
    steps:
      - {id: data, stage: prepare_data}
      - {id: tokenizer, stage: train_tokenizer, inputs: {corpus: data.text}}
    presets:
      tiny:
        models: {policy: {arch: qwen2, hidden_size: 128, ...}}
        config:                       # per step id
          tokenizer: {vocab_size: 2048}
          pretrain: {model: ${models.policy}}

`${models.NAME}` inside a step config is replaced by that preset model. An input is either
`STEP.OUTPUT` (an earlier step's output) or a URI. Everything is validated at load time, and an
error names the file and the field.

Two constructs become KFP control flow (and run the same way in process):

      - {id: dpo, stage: dpo, parallel: [{seed: 0}, {seed: 1}]}   # dsl.ParallelFor: one run per item, the
        ...                                                       # item's fields set on the step's config;
      - {id: average, stage: average, inputs: {models: dpo.model}}  # its outputs are lists (dsl.Collected)
      - {id: promote, stage: promote, when: register.decision == promote}   # dsl.If on a stage's value
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from llmfab.config.base import StrictModel, deep_merge, parse_override, validate
from llmfab.config.model import ModelConfig
from llmfab.errors import ConfigError
from llmfab.stages.base import LIST_INPUTS, StageConfig, get_stage

_REF = re.compile(r"^\$\{models\.([A-Za-z0-9_-]+)\}$")
STEP_ID = r"^[a-z][a-z0-9_-]*$"


class StepSpec(StrictModel):
    id: str = Field(pattern=STEP_ID)
    stage: str
    inputs: dict[str, str | list[str]] = Field(
        default_factory=dict, description="input name -> 'step.output' or URI; a list for many-model inputs"
    )
    description: str = ""
    parallel: list[dict[str, Any]] | None = Field(
        None, min_length=1, description="one run per item, each item's fields set on the step config"
    )
    when: str | None = Field(None, description="'STEP.VALUE == TEXT': run only when an earlier step's value is TEXT")


class PresetSpec(StrictModel):
    description: str = ""
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    config: dict[str, dict[str, Any]] = Field(default_factory=dict)


class RecipeFile(StrictModel):
    family: str
    description: str = ""
    paper: str = ""
    steps: list[StepSpec] = Field(min_length=1)
    presets: dict[str, PresetSpec] = Field(min_length=1)


_WHEN = re.compile(r"^\s*([a-z][a-z0-9_-]*)\.([A-Za-z_][A-Za-z0-9_]*)\s*==\s*(\S+)\s*$")


@dataclass(frozen=True)
class Condition:
    step: str
    value: str
    equals: str

    def __str__(self) -> str:
        return f"{self.step}.{self.value} == {self.equals}"


def _flat(item: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key in sorted(item):
        if isinstance(item[key], dict):
            out += _flat(item[key], f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", item[key]))
    return out


def variant_name(item: dict[str, Any]) -> str:
    """A parallel item's name, as its store prefix: {seed: 1, train: {lr: 0.1}} -> 'seed-1_train.lr-0.1'."""
    return "_".join(f"{k}-{v}" for k, v in _flat(item)) or "default"


def run_name_of(step_id: str, item: dict[str, Any] | None) -> str:
    """A step run's name, its MLflow run name and store prefix: `dpo`, or `dpo/seed-1` for a parallel item (what
    MLflow allows in the metric names `RUN.METRIC` the pipeline's run gets)."""
    return f"{step_id}/{variant_name(item)}" if item else step_id


@dataclass
class ResolvedStep:
    id: str
    stage: str
    inputs: dict[str, str | list[str]]
    config: StageConfig
    variants: list[dict[str, Any]] = field(default_factory=list)  # `parallel` items; empty: one plain run
    variant_configs: list[StageConfig] = field(default_factory=list)
    when: Condition | None = None

    def config_for(self, item: dict[str, Any] | None) -> StageConfig:
        """The config of one parallel run (the step's own config for a plain step)."""
        if not item:
            return self.config
        for known, config in zip(self.variants, self.variant_configs, strict=True):
            if known == item:
                return config
        raise ConfigError(f"step {self.id}: no parallel item {item!r}; items: {self.variants}")

    def runs(self) -> list[tuple[str, StageConfig]]:
        """(run name, config) of each run of the step: one, or one per parallel item in item order."""
        if not self.variants:
            return [(self.id, self.config)]
        return [(run_name_of(self.id, i), c) for i, c in zip(self.variants, self.variant_configs, strict=True)]


@dataclass
class Recipe:
    family: str
    preset: str
    source: str
    steps: list[ResolvedStep]
    models: dict[str, ModelConfig] = field(default_factory=dict)
    description: str = ""

    def step(self, step_id: str) -> ResolvedStep:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def run_tags(self, store_uri: str) -> dict[str, str]:
        """The tags of a pipeline run of this recipe (what the registry's lineage and `llmfab retrain` read)."""
        from llmfab.data.version import DATA_FINGERPRINT_TAG, data_fingerprint

        return {
            "llmfab.kind": "pipeline",
            "llmfab.family": self.family,
            "llmfab.preset": self.preset,
            "llmfab.store": store_uri,
            DATA_FINGERPRINT_TAG: data_fingerprint(self),
        }

    def plan(self) -> dict:
        """The fully resolved recipe as plain data (what `llmfab compile --plan` prints)."""
        return {
            "family": self.family,
            "preset": self.preset,
            "models": {k: m.model_dump(mode="json") for k, m in self.models.items()},
            "steps": [
                {
                    "id": s.id,
                    "stage": s.stage,
                    "inputs": s.inputs,
                    "config": s.config.model_dump(mode="json"),
                    **({"parallel": s.variants} if s.variants else {}),
                    **({"when": str(s.when)} if s.when else {}),
                }
                for s in self.steps
            ],
        }


def is_uri(ref: str) -> bool:
    """An input written as a URI or path (data from outside the recipe), not a `STEP.OUTPUT` reference."""
    return "://" in ref or ref.startswith(("/", "./"))


def as_refs(value: str | list[str]) -> list[str]:
    """An input's references as a list (most inputs are one reference)."""
    return [value] if isinstance(value, str) else list(value)


def recipe_path(family_or_path: str | Path) -> Path:
    path = Path(family_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{path}: no such recipe file")
        return path
    packaged = resources.files("llmfab") / "recipes" / f"{family_or_path}.yaml"
    if not packaged.is_file():
        raise ConfigError(f"unknown family {family_or_path!r}; known: {', '.join(list_families())}")
    return Path(str(packaged))


def list_families() -> list[str]:
    folder = resources.files("llmfab") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _substitute(value: Any, models: dict[str, dict], where: str) -> Any:
    if isinstance(value, str) and (m := _REF.match(value)):
        if m.group(1) not in models:
            raise ConfigError(f"{where}: unknown model {m.group(1)!r}; preset defines {', '.join(models) or 'none'}")
        return models[m.group(1)]
    if isinstance(value, dict):
        return {k: _substitute(v, models, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, models, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _apply_overrides(preset: dict, overrides: list[str], step_ids: set[str], source: str) -> dict:
    """`models.NAME.FIELD=V` edits a preset model; `STEP.FIELD=V` edits a step's config."""
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "models":
            target = ["models", *path[1:]]
        elif path[0] in step_ids:
            target = ["config", *path]
        else:
            raise ConfigError(
                f"{source}: override {text!r}: {path[0]!r} is neither 'models' nor a step id "
                f"({', '.join(sorted(step_ids))})"
            )
        nested: Any = value
        for part in reversed(target):
            nested = {part: nested}
        preset = deep_merge(preset, nested)
    return preset


def load_recipe(family_or_path: str | Path, preset: str = "tiny", overrides: list[str] | None = None) -> Recipe:
    path = recipe_path(family_or_path)
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    recipe = validate(RecipeFile, raw, source)
    if preset not in recipe.presets:
        raise ConfigError(f"{source}: no preset {preset!r}; available: {', '.join(recipe.presets)}")

    step_ids = [s.id for s in recipe.steps]
    if len(set(step_ids)) != len(step_ids):
        raise ConfigError(f"{source}: steps: duplicate step ids")
    preset_data = _apply_overrides(recipe.presets[preset].model_dump(), overrides or [], set(step_ids), source)
    for section in ("models", "config"):
        for name, value in preset_data[section].items():
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: presets.{preset}.{section}.{name}: expected a mapping, got {value!r}")
    for section in ("models", "config"):
        if not isinstance(preset_data[section], dict):
            raise ConfigError(f"{source}: presets.{preset}.{section}: expected a mapping")
    prefix = f"presets.{preset}"
    for unknown in sorted(set(preset_data["config"]) - set(step_ids)):
        raise ConfigError(f"{source}: {prefix}.config.{unknown}: no step with that id")
    models = {
        name: validate(ModelConfig, data, source, f"{prefix}.models.{name}")
        for name, data in preset_data["models"].items()
    }
    model_dicts = {name: m.model_dump() for name, m in models.items()}

    by_id: dict[str, ResolvedStep] = {}  # in step order
    for index, step in enumerate(recipe.steps):
        spec = get_stage(step.stage)
        where = f"{prefix}.config.{step.id}"
        data = _substitute(preset_data["config"].get(step.id, {}), model_dicts, f"{source}: {where}")
        config = spec.make_config(data, source, where)
        spec_where = f"{source}: steps[{index}] ({step.id})"
        variants = [dict(item) for item in step.parallel or []]
        variant_configs = [
            spec.make_config(deep_merge(data, item), source, f"steps[{index}].parallel[{i}]")
            for i, item in enumerate(variants)
        ]
        if len({variant_name(v) for v in variants}) != len(variants):
            raise ConfigError(f"{spec_where}: parallel: items must differ")
        when = _condition(step.when, by_id, spec_where) if step.when else None
        for name, ref in ((n, r) for n, refs in step.inputs.items() for r in as_refs(refs)):
            if is_uri(ref):
                continue
            src_step, _, output = ref.partition(".")
            if src_step not in by_id:
                raise ConfigError(f"{spec_where}: input {name}={ref!r}: no earlier step {src_step!r}")
            src = by_id[src_step]
            src_outputs = get_stage(src.stage).outputs
            if output not in src_outputs:
                raise ConfigError(
                    f"{spec_where}: input {name}={ref!r}: step {src_step!r} has outputs {', '.join(src_outputs)}"
                )
            if src.variants and not isinstance(step.inputs[name], str):
                raise ConfigError(
                    f"{spec_where}: input {name}: {ref!r} is a parallel step's list of outputs; give it alone"
                )
            if src.variants and (spec.name, name) not in LIST_INPUTS:
                raise ConfigError(
                    f"{spec_where}: input {name}={ref!r}: step {src_step!r} runs in parallel (its outputs are "
                    f"lists), and {step.stage}'s input {name} takes one checkpoint"
                )
            if src.when and src.when != when:
                raise ConfigError(
                    f"{spec_where}: input {name}={ref!r}: step {src_step!r} runs only when {src.when}; so must this one"
                )
        try:
            spec.check_inputs(step.inputs)
        except ConfigError as exc:
            raise ConfigError(f"{spec_where}: {exc}") from None
        by_id[step.id] = ResolvedStep(step.id, step.stage, dict(step.inputs), config, variants, variant_configs, when)
    return Recipe(recipe.family, preset, source, list(by_id.values()), models, recipe.description)


def _condition(text: str, earlier: dict[str, ResolvedStep], where: str) -> Condition:
    match = _WHEN.match(text)
    if not match:
        raise ConfigError(f"{where}: when: {text!r}: expected 'STEP.VALUE == TEXT'")
    cond = Condition(*match.groups())
    if cond.step not in earlier:
        raise ConfigError(f"{where}: when: {text!r}: no earlier step {cond.step!r}")
    src = earlier[cond.step]
    values = get_stage(src.stage).values
    if cond.value not in values:
        raise ConfigError(
            f"{where}: when: {text!r}: stage {src.stage} has values {', '.join(values) or 'none'}, not {cond.value!r}"
        )
    if src.variants or src.when:
        raise ConfigError(f"{where}: when: {text!r}: step {cond.step!r} is itself parallel or conditional")
    return cond
