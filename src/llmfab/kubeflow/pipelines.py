"""A family pipeline built from its recipe: one task per step, `step.output` references as artifact edges.

    llmfab-qwen2(preset="tiny", overrides=[], store="", tracking_uri="", experiment="", run_name="",
                 parent_run_id="")

A first task, open-run, opens the parent MLflow run (or adopts `parent_run_id`, as `llmfab run` passes it) and
works out the run's store prefix STORE/runs/RUN_NAME; every step task is a nested MLflow run of it and writes
below STORE/runs/RUN_NAME/STEP. Each step task reads its config from the recipe preset inside its container
(so `preset` and `overrides` are run-time parameters; the recipe's steps, the same in every preset, are the
graph). Empty strings mean the pod's environment: $LLMFAB_STORE, $MLFLOW_TRACKING_URI, $MLFLOW_EXPERIMENT_NAME.

A rounds block is a sub-pipeline (named by the block's id), called once per round in order (tasks `round1`,
`round2`, ...): its parameters are the round's step ids (`reward_step_id` = `round2/reward`), the outputs its steps
read from outside the round (`sft__model`; `prev_average__model`: the previous round's, in round 1 the fallback) and
the run's; its outputs are what later steps and the next round read (`average__model`). The number of rounds, set
per preset, is part of the graph: build the pipeline with the preset and overrides it runs with.

On a cluster (kfp-kubernetes, ignored by kfp.local): every task gets the S3 credentials from Secret llmfab-s3,
the MLflow ones from Secret llmfab-mlflow (optional) and the endpoints from ConfigMap llmfab-env, by reference
only; every step task also HF_TOKEN from Secret llmfab-hf-token (optional) and the hub cache PVC llmfab-hf-cache
at HF_HOME; GPU-group stages (llmfab.images: train, deepspeed) also get an accelerator, a toleration and a node
selector.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.

import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from llmfab.config.recipe import (
    Recipe,
    ResolvedStep,
    Round,
    RoundsBlock,
    as_refs,
    is_uri,
    list_families,
    load_recipe,
    parse_prev,
)
from llmfab.errors import ConfigError
from llmfab.images import stage_group
from llmfab.kube.pod_env import HF_CACHE_PVC, HF_HOME, HF_TOKEN_ENV, HF_TOKEN_KEY, HF_TOKEN_SECRET
from llmfab.kube.trainjob import MLFLOW_KEYS, MLFLOW_SECRET, S3_KEYS, S3_SECRET
from llmfab.kubeflow.components import (
    artifact_type,
    close_run_component,
    input_param,
    is_list_input,
    launchable,
    open_run_component,
    stage_component,
    step_value_component,
    uri_output,
)
from llmfab.kubeflow.runtime import STORE_URI

PIPELINE_PREFIX = "llmfab-"
ENV_CONFIG_MAP = "llmfab-env"  # manifests/base/runner (+ overlays: the store and the S3 endpoint)
ENV_CONFIG_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "AWS_DEFAULT_REGION",
    "LLMFAB_PROGRESS",
    "LLMFAB_STORE",
    "AWS_ENDPOINT_URL_S3",
    "HF_HOME",  # where the hub cache PVC is mounted (only there: a local run keeps its own cache)
)


@dataclass(frozen=True)
class KubernetesSettings:
    """What GPU-group tasks ask the cluster for, and where every task's credentials come from."""

    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = 1
    tolerations: tuple[tuple[str, str, str], ...] = (("nvidia.com/gpu", "Exists", "NoSchedule"),)  # key, op, effect
    node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    s3_secret: str = S3_SECRET
    mlflow_secret: str = MLFLOW_SECRET
    env_config_map: str = ENV_CONFIG_MAP
    hf_token_secret: str = HF_TOKEN_SECRET
    hf_cache_pvc: str | None = HF_CACHE_PVC  # None: no shared hub cache (each pod downloads into its own)


def needs_gpu(stage: str) -> bool:
    return stage_group(stage).gpu


