"""A family pipeline built from its recipe: one task per step, `step.output` references as artifact edges.

    llmfab-qwen2(preset="tiny", overrides=[], store="", tracking_uri="", experiment="", run_name="",
                 parent_run_id="")

A first task, open-run, opens the parent MLflow run (or adopts `parent_run_id`, as `llmfab run` passes it) and
works out the run's store prefix STORE/runs/RUN_NAME; every step task is a nested MLflow run of it and writes
below STORE/runs/RUN_NAME/STEP. Each step task reads its config from the recipe preset inside its container
(so `preset` and `overrides` are run-time parameters; the recipe's steps, the same in every preset, are the
graph). Empty strings mean the pod's environment: $LLMFAB_STORE, $MLFLOW_TRACKING_URI, $MLFLOW_EXPERIMENT_NAME.

On a cluster (kfp-kubernetes, ignored by kfp.local): every task gets the S3 credentials from Secret llmfab-s3,
the MLflow ones from Secret llmfab-mlflow (optional) and the endpoints from ConfigMap llmfab-env, by reference
only; GPU-group stages (llmfab.images: train, deepspeed) also get an accelerator, a toleration and a node selector.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmfab.config.recipe import Recipe, as_refs, is_uri, list_families, load_recipe
from llmfab.errors import ConfigError
from llmfab.images import stage_group
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


def needs_gpu(stage: str) -> bool:
    return stage_group(stage).gpu


def _configure(task, name: str, stage: str | None, settings: KubernetesSettings):
    """What every task gets: its display name, no caching (every run is its own MLflow runs and checkpoints), and
    the cluster settings (a GPU only for `stage` of a GPU group)."""
    task.set_display_name(name)
    task.set_caching_options(False)
    _apply_kubernetes(task, stage, settings)
    return task


def _apply_kubernetes(task, stage: str | None, settings: KubernetesSettings) -> None:
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, settings.s3_secret, {k: k for k in S3_KEYS})
    kubernetes.use_secret_as_env(task, settings.mlflow_secret, {k: k for k in MLFLOW_KEYS}, optional=True)
    kubernetes.use_config_map_as_env(task, settings.env_config_map, {k: k for k in ENV_CONFIG_KEYS}, optional=True)
    if stage is not None and needs_gpu(stage):
        task.set_accelerator_type(settings.accelerator_type)
        task.set_accelerator_limit(settings.accelerator_limit)
        for key, operator, effect in settings.tolerations:
            kubernetes.add_toleration(task, key=key, operator=operator, effect=effect)
        for label, value in sorted(settings.node_selector.items()):
            kubernetes.add_node_selector(task, label_key=label, label_value=value)


def _step_arguments(step, tasks: dict, family: str) -> dict:
    """The component arguments of `step`'s inputs: artifacts of earlier tasks, store URIs for list inputs (a
    parallel producer's collected), importer artifacts for URIs written in the recipe."""
    from kfp import dsl

    args: dict = {}
    for name, refs in step.inputs.items():
        if is_list_input(step.stage, name):
            if isinstance(refs, str) and not is_uri(refs) and tasks[refs.partition(".")[0]].parallel:
                src, _, out = refs.partition(".")
                args[input_param(name)] = dsl.Collected(tasks[src].task.outputs[uri_output(out)])
            else:
                args[input_param(name)] = [
                    r if is_uri(r) else tasks[r.partition(".")[0]].task.outputs[uri_output(r.partition(".")[2])]
                    for r in as_refs(refs)
                ]
        elif isinstance(refs, list):
            raise ConfigError(f"{family} step {step.id}: input {name} of stage {step.stage} takes one step")
        elif is_uri(refs):
            imported = dsl.importer(
                artifact_uri=refs, artifact_class=getattr(dsl, artifact_type(name)), metadata={STORE_URI: refs}
            )
            imported.set_display_name(f"{step.id}-{name}")
            args[input_param(name)] = imported.output
        else:
            src, _, out = refs.partition(".")
            args[input_param(name)] = tasks[src].task.outputs[out]
    return args


