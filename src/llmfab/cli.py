"""The `llmfab` command line."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from llmfab.errors import LlmfabError
from llmfab.kube.launch_config import LaunchConfig

app = typer.Typer(
    name="llmfab",
    help="LLM pre- and post-training recipes (Qwen2, AFM, Gemma 2, Llama 3.1) as tracked, resumable pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Object store root: path, file://, s3://bucket/prefix [default: $LLMFAB_STORE or ./llmfab-store]",
    ),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db]"),
]
ExperimentOpt = Annotated[
    str | None, typer.Option("--experiment", help="MLflow experiment [default: $MLFLOW_EXPERIMENT_NAME or llmfab]")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config value: STEP.FIELD=VALUE or models.NAME.FIELD=VALUE (VALUE is YAML)"
    ),
]


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


class VERBOSE:  # the -v flag, for commands that print less without it
    on = False


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress details; `run`: stream every task's output.")
    ] = False,
) -> None:
    VERBOSE.on = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:  # MLflow logs its database set-up at INFO on its own handler (set when it is imported)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


RUNNERS = ("kfp-local", "inprocess")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours its messages


@app.command()
def run(
    family: Annotated[str, typer.Argument(help="qwen2, afm, gemma2, llama31, or a recipe YAML path")],
    preset: Annotated[str, typer.Option(help="Recipe preset: tiny, or a real-size one")] = "tiny",
    store: StoreOpt = None,
    tracking_uri: TrackingOpt = None,
    experiment: ExperimentOpt = None,
    run_name: Annotated[str | None, typer.Option(help="Name of the pipeline run [default: FAMILY-PRESET-TIME]")] = None,
    runner: Annotated[
        str,
        typer.Option(
            help="kfp-local: the family's Kubeflow pipeline under kfp.local (a subprocess per step); "
            "inprocess: the recipe's steps in this process"
        ),
    ] = "kfp-local",
    only: Annotated[
        list[str] | None, typer.Option(help="Run only these steps (and what they need); --runner inprocess")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Run a family's pipeline end to end, tracked in MLflow (a nested run per step), checkpoints in the store."""
    from llmfab.runs import InProcess, KfpLocal, plan_run
    from llmfab.runs.console import RunConsole

    out = RunConsole()
    try:
        if runner not in RUNNERS:
            raise LlmfabError(f"--runner {runner!r}: expected one of {', '.join(RUNNERS)}")
        if only and runner != "inprocess":
            raise LlmfabError("--only needs --runner inprocess (a Kubeflow pipeline runs all its steps)")
        plan = plan_run(family, preset, set_, store_uri=store, tracking_uri=tracking_uri, experiment=experiment,
                        run_name=run_name)  # fmt: skip
        executor = KfpLocal(verbose=VERBOSE.on) if runner == "kfp-local" else InProcess(only=only)
        out.start(plan, executor.name)
        callbacks = out.callbacks() if runner == "kfp-local" else {"on_step": out.on_step}
        result = executor.run(plan, **callbacks)
    except LlmfabError as exc:
        out.stop()
        _fail(exc)
    except RuntimeError as exc:  # kfp.local: a task failed (its log's tail is above)
        out.stop()
        _fail(LlmfabError(f"pipeline failed: {ANSI.sub('', str(exc))}"))
    out.summary(plan, result)


def _config_data(config: Path | None, set_: list[str] | None) -> dict:
    """A stage config from its YAML file (if any) with the --set overrides applied."""
    from llmfab.config.base import apply_overrides

    data = {}
    if config is not None:
        if not config.is_file():
            raise LlmfabError(f"{config}: no such config file")
        try:
            data = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as exc:
            raise LlmfabError(f"{config}: invalid YAML: {exc}") from None
    return apply_overrides(data, set_ or [])