def _configure(task, name: str, stage: str | None, settings: KubernetesSettings, hub: bool = False):
    """What every task gets: its display name, no caching (every run is its own MLflow runs and checkpoints), and
    the cluster settings (a GPU only for `stage` of a GPU group; the hub token and cache for a step's task)."""
    task.set_display_name(name)
    task.set_caching_options(False)
    _apply_kubernetes(task, stage, settings, hub)
    return task


def _apply_kubernetes(task, stage: str | None, settings: KubernetesSettings, hub: bool = False) -> None:
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, settings.s3_secret, {k: k for k in S3_KEYS})
    kubernetes.use_secret_as_env(task, settings.mlflow_secret, {k: k for k in MLFLOW_KEYS}, optional=True)
    kubernetes.use_config_map_as_env(task, settings.env_config_map, {k: k for k in ENV_CONFIG_KEYS}, optional=True)
    if hub:  # a step may read hf:// inputs: gated repos need the token, and the shared cache saves the download
        kubernetes.use_secret_as_env(task, settings.hf_token_secret, {HF_TOKEN_KEY: HF_TOKEN_ENV}, optional=True)
        if settings.hf_cache_pvc:
            kubernetes.mount_pvc(task, pvc_name=settings.hf_cache_pvc, mount_path=HF_HOME)
    if stage is not None and needs_gpu(stage):
        task.set_accelerator_type(settings.accelerator_type)
        task.set_accelerator_limit(settings.accelerator_limit)
        for key, operator, effect in settings.tolerations:
            kubernetes.add_toleration(task, key=key, operator=operator, effect=effect)
        for label, value in sorted(settings.node_selector.items()):
            kubernetes.add_node_selector(task, label_key=label, label_value=value)


URI = "uri"  # what a list input takes of a step output: its store URI parameter (`NAME_uri`), not its artifact


def _channel(ref: str, sources: dict, kind: str, name: str):
    """The pipeline value of reference `ref` for a consumer taking `kind` (an artifact type, or URI): a step output
    (from `sources`: step id -> _Source); a URI written in the recipe becomes an importer named `name`."""
    from kfp import dsl

    if is_uri(ref):
        if kind == URI:
            return ref
        imported = dsl.importer(artifact_uri=ref, artifact_class=getattr(dsl, kind), metadata={STORE_URI: ref})
        imported.set_display_name(name)
        return imported.output
    src, _, out = ref.partition(".")
    return sources[src].outputs[uri_output(out) if kind == URI else out]


def _step_arguments(stage: str, step_id: str, inputs: dict, sources: dict, family: str) -> dict:
    """The component arguments of a step's inputs: artifacts of earlier tasks, store URIs for list inputs (a
    parallel producer's collected), importer artifacts for URIs written in the recipe."""
    from kfp import dsl

    args: dict = {}
    for name, refs in inputs.items():
        if is_list_input(stage, name):
            if isinstance(refs, str) and not is_uri(refs) and sources[refs.partition(".")[0]].parallel:
                src, _, out = refs.partition(".")
                args[input_param(name)] = dsl.Collected(sources[src].outputs[uri_output(out)])
            else:
                args[input_param(name)] = [_channel(r, sources, URI, f"{step_id}-{name}") for r in as_refs(refs)]
        elif isinstance(refs, list):
            raise ConfigError(f"{family} step {step_id}: input {name} of stage {stage} takes one step")
        else:
            args[input_param(name)] = _channel(refs, sources, artifact_type(name), f"{step_id}-{name}")
    return args


@dataclass
class _Source:
    """A step's outputs as the pipeline being built sees them: output name (and NAME_uri) -> channel. Its task's
    outputs, or what crosses a round sub-pipeline's boundary."""

    outputs: Any = field(default_factory=dict)
    parallel: bool = False  # a ParallelFor's task: its outputs are collected into lists


