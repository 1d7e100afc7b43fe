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
`STEP.OUTPUT` (an earlier step's output) or a URI: `hf://ORG/NAME[@REV]` (a hub model),
`hf://datasets/ORG/NAME[@REV]`, `s3://...`, `file://...` or an absolute path. Everything is validated at
load time, and an error names the file and the field.

A preset that starts from released checkpoints and hub datasets gives recipe outputs from outside
(`--set inputs.STEP.OUTPUT=URI` does the same for one run):

      qwen2-0.5b:
        inputs:                                  # every reference to long_context.model reads the hub model
          long_context.model: hf://Qwen/Qwen2-0.5B
          data.sft: hf://datasets/HuggingFaceH4/ultrachat_200k

and the steps that nothing reads any more (the pretraining that made them) are left out of its plan: the steps
kept are those the recipe's last steps (the ones no step reads) still need. A left-out step's config is unused.

Two constructs become KFP control flow (and run the same way in process):

      - {id: dpo, stage: dpo, parallel: [{seed: 0}, {seed: 1}]}   # dsl.ParallelFor: one run per item, the
        ...                                                       # item's fields set on the step's config;
      - {id: average, stage: average, inputs: {models: dpo.model}}  # its outputs are lists (dsl.Collected)
      - {id: promote, stage: promote, when: register.decision == promote}   # dsl.If on a stage's value

A `rounds` block repeats its steps, each round reading the previous round's outputs (Llama 3.1's post-training
rounds; a KFP sub-pipeline called once per round, a loop in process):

      - rounds:
          id: round
          steps:
            - {id: rm, stage: reward_model, inputs: {init: anneal.model, data: data.preferences}}
            - {id: dpo, stage: dpo, inputs: {model: prev.dpo.model | sft.model, ...}}   # round 1: sft.model
      - {id: evaluate, stage: evaluate, inputs: {model: round.dpo.model, ...}}         # the last round's

A round's step reads earlier steps, its own round's earlier steps, or `prev.STEP.OUTPUT | FALLBACK`: the previous
round's output, FALLBACK (a step output or URI) in round 1. Each preset says how many rounds (`rounds: {round: 2}`,
default 1; `--set rounds.round=3`); round N's steps run as `roundN/STEP` (MLflow run, store prefix), configured by
the preset's `config.STEP`, where `${round}` is the round's number (e.g. `seed: ${round}`).
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


class RoundsSpec(StrictModel):
    id: str = Field(pattern=STEP_ID)
    description: str = ""
    steps: list[StepSpec] = Field(min_length=1, description="run once per round, in order")


class RoundsEntry(StrictModel):
    """A `steps` entry `{rounds: {id, steps}}`: its steps repeated once per round."""

    rounds: RoundsSpec


class PresetSpec(StrictModel):
    description: str = ""
    inputs: dict[str, str] = Field(
        default_factory=dict, description="'STEP.OUTPUT' -> URI: a recipe output taken from outside, its steps left out"
    )
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    rounds: dict[str, int] = Field(default_factory=dict, description="rounds block id -> its number of rounds")
    config: dict[str, dict[str, Any]] = Field(default_factory=dict)


class RecipeFile(StrictModel):
    family: str
    description: str = ""
    paper: str = ""
    steps: list[StepSpec | RoundsEntry] = Field(min_length=1)
    presets: dict[str, PresetSpec] = Field(min_length=1)

    def outline(self) -> str:
        """The steps in order, a rounds block as `ID×(STEP → ...)` (what `llmfab recipes` shows)."""
        return " → ".join(
            f"{e.rounds.id}×({' → '.join(s.id for s in e.rounds.steps)})" if isinstance(e, RoundsEntry) else e.id
            for e in self.steps
        )


def _check_entries(raw: Any, source: str) -> None:
    """Validate each `steps` entry as what it is (a step, or a rounds block), so an error names its own fields."""
    entries = raw.get("steps") if isinstance(raw, dict) else None
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        model = RoundsEntry if isinstance(entry, dict) and "rounds" in entry else StepSpec
        validate(model, entry, source, f"steps[{index}]")


_WHEN = re.compile(r"^\s*([a-z][a-z0-9_-]*)\.([A-Za-z_][A-Za-z0-9_]*)\s*==\s*(\S+)\s*$")
_PREV = re.compile(r"^prev\.([a-z][a-z0-9_-]*)\.([A-Za-z_][A-Za-z0-9_]*)\s*\|\s*(\S+)$")
ROUND_NUMBER = "${round}"  # in a round's step config: the round's number (1, 2, ...)
RESERVED_IDS = frozenset({"models", "rounds", "prev", "inputs"})  # words of overrides and references