def _inputs(items: list[str] | None) -> dict[str, str | list[str]]:
    inputs: dict[str, str | list[str]] = {}
    for item in items or []:
        key, sep, uri = item.partition("=")
        if not sep or not key or not uri:
            raise LlmfabError(f"--input {item!r}: expected NAME=URI")
        # Repeating a name gives a list (e.g. --input models=A --input models=B for `average`).
        inputs[key] = [*([inputs[key]] if isinstance(inputs[key], str) else inputs[key]), uri] if key in inputs else uri
    return inputs


def _pairs(items: list[str] | None, option: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LlmfabError(f"{option} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="Stage name (see `llmfab stages`)")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Stage config YAML")] = None,
    input_: Annotated[list[str] | None, typer.Option("--input", "-i", help="Input as NAME=URI")] = None,
    output: Annotated[str | None, typer.Option(help="Where outputs go [default: STORE/stages/NAME-TIME]")] = None,
    store: StoreOpt = None,
    tracking_uri: TrackingOpt = None,
    experiment: ExperimentOpt = None,
    set_: SetOpt = None,
    write_result: Annotated[
        bool,
        typer.Option(
            "--write-result", help="Also write the printed JSON to OUTPUT/stage-result.json (for `llmfab launch`)"
        ),
    ] = False,
) -> None:
    """Run one stage with a config file; prints its outputs as JSON.

    Under torchrun (WORLD_SIZE > 1) every rank runs it: rank 0 tracks in MLflow, prints and writes the result."""
    from llmfab.stages.runner import default_output_store, run_stage
    from llmfab.storage import open_store
    from llmfab.tracking import Tracker

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        data = _config_data(config, set_)
        inputs = _inputs(input_)
        from llmfab.stages import get_stage

        spec = get_stage(name)
        cfg = spec.make_config(data, str(config) if config else "config")
        if world > 1 and not output:
            raise LlmfabError(f"WORLD_SIZE={world}: give --output, so that every rank writes to the same place")
        if write_result and not output:
            raise LlmfabError("--write-result needs --output")
        out_store = open_store(output) if output else default_output_store(name, open_store(store))
        # Under torchrun only rank 0 tracks (the others never open the MLflow store).
        tracker = Tracker(tracking_uri, experiment) if rank == 0 else None
        result = run_stage(name, cfg, inputs, store=out_store, tracker=tracker, track=rank == 0)
        payload = json.dumps({"outputs": result.outputs, "metrics": result.metrics, "run_id": result.run_id}, indent=2)
        if write_result and rank == 0:
            from llmfab.kube.trainjob import RESULT_FILE

            out_store.put_text(RESULT_FILE, payload)
    except LlmfabError as exc:
        _fail(exc)
    if rank == 0:
        typer.echo(payload)


def _model_options(model, *, into: str, before: str, flags: dict[str, str], skip: set[str]):
    """Decorator: the command also takes an option per field of the pydantic `model` (but `skip`), placed before
    its parameter `before`; its parameter `into` gets a function that returns the options given, {field: value}.

    An option is `--FIELD-NAME` (or `flags[FIELD]`) with the field's description as help and the field's default.
    A field that may be None defaults to None, "not given", so that the model's own default applies (which the
    description states); a dict[str, str] field is a repeatable KEY=VALUE option; a Literal is text the model
    checks."""
    import functools
    import inspect
    import typing

    unknown = (set(flags) | skip) - set(model.model_fields)
    if unknown:
        raise TypeError(f"{model.__name__} has no field(s) {', '.join(sorted(unknown))}")
    is_dict = {field: typing.get_origin(info.annotation) is dict for field, info in model.model_fields.items()}

    def parameter(name: str, field: str, flag: str) -> inspect.Parameter:
        info = model.model_fields[field]
        annotation = info.annotation
        default = inspect.Parameter.empty if info.is_required() else info.get_default(call_default_factory=True)
        if is_dict[field]:
            annotation, default = list[str] | None, None
        elif typing.get_origin(annotation) is typing.Literal:
            annotation = str
        elif type(None) in typing.get_args(annotation):
            default = None
        if annotation is bool:
            flag = f"{flag}/--no-{flag.removeprefix('--')}"
        option = Annotated[annotation, typer.Option(flag, help=info.description)]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=option)

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        # Keyword-only, as typer passes them: the options can go between parameters with and without defaults.
        own = [p.replace(kind=p.KEYWORD_ONLY) for p in signature.parameters.values() if p.name != into]
        fields = {}  # parameter name -> (field, flag)
        for field in model.model_fields:
            if field not in skip:
                name = f"{field}_" if field in signature.parameters else field  # launch's --name vs its stage name
                fields[name] = (field, flags.get(field, "--" + field.replace("_", "-")))
        options = [parameter(name, field, flag) for name, (field, flag) in fields.items()]

        @functools.wraps(command)
        def with_options(**kwargs):
            given = {field: (flag, kwargs.pop(name)) for name, (field, flag) in fields.items()}

            def values() -> dict:
                # Called by the command, so that a bad KEY=VALUE is reported where its other errors are.
                return {
                    field: _pairs(value, flag) if is_dict[field] else value
                    for field, (flag, value) in given.items()
                    if value is not None
                }

            return command(**kwargs, **{into: values})

        at = [p.name for p in own].index(before)
        with_options.__signature__ = signature.replace(parameters=[*own[:at], *options, *own[at:]])
        return with_options

    return decorate