@dataclass(frozen=True)
class _Wire:
    """A value crossing a round sub-pipeline's boundary: `output` of step `source` (`prev/STEP`: the previous
    round's), as an artifact or (kind URI) as its URI parameter."""

    source: str
    output: str
    kind: str

    @property
    def key(self) -> str:
        """The output's name in a _Source."""
        return uri_output(self.output) if self.kind == URI else self.output

    @property
    def name(self) -> str:
        """Its input (or output) name on the sub-pipeline: `sft.model` -> sft__model, `prev/average.model` ->
        prev_average__model."""
        return re.sub(r"\W", "_", f"{self.source}__{self.key}")

    def annotation(self):
        from kfp import dsl

        return str if self.kind == URI else dsl.Input[getattr(dsl, self.kind)]


def _wires(stage: str, inputs: dict) -> list[tuple[str, str]]:
    """(reference, kind) of each step output a step reads; URIs left out."""
    return [
        (ref, URI if is_list_input(stage, name) else artifact_type(name))
        for name, refs in inputs.items()
        for ref in as_refs(refs)
        if not is_uri(ref)
    ]


PREV = "prev/"  # inside a round's sub-pipeline: the source of what `prev.STEP.OUTPUT` reads (`prev/STEP`)


def _in_round(ref: str) -> str:
    """A round's step's reference as its sub-pipeline sees it: `prev.STEP.OUTPUT | FALLBACK` -> prev/STEP.OUTPUT."""
    prev = parse_prev(ref)
    return f"{PREV}{prev[0]}.{prev[1]}" if prev else ref


def _step_param(base_id: str) -> str:
    """The sub-pipeline parameter that holds a round's step's id (round N runs `reward` as `roundN/reward`)."""
    return re.sub(r"\W", "_", f"{base_id}_step_id")


def _round_inputs(block: RoundsBlock, steps: list[ResolvedStep]) -> list[_Wire]:
    """What a round's steps read from outside the round (`steps`: round 1's, for their stages)."""
    own = {s.id for s in block.steps}
    wires: dict[_Wire, None] = {}
    for spec, step in zip(block.steps, steps, strict=True):
        for ref, kind in _wires(step.stage, spec.inputs):
            src, _, out = _in_round(ref).partition(".")
            if src not in own:
                wires[_Wire(src, out, kind)] = None
    return list(wires)


def _round_outputs(recipe: Recipe, block: RoundsBlock) -> list[_Wire]:
    """What other steps read of a round's steps: the next round (`prev.`) and the steps after the block."""
    wires: dict[_Wire, None] = {}
    for consumer in recipe.steps:
        for ref, kind in _wires(consumer.stage, consumer.inputs):
            src_id, _, out = ref.partition(".")
            src = recipe.step(src_id)
            if src.round and src.round.block == block.id and consumer.round != src.round:
                wires[_Wire(src.base_id, out, kind)] = None
    return list(wires)


def _common_params() -> dict:
    """What every step task takes besides its step: the recipe, its preset, tracking, the run (open-run's)."""
    from kfp import dsl

    return {
        "recipe": str,
        "preset": str,
        "overrides": list[str],
        "tracking_uri": str,
        "experiment": str,
        "pipeline_run": dsl.Input[dsl.Artifact],
    }