@dataclass
class _Placed:
    task: object
    parallel: bool

    @property
    def outputs(self):
        return self.task.outputs


def _step_task(component, step, item, args: dict, common: dict, settings: KubernetesSettings, launch) -> _Placed:
    extra = {"launch": launch.model_dump_json(exclude_none=True)} if launch is not None else {}
    task = component(step_id=step.id, variant=item if item is not None else "", **common, **args, **extra)
    # A TrainJob's pods get the GPUs; the task that submits and follows it needs none.
    _configure(task, step.id, step.stage if launch is None else None, settings)
    return _Placed(task, item is not None)


def build_pipeline(
    family: str,
    *,
    preset: str = "tiny",
    registry: str | None = None,
    tag: str | None = None,
    kubernetes: KubernetesSettings | None = None,
    trainjobs: dict | None = None,
    loop_parallelism: int | None = None,
):
    """The KFP pipeline of `family`: a packaged family (the components load the same recipe in their image), or a
    recipe YAML path that the components can read (a local run). `preset` is the parameter's default.
    `trainjobs` maps step ids of training stages to a LaunchConfig: those steps run as TrainJobs (multi-node).
    `loop_parallelism` caps the concurrent runs of a parallel step (None: all at once, as a cluster schedules)."""
    from kfp import dsl

    recipe: Recipe = load_recipe(family, preset)  # the steps and their wiring (the same in every preset)
    family_name = recipe.family
    settings = kubernetes or KubernetesSettings()
    trainjobs = dict(trainjobs or {})
    for step_id in trainjobs:
        try:
            stage = recipe.step(step_id).stage
        except KeyError:
            raise ConfigError(
                f"trainjob {step_id!r}: no such step; steps: {', '.join(s.id for s in recipe.steps)}"
            ) from None
        if not launchable(stage):
            raise ConfigError(f"trainjob {step_id!r}: stage {stage} does not train; it runs in its task")
    components = {s.stage: stage_component(s.stage, registry, tag) for s in recipe.steps}
    open_run_op = open_run_component(registry, tag)
    close_run_op = close_run_component(registry, tag)
    step_value_op = step_value_component(registry, tag)
    description = f"llmfab {recipe.family}: {recipe.description}".strip()[:1000]

    def pipeline(
        preset: str = preset,
        overrides: list[str] = [],  # noqa: B006 (a KFP default, never mutated)
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
            )
            _configure(opened, "open-run", None, settings)
            tasks: dict = {}
            values: dict = {}  # (step, value) -> its step-value task
            common = dict(
                recipe=family,
                preset=preset,
                overrides=overrides,
                tracking_uri=tracking_uri,
                experiment=experiment,
                pipeline_run=opened.outputs["pipeline_run"],
            )
            for step in recipe.steps:
                args = _step_arguments(step, tasks, family_name)

                def place(item=None, step=step, args=args):
                    launch = trainjobs.get(step.id)
                    return _step_task(components[step.stage], step, item, args, common, settings, launch)

                if step.when:
                    key = (step.when.step, step.when.value)
                    if key not in values:
                        values[key] = _configure(
                            step_value_op(value=tasks[step.when.step].outputs[step.when.value]),
                            f"{step.when.step}-{step.when.value}",
                            None,
                            settings,
                        )
                    with dsl.If(values[key].output == step.when.equals, name=f"{step.id}-condition"):
                        tasks[step.id] = place()
                elif step.variants:
                    items = [json.dumps(item, sort_keys=True) for item in step.variants]
                    with dsl.ParallelFor(items, parallelism=loop_parallelism or 0, name=f"{step.id}-loop") as item:
                        tasks[step.id] = place(item)
                else:
                    tasks[step.id] = place()

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
