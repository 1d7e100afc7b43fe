"""One lightweight KFP component per registered stage, made from its @stage declaration.

The component of stage `sft` is a Python function `sft(recipe, preset, overrides, step_id, variant, tracking_uri,
experiment, pipeline_run: Input[Artifact], in_model: Input[Model], in_data: Input[Dataset], model: Output[Model],
metrics: Output[Metrics], in_teacher: Input[Model] = None, ...) -> NamedTuple(model_uri: str)` whose body calls
`llmfab.kubeflow.runtime.run_component`; its `base_image` is the stage's own image (llmfab.images), so the same
definition runs under kfp.local's SubprocessRunner and in a pod. The function's source is generated here from
the stage registry (KFP serialises a lightweight component as source text, so it is registered with linecache
for `inspect.getsource`); the compiled component specs are committed as components/STAGE/component.yaml.

Inputs that take several checkpoints (LIST_INPUTS) are `List[str]` parameters of store URIs, fed from the
producers' `NAME_uri` output parameters: KFP has no static list of artifacts.
"""

from __future__ import annotations

import keyword
import linecache
from functools import cache

from llmfab.errors import ConfigError
from llmfab.images import image_for
from llmfab.stages.base import LIST_INPUTS, StageSpec, get_stage

# Inputs and outputs that are checkpoints (KFP type Model); every other one is a dataset (KFP type Dataset).
MODEL_NAMES = frozenset(
    {"model", "init", "teacher", "reward_model", "reference", "base", "float_model", "tokenizer", "models", "committee"}
)
# The parameters every stage component takes, in order (step config comes from the recipe preset by step id).
COMMON_PARAMS = (
    ("recipe", "str"),
    ("preset", "str"),
    ("overrides", "List[str]"),
    ("step_id", "str"),
    ("variant", "str"),  # a parallel step's item as JSON ("" for a plain step)
    ("tracking_uri", "str"),
    ("experiment", "str"),
    # open-run's artifact: the parent MLflow run and the run's store prefix, in its metadata. An artifact, not two
    # parameters: kfp.local replaces every task-output parameter of a ParallelFor group with the loop item.
    ("pipeline_run", "Input[Artifact]"),
)
METRICS_OUTPUT = "metrics"
INPUT_PREFIX = "in_"


def artifact_type(name: str) -> str:
    return "Model" if name in MODEL_NAMES else "Dataset"


def input_param(name: str) -> str:
    """The component parameter of stage input `name` (prefixed: `sft` has an input and an output `model`)."""
    return f"{INPUT_PREFIX}{name}"


def uri_output(name: str) -> str:
    """The output parameter holding output `name`'s store URI (what list inputs are fed from)."""
    return f"{name}_uri"


def launchable(stage: str) -> bool:
    """Whether `stage` runs the Trainer, so that its component can hand it to a (multi-node) TrainJob."""
    from llmfab.images import stage_group
    from llmfab.kube.trainjob import TRAINER_IMAGE_GROUP

    return stage_group(stage).name == TRAINER_IMAGE_GROUP


def is_list_input(stage: str, name: str) -> bool:
    return (stage, name) in LIST_INPUTS


def component_source(spec: StageSpec) -> str:
    """The Python source of stage `spec`'s component function."""
    names = [*spec.inputs, *spec.optional_inputs, *spec.outputs, *spec.values, METRICS_OUTPUT]
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ConfigError(f"stage {spec.name}: {name!r} cannot be a component parameter")
    required = [f"{n}: {t}" for n, t in COMMON_PARAMS]
    optional = []
    for name in spec.inputs:
        required.append(
            f"{input_param(name)}: List[str]"
            if is_list_input(spec.name, name)
            else f"{input_param(name)}: Input[{artifact_type(name)}]"
        )
    required += [f"{name}: Output[{artifact_type(name)}]" for name in spec.outputs]
    required.append(f"{METRICS_OUTPUT}: Output[Metrics]")
    if launchable(spec.name):
        optional.append('launch: str = ""')  # a TrainJob's LaunchConfig as JSON: run there instead of here
    for name in spec.optional_inputs:
        optional.append(
            f"{input_param(name)}: List[str] = []"
            if is_list_input(spec.name, name)
            else f"{input_param(name)}: Input[{artifact_type(name)}] = None"
        )
    all_inputs = [*spec.inputs, *spec.optional_inputs]
    artifacts = ", ".join(f'"{n}": {input_param(n)}' for n in all_inputs if not is_list_input(spec.name, n))
    lists = ", ".join(f'"{n}": {input_param(n)}' for n in all_inputs if is_list_input(spec.name, n))
    outputs = ", ".join(f'"{n}": {n}' for n in spec.outputs)
    returns = ", ".join([*(f'("{uri_output(n)}", str)' for n in spec.outputs), *(f'("{n}", str)' for n in spec.values)])
    params = "".join(f"    {p},\n" for p in (*required, *optional))
    doc = (spec.doc or spec.name).replace('"""', "'''").replace("\\", "\\\\")
    return (
        f"def {spec.name}(\n{params}"
        f') -> NamedTuple("Outputs", [{returns}]):\n'
        f'    """llmfab stage {spec.name}: {doc}"""\n'
        "    from llmfab.kubeflow.runtime import run_component\n\n"
        "    return run_component(\n"
        f'        "{spec.name}",\n'
        "        recipe=recipe,\n"
        "        preset=preset,\n"
        "        overrides=overrides,\n"
        "        step_id=step_id,\n"
        "        variant=variant,\n"
        "        tracking_uri=tracking_uri,\n"
        "        experiment=experiment,\n"
        "        pipeline_run=pipeline_run,\n"
        f"        inputs={{{artifacts}}},\n"
        f"        list_inputs={{{lists}}},\n"
        f"        outputs={{{outputs}}},\n"
        f"        metrics={METRICS_OUTPUT},\n"
        + ("        launch=launch,\n" if launchable(spec.name) else "")
        + "    )\n"
    )