@dataclass
class _Builder:
    """Places a family's tasks: in its pipeline, and in the sub-pipeline of each rounds block (called once per
    round, the previous round's outputs in, its own out)."""

    recipe: Recipe
    components: dict
    step_value_op: object
    settings: KubernetesSettings
    trainjobs: dict
    loop_parallelism: int | None
    _rounds: dict = field(default_factory=dict)  # block id -> (sub-pipeline, its inputs, its outputs)

    def __post_init__(self):
        # Built before the family's pipeline: KFP builds a sub-pipeline in a pipeline context of its own.
        self._rounds = {block.id: self._round_pipeline(block) for block in self.recipe.rounds.values()}

    def place(self, step: ResolvedStep, step_id, args: dict, common: dict) -> _Source:
        """`step`'s task (one per item in a dsl.ParallelFor for a parallel step), run as `step_id`."""
        from kfp import dsl

        if not step.variants:
            return _Source(self._task(step, step_id, None, args, common).outputs)
        items = [json.dumps(item, sort_keys=True) for item in step.variants]
        loop = dsl.ParallelFor(items, parallelism=self.loop_parallelism or 0, name=f"{step.base_id}-loop")
        with loop as item:
            return _Source(self._task(step, step_id, item, args, common).outputs, parallel=True)

    def _task(self, step: ResolvedStep, step_id, item, args: dict, common: dict):
        launch = self.trainjobs.get(step.base_id)
        extra = {"launch": launch.model_dump_json(exclude_none=True)} if launch is not None else {}
        component = self.components[step.stage]
        task = component(step_id=step_id, variant=item if item is not None else "", **common, **args, **extra)
        # A TrainJob's pods get the GPUs; the task that submits and follows it needs none.
        return _configure(task, step.base_id, step.stage if launch is None else None, self.settings, hub=True)

    def place_conditional(self, step: ResolvedStep, args: dict, common: dict, sources: dict, values: dict):
        """`step` inside a dsl.If on an earlier step's value (passed on by a step-value task, one per value)."""
        from kfp import dsl

        key = (step.when.step, step.when.value)
        if key not in values:
            value = self.step_value_op(value=sources[step.when.step].outputs[step.when.value])
            values[key] = _configure(value, f"{step.when.step}-{step.when.value}", None, self.settings)
        with dsl.If(values[key].output == step.when.equals, name=f"{step.id}-condition"):
            return self.place(step, step.id, args, common)

    def place_round(self, rnd: Round, sources: dict, common: dict, after=None):
        """Round `rnd`: a call of its block's sub-pipeline, after the previous round; its outputs go to `sources`
        as `roundN/STEP`'s."""
        block = self.recipe.rounds[rnd.block]
        sub, wires_in, wires_out = self._rounds[block.id]
        args = {**common, **{_step_param(s.id): rnd.step_id(s.id) for s in block.steps}}
        for wire in wires_in:
            ref = f"{wire.source}.{wire.output}"
            if wire.source.startswith(PREV):
                ref = block.prev_value(wire.source[len(PREV) :], wire.output, rnd)
            args[wire.name] = _channel(ref, sources, wire.kind, f"{rnd.name}-{wire.name}")
        task = sub(**args)
        task.set_display_name(rnd.name)
        if after is not None:
            task.after(after)  # rounds run in order, even where one does not read the other's outputs
        for wire in wires_out:
            sources.setdefault(rnd.step_id(wire.source), _Source()).outputs[wire.key] = task.outputs[wire.name]
        return task

    def _round_pipeline(self, block: RoundsBlock):
        """The sub-pipeline of one round of `block`: its steps' ids, what they read from outside the round and the
        pipeline run as parameters; what later steps (and the next round) read as outputs."""
        from kfp import dsl

        first = Round(block.id, 1, block.count)
        steps = [self.recipe.step(first.step_id(s.id)) for s in block.steps]  # stage and parallel items
        wires_in, wires_out = _round_inputs(block, steps), _round_outputs(self.recipe, block)
        params = {
            **_common_params(),
            **{_step_param(s.id): str for s in block.steps},
            **{w.name: w.annotation() for w in wires_in},
        }
        if len(params) != len(_common_params()) + len(block.steps) + len(wires_in):
            raise ConfigError(f"rounds {block.id}: its steps' ids and references clash as KFP parameter names")
        signature = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a) for n, a in params.items()],
            return_annotation=(
                NamedTuple("Outputs", [(w.name, str if w.kind == URI else getattr(dsl, w.kind)) for w in wires_out])
                if wires_out
                else inspect.Signature.empty
            ),
        )

        def round_pipeline(*args):
            given = signature.bind(*args).arguments
            common = {name: given[name] for name in _common_params()}
            sources: dict[str, _Source] = {}
            for wire in wires_in:
                sources.setdefault(wire.source, _Source()).outputs[wire.key] = given[wire.name]
            for spec, step in zip(block.steps, steps, strict=True):
                inputs = {
                    name: [_in_round(r) for r in refs] if isinstance(refs, list) else _in_round(refs)
                    for name, refs in spec.inputs.items()
                }
                args = _step_arguments(step.stage, spec.id, inputs, sources, self.recipe.family)
                sources[spec.id] = self.place(step, given[_step_param(spec.id)], args, common)
            if wires_out:
                return signature.return_annotation(*(sources[w.source].outputs[w.key] for w in wires_out))
            return None

        round_pipeline.__signature__ = signature
        round_pipeline.__name__ = block.id
        description = f"one round of {self.recipe.family}'s rounds block {block.id}"
        return dsl.pipeline(name=block.id, description=description)(round_pipeline), wires_in, wires_out


