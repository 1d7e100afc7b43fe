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
from llmfab.stages.base import StageConfig, get_stage

_REF = re.compile(r"^\$\{models\.([A-Za-z0-9_-]+)\}$")
STEP_ID = r"^[a-z][a-z0-9_-]*$"


class StepSpec(StrictModel):
    id: str = Field(pattern=STEP_ID)
    stage: str
    inputs: dict[str, str | list[str]] = Field(
        default_factory=dict, description="input name -> 'step.output' or URI; a list for many-model inputs"
    )
    description: str = ""


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


@dataclass
class ResolvedStep:
    id: str
    stage: str
    inputs: dict[str, str | list[str]]
    config: StageConfig


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

    def plan(self) -> dict:
        """The fully resolved recipe as plain data (what `llmfab compile --plan` prints)."""
        return {
            "family": self.family,
            "preset": self.preset,
            "models": {k: m.model_dump(mode="json") for k, m in self.models.items()},
            "steps": [
                {"id": s.id, "stage": s.stage, "inputs": s.inputs, "config": s.config.model_dump(mode="json")}
                for s in self.steps
            ],
        }


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

    resolved, outputs_by_step = [], {}
    for index, step in enumerate(recipe.steps):
        spec = get_stage(step.stage)
        where = f"{prefix}.config.{step.id}"
        data = _substitute(preset_data["config"].get(step.id, {}), model_dicts, f"{source}: {where}")
        config = spec.make_config(data, source, where)
        spec_where = f"{source}: steps[{index}] ({step.id})"
        for name, ref in ((n, r) for n, refs in step.inputs.items() for r in as_refs(refs)):
            if "://" in ref or ref.startswith(("/", "./")):
                continue
            src_step, _, output = ref.partition(".")
            if src_step not in outputs_by_step:
                raise ConfigError(f"{spec_where}: input {name}={ref!r}: no earlier step {src_step!r}")
            if output not in outputs_by_step[src_step]:
                raise ConfigError(
                    f"{spec_where}: input {name}={ref!r}: step {src_step!r} has outputs "
                    f"{', '.join(outputs_by_step[src_step])}"
                )
        try:
            spec.check_inputs(step.inputs)
        except ConfigError as exc:
            raise ConfigError(f"{spec_where}: {exc}") from None
        outputs_by_step[step.id] = spec.outputs
        resolved.append(ResolvedStep(step.id, step.stage, dict(step.inputs), config))
    return Recipe(recipe.family, preset, source, resolved, models, recipe.description)