def parse_prev(ref: str) -> tuple[str, str, str] | None:
    """`prev.STEP.OUTPUT | FALLBACK` -> (STEP, OUTPUT, FALLBACK); None for any other reference."""
    match = _PREV.match(ref.strip())
    return match.groups() if match else None  # type: ignore[return-value]


@dataclass(frozen=True)
class Round:
    """Round `number` (from 1) of the `count` rounds of block `block`; its steps run as `{block}{number}/STEP`."""

    block: str
    number: int
    count: int

    @property
    def name(self) -> str:
        return f"{self.block}{self.number}"

    def step_id(self, base_id: str) -> str:
        return f"{self.name}/{base_id}"


@dataclass
class RoundsBlock:
    """A recipe's rounds block as written, with its number of rounds in the preset (what a KFP sub-pipeline is
    built from). `initial` maps each `STEP.OUTPUT` that its steps read as `prev.` to its round-1 value."""

    id: str
    count: int
    steps: list[StepSpec]
    initial: dict[str, str] = field(default_factory=dict)

    def prev_value(self, step: str, output: str, rnd: Round) -> str:
        """What `prev.STEP.OUTPUT` reads in round `rnd`: the previous round's output; in round 1, `initial`'s."""
        if rnd.number == 1:
            return self.initial[f"{step}.{output}"]
        return f"{Round(self.id, rnd.number - 1, self.count).step_id(step)}.{output}"


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
    round: Round | None = None  # set for a step of a rounds block: its id is `{block}{number}/{base_id}`
    description: str = ""  # the recipe's words for the step: its MLflow run's description

    @property
    def base_id(self) -> str:
        """The step's id in the recipe (and in the preset's `config`): a round's step without its round."""
        return self.id.partition("/")[2] if self.round else self.id

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
    rounds: dict[str, RoundsBlock] = field(default_factory=dict)
    given: dict[str, str] = field(default_factory=dict)  # the preset's `inputs`: STEP.OUTPUT -> URI

    def step(self, step_id: str) -> ResolvedStep:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def round_counts(self) -> dict[str, int]:
        """{rounds block id: its number of rounds}: what shapes the pipeline besides the steps."""
        return {block.id: block.count for block in self.rounds.values()}

    def plan(self) -> dict:
        """The fully resolved recipe as plain data (what `llmfab compile --plan` prints)."""
        return {
            "family": self.family,
            "preset": self.preset,
            "models": {k: m.model_dump(mode="json") for k, m in self.models.items()},
            **({"inputs": self.given} if self.given else {}),
            **({"rounds": self.round_counts()} if self.rounds else {}),
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


URI_SCHEMES = ("hf://", "s3://", "file://")
URI_FORMS = "hf://ORG/NAME[@REV], hf://datasets/ORG/NAME[@REV], s3://BUCKET/KEY, file:///PATH or an absolute path"
_STEP_REF = re.compile(r"^[a-z][a-z0-9_-]*\.[A-Za-z_][A-Za-z0-9_]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@\S+)?$")


def check_uri(uri: str, where: str) -> None:
    """A URI input that the stages can read (llmfab.hub for hf://, llmfab.storage for the rest)."""
    from llmfab.errors import StoreError
    from llmfab.hub import is_hub_uri, parse_hub_uri

    if is_hub_uri(uri):
        try:
            parse_hub_uri(uri)
        except StoreError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    elif "://" in uri and not uri.startswith(URI_SCHEMES):
        raise ConfigError(f"{where}: unsupported URI scheme; expected {URI_FORMS}")


def unknown_ref_error(ref: str, where: str) -> ConfigError:
    """The error for a reference to no earlier step: a `STEP.OUTPUT` of a later or unknown step, or neither a
    reference nor a URI (a bare hub id, `Qwen/Qwen2-0.5B`, is what an hf:// URI misses its scheme)."""
    if _STEP_REF.match(ref):
        return ConfigError(f"{where}: no earlier step {ref.partition('.')[0]!r}")
    hint = f"; a hub repo is written hf://{ref}" if _HUB_ID.match(ref) else ""
    return ConfigError(f"{where}: expected STEP.OUTPUT (an earlier step's output) or a URI ({URI_FORMS}){hint}")


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


def _substitute(value: Any, models: dict[str, dict], where: str, round_number: int | None = None) -> Any:
    if value == ROUND_NUMBER:
        if round_number is None:
            raise ConfigError(f"{where}: {ROUND_NUMBER} is a round's number; only the steps of a rounds block have one")
        return round_number
    if isinstance(value, str) and (m := _REF.match(value)):
        if m.group(1) not in models:
            raise ConfigError(f"{where}: unknown model {m.group(1)!r}; preset defines {', '.join(models) or 'none'}")
        return models[m.group(1)]
    if isinstance(value, dict):
        return {k: _substitute(v, models, f"{where}.{k}", round_number) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, models, f"{where}[{i}]", round_number) for i, v in enumerate(value)]
    return value


