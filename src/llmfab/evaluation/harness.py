"""lm-evaluation-harness glue: the benchmarks the family reports use (MMLU, GSM8K, IFEval, ...), and the
testbed's verifiable tasks as one more lm-eval task (`llmfab_testbed`), run on a model already in memory.

Results become flat metric names: `lm_eval.<task>.<metric>` for lm-eval's "<metric>,none", and
`lm_eval.<task>.<metric>.<filter>` for another filter (gsm8k's "exact_match,strict-match" is
`lm_eval.gsm8k.exact_match.strict-match`); the standard error of metric K is always `K_stderr`.
Harness failures (an unknown task, an unreadable YAML, a missing data file) are ConfigError/LlmfabError
naming the task and its file."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.errors import ConfigError, LlmfabError

TASKS_DIR = Path(__file__).parent / "tasks"  # the task YAMLs llmfab ships
TESTBED_TASK = "llmfab_testbed"
PREFIX = "lm_eval."
STDERR = "_stderr"
_UNSAFE = re.compile(r"[^\w.\-]")  # characters MLflow metric names may not hold


class HarnessConfig(StrictModel):
    """The evaluate stage's `lm_eval` block: which lm-eval tasks to run and how."""

    tasks: list[str] = Field(
        default_factory=list, description="lm-eval task/group names, built in or from include_path (none: off)"
    )
    include_path: str | None = Field(None, description="a folder of your own task YAMLs (searched recursively)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples [default: each task's own]")
    limit: int | None = Field(None, gt=0, description="at most this many documents per task")
    batch_size: int = Field(8, gt=0)
    apply_chat_template: bool = Field(False, description="render prompts with the model's chat template")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: in process, on the stage's device; vllm: needs vLLM installed and a GPU"
    )
    log_samples: bool = Field(True, description="keep each document's prompt, answer and score as an artifact")


# -- tasks -----------------------------------------------------------------------------------------------------


def unreadable_yamls(folder: Path) -> dict[str, str]:
    """{file: error} for the task YAMLs under `folder` that do not parse (lm-eval's index skips them silently)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval's own index uses (0.4.13)

    bad = {}
    for path in sorted(folder.rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as exc:  # a YAML error, a bad include, a non-mapping: whatever lm-eval would skip
            bad[str(path)] = " ".join(str(exc).split())
    return bad


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager over `include_path` (and llmfab's task folder). lm-eval's ~15k built-in YAMLs are
    indexed (seconds) only when a task is not found in those folders. ConfigError naming `lm_eval.include_path`
    when it is not a folder, and naming each task that no folder defines (with the YAMLs that could not be read)."""
    from lm_eval.tasks import TaskManager

    folders = [TASKS_DIR]
    if include_path:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"lm_eval.include_path: {include_path} is not a folder")
        folders.append(folder)
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
    if any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=[str(f) for f in folders])
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"lm-eval's built-in tasks or include_path {include_path}" if include_path else "lm-eval's tasks"
        message = f"lm_eval.tasks: {', '.join(map(repr, unknown))}: not a task, group or tag of {where}"
        bad = unreadable_yamls(folders[-1]) if include_path else {}
        if bad:
            message += "; these task files could not be read:" + "".join(f"\n  {f}: {e}" for f, e in bad.items())
        raise ConfigError(message)
    return manager


def task_file(manager, name: str) -> str:
    """The YAML that defines task `name` ('' when it is defined in Python or generated)."""
    entry = manager.task_index.get(name)
    return str(entry.yaml_path) if entry is not None and entry.yaml_path else ""


def check_loadable(manager, specs: list[str | dict]) -> None:
    """Build every task (its YAML, its functions, its dataset) before any model work: LlmfabError naming the task
    and its file instead of a traceback from the middle of an evaluation."""
    for spec in specs:
        name = spec if isinstance(spec, str) else spec["task"]
        try:
            manager.load_task_or_group([spec])
        except Exception as exc:
            file = task_file(manager, name) if isinstance(spec, str) else str(TASKS_DIR / f"{name}.yaml")
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise LlmfabError(f"lm_eval task {name!r} ({file or 'no YAML'}): cannot be loaded: {detail}") from None