def build_pipeline(
    family: str,
    *,
    preset: str = "tiny",
    overrides: list[str] | None = None,
    registry: str | None = None,
    tag: str | None = None,
    kubernetes: KubernetesSettings | None = None,
    trainjobs: dict | None = None,
    loop_parallelism: int | None = None,
    recipe: Recipe | None = None,
):
    """The KFP pipeline of `family`: a packaged family (the components load the same recipe in their image), or a
    recipe YAML path that the components can read (a local run). `preset` and `overrides` are the parameters'
    defaults and shape the graph: a rounds block is one sub-pipeline, called once per round of the preset (open-run
    refuses a run whose preset and overrides ask for another number of rounds).
    `trainjobs` maps step ids of training stages to a LaunchConfig: those steps run as TrainJobs (multi-node); a
    round's step is named by its id in the recipe (`dpo`, every round's).
    `loop_parallelism` caps the concurrent runs of a parallel step (None: all at once, as a cluster schedules).
    `recipe`: `family` at `preset` with `overrides`, when the caller has loaded it already (a run's plan)."""
    from kfp import dsl

    recipe = recipe or load_recipe(family, preset, list(overrides or []))  # the steps, their wiring, the rounds
    preset = recipe.preset
    family_name = recipe.family
    trainjobs = dict(trainjobs or {})
    stages = {s.base_id: s.stage for s in recipe.steps}  # a round's step by its id in the recipe: every round's
    for step_id in trainjobs:
        if step_id not in stages:
            raise ConfigError(f"trainjob {step_id!r}: no such step; steps: {', '.join(stages)}")
        if not launchable(stages[step_id]):
            raise ConfigError(f"trainjob {step_id!r}: stage {stages[step_id]} does not train; it runs in its task")
    builder = _Builder(
        recipe,
        components={stage: stage_component(stage, registry, tag) for stage in stages.values()},
        step_value_op=step_value_component(registry, tag),
        settings=kubernetes or KubernetesSettings(),
        trainjobs=trainjobs,
        loop_parallelism=loop_parallelism,
    )
    settings = builder.settings
    open_run_op = open_run_component(registry, tag)
    close_run_op = close_run_component(registry, tag)
    description = f"llmfab {recipe.family}: {recipe.description}".strip()[:1000]
    default_overrides = list(overrides or [])
    round_counts = json.dumps(recipe.round_counts(), sort_keys=True)

    def pipeline(
        preset: str = preset,
        overrides: list[str] = default_overrides,  # the graph's (a KFP default, never mutated)
        store: str = "",
        tracking_uri: str = "",
        experiment: str = "",
        run_name: str = "",
        parent_run_id: str = "",
    ):
        # The exit task ends the parent MLflow run with the pipeline's own status (FAILED when a step failed) and
        # copies each step's final metrics onto it; it finds the run by this KFP run's id (an exit task may
        # depend on no task). A local run's parent (`parent_run_id`) is the CLI's to end.
        closing = close_run_op(
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            adopted_run_id=parent_run_id,
            tracking_uri=tracking_uri,
            experiment=experiment,
        )
        _configure(closing, "close-run", None, settings)
        with dsl.ExitHandler(closing, name="steps"):
            opened = open_run_op(
                recipe=family,
                preset=preset,
                overrides=overrides,
                store=store,
                tracking_uri=tracking_uri,
                experiment=experiment,
                run_name=run_name,
                parent_run_id=parent_run_id,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                rounds=round_counts,
            )
            _configure(opened, "open-run", None, settings)
            sources: dict[str, _Source] = {}
            values: dict = {}  # (step, value) -> its step-value task
            rounds: dict = {}  # round name -> its sub-pipeline task
            common = dict(
                recipe=family,
                preset=preset,
                overrides=overrides,
                tracking_uri=tracking_uri,
                experiment=experiment,
                pipeline_run=opened.outputs["pipeline_run"],
            )
            for step in recipe.steps:
                if step.round is not None:  # a round's steps are its sub-pipeline's: one call per round
                    rnd = step.round
                    if rnd.name not in rounds:
                        previous = rounds.get(Round(rnd.block, rnd.number - 1, rnd.count).name)
                        rounds[rnd.name] = builder.place_round(rnd, sources, common, after=previous)
                    continue
                args = _step_arguments(step.stage, step.id, step.inputs, sources, family_name)
                if step.when:
                    sources[step.id] = builder.place_conditional(step, args, common, sources, values)
                else:
                    sources[step.id] = builder.place(step, step.id, args, common)

    pipeline.__name__ = family_name
    return dsl.pipeline(name=f"{PIPELINE_PREFIX}{family_name}", description=description)(pipeline)