def _apply_overrides(preset: dict, overrides: list[str], step_ids: set[str], block_ids: set[str], source: str) -> dict:
    """`models.NAME.FIELD=V` edits a preset model; `rounds.BLOCK=N` a block's number of rounds; `inputs.STEP.OUTPUT=URI`
    gives a recipe output from outside; `STEP.FIELD=V` a step's config (every round's, for a step of a rounds block)."""
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "models":
            target = ["models", *path[1:]]
        elif path[0] == "inputs":
            if len(path) != 3 or not isinstance(value, str):
                raise ConfigError(f"{source}: override {text!r}: expected inputs.STEP.OUTPUT=URI")
            target = ["inputs", f"{path[1]}.{path[2]}"]
        elif path[0] == "rounds":
            if len(path) != 2 or path[1] not in block_ids:
                raise ConfigError(
                    f"{source}: override {text!r}: expected rounds.BLOCK=N; rounds blocks: "
                    f"{', '.join(sorted(block_ids)) or 'none'}"
                )
            target = path
        elif path[0] in step_ids:
            target = ["config", *path]
        else:
            raise ConfigError(
                f"{source}: override {text!r}: {path[0]!r} is neither 'models', 'rounds', 'inputs' nor a step id "
                f"({', '.join(sorted(step_ids))})"
            )
        nested: Any = value
        for part in reversed(target):
            nested = {part: nested}
        preset = deep_merge(preset, nested)
    return preset


def _read(path: Path, source: str) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None


def _step_ids(recipe: RecipeFile, source: str) -> tuple[list[str], dict[str, str]]:
    """The ids a preset's `config` names (a round's step once, for every round) and {round step id: its block};
    with the blocks' ids, all distinct and none a reserved word."""
    step_ids, block_of = [], {}
    for entry in recipe.steps:
        if isinstance(entry, RoundsEntry):
            block_of.update({s.id: entry.rounds.id for s in entry.rounds.steps})
            step_ids += [s.id for s in entry.rounds.steps]
        else:
            step_ids.append(entry.id)
    names = [*step_ids, *set(block_of.values())]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"{source}: steps: duplicate step ids {', '.join(duplicates)}")
    if reserved := sorted(RESERVED_IDS & set(names)):
        raise ConfigError(f"{source}: steps: {reserved[0]!r} is a reserved word, not a step id")
    return step_ids, block_of