def _define(name: str, source: str):
    """Exec `source` (defining function `name`) so that inspect.getsource finds it, as KFP needs."""
    filename = f"<llmfab.kubeflow component {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {}
    exec(
        compile("from kfp.dsl import *\nfrom typing import *\n", filename, "exec", dont_inherit=True), namespace
    )  # what KFP's executor prepends as well
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # no `annotations` future
    return namespace[name]


def stage_component(stage: str, registry: str | None = None, tag: str | None = None):
    """The KFP component of `stage`, running in image_for(stage, registry, tag)."""
    return _stage_component(stage, image_for(stage, registry, tag))  # cached per image: $LLMFAB_IMAGE_* may change


@cache
def _stage_component(stage: str, image: str):
    spec = get_stage(stage)
    return _pipeline_component(spec.name, component_source(spec), image)


@cache
def _pipeline_component(name: str, source: str, image: str):
    """A lightweight component of function `name` in `source`, running in `image`."""
    from kfp import dsl

    # Nothing installed at run time: the stage image has llmfab with its kfp extra (no pip, no network in the pod).
    return dsl.component(_define(name, source), base_image=image, packages_to_install=[], install_kfp_package=False)


OPEN_RUN_SOURCE = '''def open_run(
    recipe: str,
    preset: str,
    overrides: List[str],
    store: str,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    parent_run_id: str,
    kfp_run_id: str,
    rounds: str,
    pipeline_run: Output[Artifact],
):
    """Open the pipeline's parent MLflow run (or adopt the given one); work out the run's store location."""
    from llmfab.kubeflow.runtime import open_run as _open_run, write_run_context

    run_id, store_uri = _open_run(
        recipe, preset, overrides, store, tracking_uri, experiment, run_name, parent_run_id, kfp_run_id, rounds
    )
    write_run_context(pipeline_run, run_id, store_uri)
'''
OPEN_RUN_STAGE = "prepare_data"  # the pipeline's own tasks are tracking and storage only: a CPU-group image


def open_run_component(registry: str | None = None, tag: str | None = None):
    return _pipeline_component("open_run", OPEN_RUN_SOURCE, image_for(OPEN_RUN_STAGE, registry, tag))


CLOSE_RUN_SOURCE = '''def close_run(
    kfp_run_id: str,
    adopted_run_id: str,
    tracking_uri: str,
    experiment: str,
    status: PipelineTaskFinalStatus,
):
    """Exit task: end the pipeline's parent MLflow run with the pipeline's status; steps' metrics onto it."""
    from llmfab.kubeflow.runtime import close_run as _close_run

    _close_run(kfp_run_id, adopted_run_id, tracking_uri, experiment, status.state)
'''


def close_run_component(registry: str | None = None, tag: str | None = None):
    return _pipeline_component("close_run", CLOSE_RUN_SOURCE, image_for(OPEN_RUN_STAGE, registry, tag))


STEP_VALUE_SOURCE = '''def step_value(value: str) -> str:
    """A stage's value (e.g. register's decision) as this task's single output, which a dsl.If tests."""
    return value
'''


def step_value_component(registry: str | None = None, tag: str | None = None):
    """A pass-through task before each condition: kfp.local's condition evaluator resolves only single-output
    (`Output`) task channels, not a named output of a multi-output component (a cluster resolves both)."""
    return _pipeline_component("step_value", STEP_VALUE_SOURCE, image_for(OPEN_RUN_STAGE, registry, tag))