def testbed_task(data_file: str | Path, max_gen_toks: int) -> dict:
    """The shipped `llmfab_testbed` task over `data_file` (JSONL of {prompt, task, meta: JSON text}), answering
    up to `max_gen_toks` tokens: its YAML leaves the data file to the stage, which writes it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(TASKS_DIR / f"{TESTBED_TASK}.yaml", resolve_func=True)
    config["dataset_kwargs"] = {"data_files": {"test": str(data_file)}}
    config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": max_gen_toks}
    return config


def write_testbed_file(records: list[dict], path: Path) -> Path:
    """{prompt, task, meta} records as the testbed task's JSONL; meta as JSON text, since the tasks' metas have
    different fields and types that one Arrow column could not hold."""
    lines = [json.dumps({"prompt": r["prompt"], "task": r["task"], "meta": json.dumps(r["meta"])}) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the model -------------------------------------------------------------------------------------------------


def hf_model(model, tokenizer, batch_size: int):
    """lm-eval's HF backend around a model already loaded (on the stage's device)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def require_vllm() -> None:
    """ConfigError unless vLLM is installed and a GPU is there (CPU images have no vLLM)."""
    import torch

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("lm_eval.backend: vllm: vLLM is not installed in this image (use backend: hf)")
    if not torch.cuda.is_available():
        raise ConfigError("lm_eval.backend: vllm: needs a GPU, and there is none (use backend: hf)")


def vllm_model(folder: str, batch_size: int):
    """lm-eval's vLLM backend on checkpoint folder `folder` (see require_vllm)."""
    require_vllm()
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(pretrained=folder, batch_size=batch_size)


@contextlib.contextmanager
def stopping_at(model, token_ids: list[int]):
    """Greedy answers end at any of `token_ids` (a chat turn's terminators): lm-eval stops at the generation
    config's EOS, which for a base model's template need not be the turn's end."""
    config = model.generation_config
    before = config.eos_token_id
    config.eos_token_id = token_ids
    try:
        yield
    finally:
        config.eos_token_id = before


# -- running and results ---------------------------------------------------------------------------------------


def evaluate(lm, specs: list[str | dict], manager, config: HarnessConfig, seed: int = 0) -> dict:
    """lm_eval.simple_evaluate on `specs` (task names or task config dicts, checked by check_loadable); the
    harness's result dict."""
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=specs,
        task_manager=manager,
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        batch_size=config.batch_size,
        apply_chat_template=config.apply_chat_template,
        log_samples=config.log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # only a non-zero rank of a distributed run gets None
        raise LlmfabError("lm_eval: the harness returned no results")
    return out


def metric_name(task: str, key: str) -> str | None:
    """lm-eval's result key ("<metric>,<filter>", "<metric>_stderr,<filter>") of `task` as a metric name;
    None for the entries that are not metrics (alias, sample_len)."""
    metric, sep, filt = key.partition(",")
    if not sep:
        return None
    stderr = metric.endswith(STDERR)
    name = f"{PREFIX}{task}.{metric.removesuffix(STDERR)}" + ("" if filt == "none" else f".{filt}")
    return _UNSAFE.sub("_", name + (STDERR if stderr else ""))


def flatten(results: dict) -> dict[str, float]:
    """Every numeric metric and standard error of the harness's results (tasks and groups) by metric_name;
    "N/A" standard errors (a group, one document) and non-finite values are left out."""
    out = {}
    rows = {**results.get("results", {}), **results.get("groups", {})}
    for task, row in rows.items():
        for key, value in row.items():
            name = metric_name(task, key)
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if name and ok:
                out[name] = float(value)
    return out


def documents(results: dict) -> dict[str, int]:
    """{task: documents evaluated} (after `limit`)."""
    counts = results.get("n-samples", {})
    return {task: int(n.get("effective", n.get("original", 0))) for task, n in counts.items()}


def counts_by_metric(metrics: dict[str, float], results: dict) -> dict[str, int]:
    """For each flattened metric, how many documents it was measured on (a group: the sum of its members')."""
    docs = documents(results)
    groups = results.get("group_subtasks", {})

    def total(task: str) -> int:
        return docs.get(task) or sum(total(t) for t in groups.get(task, []))

    return {name: total(name[len(PREFIX) :].split(".", 1)[0]) for name in metrics}


def results_json(results: dict) -> str:
    """The harness's results without its per-document samples (those are written per task)."""
    from lm_eval.utils import handle_non_serializable

    kept = {k: v for k, v in results.items() if k != "samples"}
    return json.dumps(kept, indent=1, default=handle_non_serializable)


def samples_jsonl(samples: list[dict]) -> str:
    """One task's per-document records (prompt arguments, responses, filtered answer, metrics) as JSONL."""
    from lm_eval.utils import handle_non_serializable

    return "".join(json.dumps(s, default=handle_non_serializable) + "\n" for s in samples)