def _given(data: Any, recipe: RecipeFile, block_of: dict[str, str], source: str, prefix: str) -> dict[str, str]:
    """The preset's `inputs`, checked: each key an output of a step outside rounds blocks, each value a URI."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix}.inputs: expected a mapping of STEP.OUTPUT to URIs")
    stages = {e.id: e.stage for e in recipe.steps if isinstance(e, StepSpec)}
    for key, uri in data.items():
        where = f"{source}: {prefix}.inputs.{key}"
        step, _, output = key.partition(".")
        if step in block_of:
            raise ConfigError(f"{where}: step {step!r} runs in rounds {block_of[step]!r}; give a step outside rounds")
        if step not in stages:
            raise ConfigError(f"{where}: expected STEP.OUTPUT of a recipe step; steps: {', '.join(stages)}")
        if output not in (outputs := get_stage(stages[step]).outputs):
            raise ConfigError(f"{where}: step {step!r} has outputs {', '.join(outputs)}")
        if not isinstance(uri, str) or not is_uri(uri):
            raise ConfigError(f"{where}: expected a URI ({URI_FORMS}), got {uri!r}")
        check_uri(uri, where)
    return dict(data)


def _entry_id(entry: StepSpec | RoundsEntry) -> str:
    return entry.rounds.id if isinstance(entry, RoundsEntry) else entry.id


def _reads(entry: StepSpec | RoundsEntry) -> set[str]:
    """The ids of the entries (steps, rounds blocks) that `entry` reads: its inputs' and its condition's."""
    steps = entry.rounds.steps if isinstance(entry, RoundsEntry) else [entry]
    ids: set[str] = set()
    for step in steps:
        for ref in (r for refs in step.inputs.values() for r in as_refs(refs)):
            ref = prev[2] if (prev := parse_prev(ref)) else ref  # the previous round's is the block's own
            if not is_uri(ref):
                ids.add(ref.partition(".")[0])
        if step.when and (match := _WHEN.match(step.when)):
            ids.add(match.group(1))
    return ids - {s.id for s in steps} if isinstance(entry, RoundsEntry) else ids


def _bind(ref: str, given: dict[str, str]) -> str:
    if prev := parse_prev(ref):
        return f"prev.{prev[0]}.{prev[1]} | {given.get(prev[2], prev[2])}"
    return given.get(ref, ref)


def _with_given(entries: list, given: dict[str, str]) -> list:
    """`entries` with every reference to a given output replaced by its URI, and None for each entry that the
    recipe's last steps (those no entry reads) no longer need."""

    def bound(step: StepSpec) -> StepSpec:
        inputs = {
            name: [_bind(r, given) for r in refs] if isinstance(refs, list) else _bind(refs, given)
            for name, refs in step.inputs.items()
        }
        return step.model_copy(update={"inputs": inputs})

    out = [
        RoundsEntry(rounds=e.rounds.model_copy(update={"steps": [bound(s) for s in e.rounds.steps]}))
        if isinstance(e, RoundsEntry)
        else bound(e)
        for e in entries
    ]
    if not given:
        return list(entries)
    # The last steps: those no later entry reads (an earlier one that does names a later step: an error, kept
    # for _resolve_step to report).
    read_later = [set().union(set(), *(_reads(e) for e in entries[i + 1 :])) for i in range(len(entries))]
    reads = {_entry_id(e): _reads(e) for e in out}
    wanted, keep = [_entry_id(e) for e, later in zip(out, read_later, strict=True) if _entry_id(e) not in later], set()
    while wanted:
        entry_id = wanted.pop()
        if entry_id in reads and entry_id not in keep:
            keep.add(entry_id)
            wanted += reads[entry_id]
    return [e if _entry_id(e) in keep else None for e in out]


def _round_counts(data: Any, blocks: set[str], source: str, prefix: str) -> dict[str, int]:
    """{block id: number of rounds} from the preset's `rounds` (a block it leaves out runs once)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix}.rounds: expected a mapping of rounds block ids to counts")
    for name, count in data.items():
        if name not in blocks:
            raise ConfigError(
                f"{source}: {prefix}.rounds.{name}: no rounds block with that id; blocks: "
                f"{', '.join(sorted(blocks)) or 'none'}"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{source}: {prefix}.rounds.{name}: expected a number of rounds >= 1, got {count!r}")
    return {block: data.get(block, 1) for block in blocks}


def _last_round_ref(ref: str, rounds: dict[str, RoundsBlock], block_of: dict[str, str], where: str) -> str:
    """A reference outside a rounds block as the step ids it runs with: `BLOCK.STEP.OUTPUT` is the block's last
    round's output (`BLOCKn/STEP.OUTPUT`); every other reference is itself."""
    if is_uri(ref):
        return ref
    parts = ref.split(".")
    if parts[0] in block_of and len(parts) == 2:
        block = block_of[parts[0]]
        raise ConfigError(
            f"{where}: step {parts[0]!r} runs in rounds {block!r}; its last round's output is {block}.{ref}"
        )
    if len(parts) != 3 or parts[0] not in rounds:
        return ref
    block = rounds[parts[0]]
    step = next((s for s in block.steps if s.id == parts[1]), None)
    if step is None:
        raise ConfigError(f"{where}: rounds {block.id!r} has steps {', '.join(s.id for s in block.steps)}")
    if step.parallel:
        raise ConfigError(f"{where}: step {step.id!r} runs in parallel inside its round; read one checkpoint")
    return f"{Round(block.id, block.count, block.count).step_id(step.id)}.{parts[2]}"