def compile_pipeline(family: str, path: Path, **kwargs) -> Path:
    from kfp import compiler

    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(family, **kwargs), str(path))
    return path


def compile_component(stage: str, path: Path, registry: str | None = None, tag: str | None = None) -> Path:
    from kfp import compiler

    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(stage_component(stage, registry, tag), str(path))
    return path


def component_readme(stage: str, registry: str | None = None, tag: str | None = None) -> str:
    """components/STAGE/README.md: what the component takes and gives, from the stage's declaration."""
    from llmfab.images import image_for
    from llmfab.kubeflow.components import METRICS_OUTPUT, artifact_type
    from llmfab.stages import get_stage

    spec = get_stage(stage)
    group = stage_group(stage)
    lines = [
        f"# {stage}",
        "",
        spec.doc,
        "",
        f"Image `{image_for(stage, registry, tag)}` (group `{group.name}`{', GPU' if group.gpu else ''}). "
        "Generated by `llmfab compile-pipelines` from the stage's `@stage` declaration, with `component.yaml` "
        "(the KFP component spec): do not edit.",
        "",
        "Parameters: `recipe`, `preset`, `overrides` (the step's config is the recipe preset's), `step_id`, "
        "`variant`, `tracking_uri`, `experiment`; input `pipeline_run` (open-run's artifact: the parent MLflow run "
        "and the run's store prefix).",
        "",
        "| input | KFP type | required | what |",
        "| --- | --- | --- | --- |",
    ]
    for name, what in [*spec.inputs.items(), *spec.optional_inputs.items()]:
        kind = "List[str] of store URIs" if is_list_input(stage, name) else f"Input[{artifact_type(name)}]"
        lines.append(f"| `{input_param(name)}` | {kind} | {'yes' if name in spec.inputs else 'no'} | {what} |")
    lines += ["", "| output | KFP type | what |", "| --- | --- | --- |"]
    for name, what in spec.outputs.items():
        lines.append(f"| `{name}` | Output[{artifact_type(name)}] | {what} (its store URI in `metadata.store_uri`) |")
        lines.append(f"| `{uri_output(name)}` | str | the same URI as a parameter (what list inputs take) |")
    lines.append(f"| `{METRICS_OUTPUT}` | Output[Metrics] | the stage's final metrics (also in its MLflow run) |")
    return "\n".join(lines) + "\n"


def compile_all(root: Path, registry: str | None = None, tag: str | None = None) -> list[Path]:
    """pipelines/FAMILY.yaml for every family; components/STAGE/component.yaml and README.md for every stage."""
    from llmfab.stages import shipped_stages

    written = [
        compile_pipeline(f, root / "pipelines" / f"{f}.yaml", registry=registry, tag=tag) for f in list_families()
    ]
    for stage in shipped_stages():
        written.append(compile_component(stage, root / "components" / stage / "component.yaml", registry, tag))
        readme = root / "components" / stage / "README.md"
        readme.write_text(component_readme(stage, registry, tag), encoding="utf-8")
        written.append(readme)
    return written