PlanCheckOpt = Annotated[
    bool,
    typer.Option(
        "--plan-check/--no-plan-check", help="Check first that every training step fits its GPUs (`llmfab plan`)"
    ),
]


# LaunchConfig's fields are launch's options: a new field is a new option. Some are spelled shorter here; the
# Secrets' names and the GPU resource name are the cluster's, left to Python and pipelines.
@app.command()
@_model_options(
    LaunchConfig,
    into="launch_options",
    before="dry_run",
    flags={
        "num_nodes": "--nodes",
        "gpus_per_node": "--gpus",
        "labels": "--label",
        "timeout_s": "--timeout",
        "poll_s": "--poll",
    },
    skip={"gpu_resource", "s3_secret", "mlflow_secret"},
)
def launch(
    name: Annotated[str, typer.Argument(help="Training stage name (see `llmfab stages`)")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Stage config YAML")] = None,
    input_: Annotated[list[str] | None, typer.Option("--input", "-i", help="Input as NAME=s3://URI")] = None,
    output: Annotated[
        str | None, typer.Option(help="Where outputs go, s3:// [default: STORE/stages/TRAINJOB-NAME]")
    ] = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the TrainJob YAML; submit nothing")] = False,
    gpu_memory: Annotated[float, typer.Option("--gpu-memory", min=1, help="Memory of one GPU, GB (plan check)")] = 80.0,
    plan_check: PlanCheckOpt = True,
    launch_options: Callable[[], dict] = dict,
) -> None:
    """Run a training stage on Kubernetes as a Kubeflow Trainer TrainJob and wait for it to finish.

    Prints each status change, then the stage's outputs as JSON (as `llmfab stage` does)."""
    from llmfab.config.base import validate
    from llmfab.kube.manifest import render_trainjob, trainjob_name
    from llmfab.kube.trainjob import default_output, launch_stage

    try:
        data = _config_data(config, set_)
        inputs = _inputs(input_)
        settings = validate(LaunchConfig, launch_options(), "llmfab launch")
        settings = settings.model_copy(update={"name": settings.name or trainjob_name(name)})
        if plan_check and not dry_run:
            from llmfab.memory_plan import check_stage_fits

            check_stage_fits(name, data, inputs, settings.num_nodes * (settings.gpus_per_node or 1), gpu_memory)
        if dry_run:
            obj = render_trainjob(name, data, inputs, output or default_output(settings.name, store), settings)
            typer.echo(yaml.safe_dump(obj, sort_keys=False), nl=False)
            return
        result = launch_stage(
            name,
            data,
            inputs,
            output=output,
            store=store,
            launch=settings,
            on_status=lambda change: console.print(
                f"TrainJob {settings.name}: {change.text}", markup=False, highlight=False, soft_wrap=True
            ),
        )
    except LlmfabError as exc:
        _fail(exc)
    console.print(f"TrainJob {result.namespace}/{result.name} complete in {result.seconds:.0f} s", markup=False)
    typer.echo(json.dumps({"outputs": result.outputs, "metrics": result.metrics, "run_id": result.run_id}, indent=2))


def _rule(text: str) -> dict:
    """METRIC[:MARGIN[:higher|lower[:K]]] -> a gate rule (K: the gain must also exceed K standard errors)."""
    metric, _, rest = text.partition(":")
    margin, _, rest = rest.partition(":")
    direction, _, k = rest.partition(":")
    if not metric or direction not in ("", "higher", "lower"):
        raise LlmfabError(
            f"--rule {text!r}: expected METRIC[:MARGIN[:higher|lower[:K]]], e.g. gold_reward:0.01 or "
            "lm_eval.gsm8k.exact_match.strict-match:0.01:higher:2"
        )
    rule: dict = {"metric": metric, "higher_is_better": direction != "lower"}
    for field, value in (("margin", margin or "0"), ("stderr_k", k)):
        try:
            if value:
                rule[field] = float(value)
        except ValueError:
            raise LlmfabError(f"--rule {text!r}: {field} {value!r} is not a number") from None
    return rule


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name, e.g. llmfab-qwen2")],
    version: Annotated[
        str | None, typer.Option(help="Version to promote (default: the holder of --from-alias)")
    ] = None,
    from_alias: Annotated[
        str | None, typer.Option(help="Promote the version holding this alias (default: candidate)")
    ] = None,
    alias: Annotated[str, typer.Option(help="Alias to move onto the version")] = "champion",
    gate: Annotated[
        bool,
        typer.Option(
            "--gate/--force", help="--gate: only if it beats the alias's holder on the rules; --force: unconditionally"
        ),
    ] = True,
    rule: Annotated[
        list[str] | None,
        typer.Option(
            help="Gate rule METRIC:MARGIN, METRIC:MARGIN:lower when lower is better, METRIC:MARGIN:higher:K when "
            "the gain must also exceed K standard errors (METRIC_stderr); repeatable "
            "(default: the rules the version was registered with)"
        ),
    ] = None,
    reason: Annotated[str, typer.Option(help="Why, recorded on the version")] = "",
    tracking_uri: TrackingOpt = None,
) -> None:
    """Promote a registered model version to an alias (champion) by hand; prints the decision as JSON.

    Exit code 0: promoted (or already there); 1: refused by the gate; 2: no such model, version or alias."""
    from rich.markup import escape

    from llmfab.registry import registry_client
    from llmfab.registry.promotion import get_version, parse_rules, rules_from_tag, whoami
    from llmfab.registry.promotion import promote as promote_version
    from llmfab.stages.register import check_alias

    try:
        if version is not None and from_alias is not None:
            raise LlmfabError("give --version or --from-alias, not both")
        for value in (alias, from_alias):
            if value is not None:
                try:
                    check_alias(value)
                except ValueError as exc:
                    raise LlmfabError(f"alias {exc}") from None
        client = registry_client(tracking_uri)
        mv = get_version(client, name, version, None if version is not None else (from_alias or "candidate"))
        rules = parse_rules([_rule(r) for r in rule]) if rule else rules_from_tag(mv)
        result = promote_version(
            client,
            name,
            mv.version,
            alias=alias,
            rules=rules,
            gate=gate,
            by=f"{whoami()} (llmfab promote)",
            reason=reason,
        )
    except LlmfabError as exc:
        _fail(exc)
    typer.echo(json.dumps(result.to_dict(), indent=2))
    if result.status == "refused":
        console.print(
            f"[bold red]refused:[/] {escape(name)} v{result.version} stays off {alias!r}: "
            + escape("; ".join(result.reasons)),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    verb = "is already" if result.status == "unchanged" else "is now"
    previous = f" (was v{result.previous})" if result.status == "promoted" and result.previous else ""
    console.print(f"{name} v{result.version} {verb} {alias!r}{previous}", markup=False, highlight=False)


@app.command()
def stages() -> None:
    """List the stages with their inputs and outputs."""
    from llmfab.stages import all_stages

    table = Table(title="stages")
    for col in ("stage", "inputs", "outputs", "what it does"):
        table.add_column(col)
    for name, spec in all_stages().items():
        table.add_row(name, ", ".join(spec.inputs) or "-", ", ".join(spec.outputs), spec.doc)
    Console().print(table)


@app.command()
def images(
    registry: Annotated[
        str | None, typer.Option(help="Registry/namespace [default: $LLMFAB_IMAGE_REGISTRY or ghcr.io/llmfab]")
    ] = None,
    tag: Annotated[
        str | None, typer.Option(help="Image tag [default: $LLMFAB_IMAGE_TAG or the llmfab version]")
    ] = None,
    plain: Annotated[
        bool, typer.Option("--plain", help="Print 'TARGET IMAGE' lines, groups first (for scripts)")
    ] = False,
) -> None:
    """List the images of images/Dockerfile: each group base and each stage's own image."""
    from llmfab.images import GROUPS, all_images, stage_group

    try:
        names = all_images(registry, tag)
    except LlmfabError as exc:
        _fail(exc)
    if plain:
        typer.echo("\n".join(f"{target} {image}" for target, image in names.items()))
        return
    table = Table(title="images (docker build -f images/Dockerfile --target TARGET -t IMAGE .)")
    for col in ("target", "from", "gpu"):
        table.add_column(col)
    table.add_column("image", overflow="fold")  # whole names, wrapped on a narrow terminal
    for target, image in names.items():
        group = GROUPS[target] if target in GROUPS else stage_group(target)
        base = group.base if target in GROUPS else group.name
        table.add_row(target, base, "yes" if group.gpu else "no", image)
    Console().print(table)


@app.command()
def recipes() -> None:
    """List the family recipes and their presets."""
    from llmfab.config.recipe import RecipeFile, list_families, recipe_path

    table = Table(title="recipes")
    for col in ("family", "presets", "steps"):
        table.add_column(col)
    for family in list_families():
        raw = RecipeFile.model_validate(yaml.safe_load(recipe_path(family).read_text()))
        table.add_row(family, ", ".join(raw.presets), raw.outline())
    Console().print(table)


@app.command("compile")
def compile_(
    family: Annotated[str, typer.Argument(help="qwen2, afm, gemma2, llama31, all, or a recipe YAML path")],
    preset: Annotated[str, typer.Option(help="Recipe preset")] = "tiny",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout")] = None,
    set_: SetOpt = None,
) -> None:
    """Resolve and validate a recipe preset into its full execution plan (YAML)."""
    from llmfab.config.recipe import list_families, load_recipe

    families = list_families() if family == "all" else [family]
    try:
        plans = [load_recipe(f, preset, set_ or []).plan() for f in families]
    except LlmfabError as exc:
        _fail(exc)
    text = yaml.safe_dump_all(plans, sort_keys=False)
    if output:
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        typer.echo(text)


RegistryOpt = Annotated[
    str | None, typer.Option(help="Image registry [default: $LLMFAB_IMAGE_REGISTRY or ghcr.io/llmfab]")
]
TagOpt = Annotated[str | None, typer.Option(help="Image tag [default: $LLMFAB_IMAGE_TAG or the llmfab version]")]


@app.command("compile-pipelines")
def compile_pipelines(
    root: Annotated[
        Path, typer.Option(help="Repository root: writes ROOT/pipelines/FAMILY.yaml, ROOT/components/STAGE/")
    ] = Path("."),
    registry: RegistryOpt = None,
    tag: TagOpt = None,
) -> None:
    """Compile every family's Kubeflow pipeline and every stage's component to KFP YAML (IR)."""
    from llmfab.kubeflow.pipelines import compile_all

    try:
        written = compile_all(root, registry, tag)
    except LlmfabError as exc:
        _fail(exc)
    console.print(f"wrote {len(written)} files below {root}", highlight=False)


def _trainjobs(steps: list[str] | None, nodes: int, gpus: int | None, cpu: str | None, memory: str | None):
    """{step id: LaunchConfig} of `--trainjob STEP` options (one shape for all of them)."""
    if not steps:
        return None
    from llmfab.kube.trainjob import LaunchConfig

    launch = LaunchConfig(num_nodes=nodes, gpus_per_node=gpus, cpu=cpu, memory=memory)
    return dict.fromkeys(steps, launch)


@app.command()
def submit(
    family: Annotated[str, typer.Argument(help="qwen2, afm, gemma2 or llama31")],
    host: Annotated[str, typer.Option(help="KFP API server, e.g. http://localhost:8080")],
    preset: Annotated[str, typer.Option(help="Recipe preset")] = "tiny",
    store: Annotated[
        str | None, typer.Option(help="Object store root, s3:// [default: the pods' $LLMFAB_STORE]")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow URI [default: ConfigMap llmfab-env's]")
    ] = None,
    experiment: Annotated[
        str | None, typer.Option("--experiment", help="MLflow experiment [default: ConfigMap llmfab-env's]")
    ] = None,
    run_name: Annotated[str | None, typer.Option(help="KFP (and MLflow) run name [default: FAMILY-PRESET]")] = None,
    kfp_experiment: Annotated[str, typer.Option(help="KFP experiment")] = "llmfab",
    namespace: Annotated[str | None, typer.Option(help="KFP namespace (multi-user installs)")] = None,
    schedule: Annotated[
        str | None, typer.Option(help="Cron line: create a recurring run instead, e.g. '0 3 * * 0'")
    ] = None,
    max_concurrency: Annotated[int, typer.Option(help="Recurring runs at once")] = 1,
    registry: RegistryOpt = None,
    tag: TagOpt = None,
    set_: SetOpt = None,
    trainjob: Annotated[
        list[str] | None,
        typer.Option(help="Run this training step as a Kubeflow TrainJob (multi-node); repeatable"),
    ] = None,
    nodes: Annotated[int, typer.Option(help="TrainJob steps: nodes")] = 1,
    gpus: Annotated[int | None, typer.Option(help="TrainJob steps: GPUs per node")] = None,
    cpu: Annotated[str | None, typer.Option(help="TrainJob steps: CPU per node, e.g. 16")] = None,
    memory: Annotated[str | None, typer.Option(help="TrainJob steps: memory per node, e.g. 64Gi")] = None,
    gpu_memory: Annotated[float, typer.Option("--gpu-memory", min=1, help="Memory of one GPU, GB (plan check)")] = 80.0,
    plan_check: PlanCheckOpt = True,
) -> None:
    """Upload a family's pipeline to a Kubeflow Pipelines server and start it (or schedule it).

    First `llmfab plan`'s check: every training step must fit its GPUs (a TrainJob step: --nodes x --gpus, else the
    one GPU a pipeline task gets) of --gpu-memory GB; --no-plan-check skips it."""
    from llmfab.runs import KfpServer, plan_run

    try:
        plan = plan_run(family, preset, set_, store_uri=store, tracking_uri=tracking_uri, experiment=experiment,
                        run_name=run_name)  # fmt: skip
        if plan_check:
            from llmfab.memory_plan import check_recipe_fits

            check_recipe_fits(
                plan.recipe, lambda step: nodes * (gpus or 1) if step in set(trainjob or ()) else 1, gpu_memory
            )
        server = KfpServer(host, namespace=namespace, kfp_experiment=kfp_experiment, registry=registry, tag=tag,
                           trainjobs=_trainjobs(trainjob, nodes, gpus, cpu, memory))  # fmt: skip
        if schedule:
            job = server.schedule(plan, schedule, max_concurrency)
            done = {"kind": "recurring_run", "id": job.id, "experiment_id": job.experiment_id, "name": job.name}
        else:
            result = server.run(plan)
            done = {"kind": "run", "id": result.kfp_run_id, "experiment_id": result.kfp_experiment_id,
                    "name": result.run_name}  # fmt: skip
    except LlmfabError as exc:
        _fail(exc)
    typer.echo(json.dumps(done))


@app.command()
def retrain(
    family: Annotated[str, typer.Argument(help="qwen2, afm, gemma2, llama31 or a recipe YAML")],
    preset: Annotated[str, typer.Option(help="Recipe preset")] = "tiny",
    host: Annotated[
        str | None, typer.Option(help="KFP API server to submit to [default: run locally through kfp.local]")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain whatever the registry says")] = False,
    max_age_days: Annotated[
        float | None, typer.Option(help="Retrain when the champion is older than this (a schedule)")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="KFP: wait for the run's end, then report")] = True,
    timeout: Annotated[float, typer.Option(help="KFP: seconds to wait")] = 24 * 3600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only decide; run nothing")] = False,
    store: StoreOpt = None,
    tracking_uri: TrackingOpt = None,
    experiment: ExperimentOpt = None,
    run_name: Annotated[str | None, typer.Option(help="Pipeline run name")] = None,
    namespace: Annotated[str | None, typer.Option(help="KFP namespace (multi-user installs)")] = None,
    registry: RegistryOpt = None,
    tag: TagOpt = None,
    set_: SetOpt = None,
) -> None:
    """Retrain when needed (forced, no champion, new data version, champion too old): run the family's pipeline
    on KFP or locally; prints the decision and, after the run, the registry's candidate and champion as JSON.

    Exit code 0: nothing to do, or the run ended (promoted or not); 2: bad input or the run failed."""
    from llmfab.retrain import retrain as run_retrain

    try:
        outcome = run_retrain(
            family, preset, overrides=set_ or [], host=host, force=force, max_age_days=max_age_days, wait=wait,
            timeout_s=timeout, dry_run=dry_run, store=store, tracking_uri=tracking_uri, experiment=experiment,
            run_name=run_name, namespace=namespace, registry=registry, tag=tag,
        )  # fmt: skip
    except LlmfabError as exc:
        _fail(exc)
    decision = outcome.decision
    console.print(
        f"{decision.model_name}: {'retrain' if decision.retrain else 'no retraining'}: {decision.reason}",
        highlight=False,
    )
    typer.echo(json.dumps(outcome.to_dict(), indent=2))


if __name__ == "__main__":
    app()


def _plan_table(plans, title: str) -> None:
    from llmfab.memory_plan import HEADERS, rows

    table = Table(title=title)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows(plans):
        table.add_row(*row)
    Console(width=200).print(table)


@app.command()
def plan(
    family: Annotated[str, typer.Argument(help="qwen2, afm, gemma2, llama31 or a recipe YAML path")],
    preset: Annotated[str, typer.Option(help="Recipe preset")] = "tiny",
    gpus: Annotated[int, typer.Option(min=1, help="GPUs a training step runs on")] = 1,
    gpu_memory: Annotated[float, typer.Option("--gpu-memory", min=1, help="Memory of one GPU, GB")] = 80.0,
    set_: SetOpt = None,
) -> None:
    """GPU memory per training step (weights, gradients, optimizer states, activations, frozen models) in the
    sharding each step configures (DDP, or its train.deepspeed ZeRO stage and offloads); exit 1 naming the steps
    that do not fit, each with the cheapest setting that would."""
    from llmfab.config.recipe import load_recipe
    from llmfab.memory_plan import fit_failure, plan_recipe

    try:
        recipe = load_recipe(family, preset, set_ or [])
    except LlmfabError as exc:
        _fail(exc)
    plans = plan_recipe(recipe, gpus, gpu_memory)
    _plan_table(plans, f"{recipe.family} {preset}: GB per GPU on {gpus} x {gpu_memory:g} GB")
    failure = fit_failure(plans, gpus, gpu_memory)
    if failure:
        console.print(f"[bold red]error:[/] {failure}", highlight=False)
        raise typer.Exit(1)