def _block(
    spec: RoundsSpec,
    count: int,
    earlier: dict[str, ResolvedStep],
    rounds: dict[str, RoundsBlock],
    block_of: dict[str, str],
    where: str,
) -> RoundsBlock:
    """A rounds block with its references checked (what no single round shows) and `prev.` fallbacks gathered;
    references to earlier blocks are given as their last round's steps."""
    own = {s.id: s for s in spec.steps}
    outer_block_of = {k: v for k, v in block_of.items() if v != spec.id}
    block = RoundsBlock(spec.id, count, [])
    for j, step in enumerate(spec.steps):
        at = f"{where}.steps[{j}] ({step.id})"
        if step.when:
            raise ConfigError(f"{at}: when: not supported inside rounds (a round's steps all run)")
        inputs: dict[str, str | list[str]] = {}
        for name, refs in step.inputs.items():
            given = []
            for ref in as_refs(refs):
                here = f"{at}: input {name}={ref!r}"
                if prev := parse_prev(ref):
                    fallback = _prev_fallback(prev, own, earlier, rounds, outer_block_of, block, here)
                    given.append(f"prev.{prev[0]}.{prev[1]} | {fallback}")
                    continue
                if ref.startswith("prev."):
                    raise ConfigError(f"{here}: expected 'prev.STEP.OUTPUT | FALLBACK' (FALLBACK: round 1's value)")
                if ref.partition(".")[0] in own:
                    given.append(ref)  # this round's step: checked in each round
                    continue
                outer = _last_round_ref(ref, rounds, outer_block_of, here)
                _no_parallel_outside(outer, earlier, here)
                given.append(outer)
            inputs[name] = given if isinstance(refs, list) else given[0]
        block.steps.append(step.model_copy(update={"inputs": inputs}))
    return block


def _prev_fallback(
    prev: tuple[str, str, str],
    own: dict[str, StepSpec],
    earlier: dict[str, ResolvedStep],
    rounds: dict[str, RoundsBlock],
    block_of: dict[str, str],
    block: RoundsBlock,
    where: str,
) -> str:
    """Check `prev.STEP.OUTPUT | FALLBACK`; record and return its round-1 value (one per STEP.OUTPUT)."""
    step, output, fallback = prev
    if step not in own:
        raise ConfigError(f"{where}: rounds {block.id!r} has no step {step!r}; its steps: {', '.join(own)}")
    outputs = get_stage(own[step].stage).outputs
    if output not in outputs:
        raise ConfigError(f"{where}: step {step!r} has outputs {', '.join(outputs)}")
    if own[step].parallel:
        raise ConfigError(f"{where}: step {step!r} runs in parallel; a round passes on one checkpoint")
    if fallback.partition(".")[0] in own or fallback.startswith("prev."):
        raise ConfigError(f"{where}: FALLBACK (round 1's value) must be an earlier step's output or a URI")
    fallback = _last_round_ref(fallback, rounds, block_of, where)
    _no_parallel_outside(fallback, earlier, where)
    if block.initial.setdefault(f"{step}.{output}", fallback) != fallback:
        known = block.initial[f"{step}.{output}"]
        raise ConfigError(f"{where}: prev.{step}.{output} falls back to {known!r} elsewhere; round 1 has one value")
    return fallback


def _no_parallel_outside(ref: str, earlier: dict[str, ResolvedStep], where: str) -> None:
    src = earlier.get(ref.partition(".")[0])
    if src is not None and src.variants:
        raise ConfigError(f"{where}: step {src.id!r} runs in parallel; a round reads one checkpoint (e.g. an average)")


def _round_ref(ref: str, rnd: Round, block: RoundsBlock) -> str:
    """A reference inside round `rnd` as the step ids it runs with: this round's steps, the previous round's
    (`prev.`; the fallback in round 1); references outside the block are already resolved."""
    if prev := parse_prev(ref):
        return block.prev_value(prev[0], prev[1], rnd)
    step, _, output = ref.partition(".")
    if not is_uri(ref) and any(s.id == step for s in block.steps):
        return f"{rnd.step_id(step)}.{output}"
    return ref


def load_recipe(family_or_path: str | Path, preset: str = "tiny", overrides: list[str] | None = None) -> Recipe:
    path = recipe_path(family_or_path)
    source = str(path)
    raw = _read(path, source)
    _check_entries(raw, source)
    recipe = validate(RecipeFile, raw, source)
    if preset not in recipe.presets:
        raise ConfigError(f"{source}: no preset {preset!r}; available: {', '.join(recipe.presets)}")

    step_ids, block_of = _step_ids(recipe, source)
    block_ids = set(block_of.values())
    preset_data = _apply_overrides(
        recipe.presets[preset].model_dump(), overrides or [], set(step_ids), block_ids, source
    )
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
    given = _given(preset_data["inputs"], recipe, block_of, source, prefix)
    entries = _with_given(recipe.steps, given)  # None: a step left out, what it made given from outside
    counts = _round_counts(preset_data["rounds"], block_ids, source, prefix)
    models = {
        name: validate(ModelConfig, data, source, f"{prefix}.models.{name}")
        for name, data in preset_data["models"].items()
    }
    model_dicts = {name: m.model_dump() for name, m in models.items()}

    by_id: dict[str, ResolvedStep] = {}  # in step order, a rounds block's steps once per round
    rounds: dict[str, RoundsBlock] = {}

    def add(step: StepSpec, step_id: str, inputs: dict, where: str, rnd: Round | None = None) -> None:
        config_where = f"{prefix}.config.{step.id}"
        data = preset_data["config"].get(step.id, {})
        data = _substitute(data, model_dicts, f"{source}: {config_where}", rnd.number if rnd else None)
        by_id[step_id] = _resolve_step(step, step_id, inputs, data, by_id, source, config_where, where, rnd)

    for index, entry in enumerate(entries):
        if entry is None:
            continue
        if isinstance(entry, RoundsEntry):
            where = f"steps[{index}].rounds"
            block = _block(entry.rounds, counts[entry.rounds.id], by_id, rounds, block_of, f"{source}: {where}")
            for number in range(1, block.count + 1):
                rnd = Round(block.id, number, block.count)
                for j, step in enumerate(block.steps):
                    add(step, rnd.step_id(step.id), _round_inputs(step, rnd, block), f"{where}.steps[{j}]", rnd)
            rounds[block.id] = block
        else:
            at = f"{source}: steps[{index}] ({entry.id})"
            add(entry, entry.id, _outer_inputs(entry, rounds, block_of, at), f"steps[{index}]")
    return Recipe(recipe.family, preset, source, list(by_id.values()), models, recipe.description, rounds, given)


def _round_inputs(step: StepSpec, rnd: Round, block: RoundsBlock) -> dict[str, str | list[str]]:
    return {
        name: [_round_ref(r, rnd, block) for r in refs] if isinstance(refs, list) else _round_ref(refs, rnd, block)
        for name, refs in step.inputs.items()
    }


def _outer_inputs(step: StepSpec, rounds: dict[str, RoundsBlock], block_of: dict[str, str], where: str) -> dict:
    inputs: dict[str, str | list[str]] = {}
    for name, refs in step.inputs.items():
        given = [_last_round_ref(r, rounds, block_of, f"{where}: input {name}={r!r}") for r in as_refs(refs)]
        inputs[name] = given if isinstance(refs, list) else given[0]
    return inputs


def _resolve_step(
    step: StepSpec,
    step_id: str,
    inputs: dict[str, str | list[str]],
    data: dict,
    earlier: dict[str, ResolvedStep],
    source: str,
    config_where: str,
    where: str,
    rnd: Round | None,
) -> ResolvedStep:
    """Step `step` run as `step_id` with `inputs` (references as the step ids they run with) and config `data`,
    its references and parallel items checked against the steps before it."""
    spec = get_stage(step.stage)
    config = spec.make_config(data, source, config_where)
    spec_where = f"{source}: {where} ({step_id})"
    variants = [dict(item) for item in step.parallel or []]
    variant_configs = [
        spec.make_config(deep_merge(data, item), source, f"{where}.parallel[{i}]") for i, item in enumerate(variants)
    ]
    if len({variant_name(v) for v in variants}) != len(variants):
        raise ConfigError(f"{spec_where}: parallel: items must differ")
    when = _condition(step.when, earlier, spec_where) if step.when else None
    for name, ref in ((n, r) for n, refs in inputs.items() for r in as_refs(refs)):
        if is_uri(ref):
            check_uri(ref, f"{spec_where}: input {name}={ref!r}")
            continue
        src_step, _, output = ref.partition(".")
        if src_step not in earlier:
            raise unknown_ref_error(ref, f"{spec_where}: input {name}={ref!r}")
        src = earlier[src_step]
        src_outputs = get_stage(src.stage).outputs
        if output not in src_outputs:
            raise ConfigError(
                f"{spec_where}: input {name}={ref!r}: step {src_step!r} has outputs {', '.join(src_outputs)}"
            )
        if src.variants and not isinstance(inputs[name], str):
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
        spec.check_inputs(inputs)
    except ConfigError as exc:
        raise ConfigError(f"{spec_where}: {exc}") from None
    return ResolvedStep(
        step_id, step.stage, dict(inputs), config, variants, variant_configs, when, rnd, step.description.strip()
    )


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
