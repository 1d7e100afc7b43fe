"""evaluate: one model measured the same way whatever the family, so pipelines compare.

Held-out perplexity (assistant tokens of a chat test split), greedy gold reward on the verifiable
tasks, reward-model score, win rate against a reference model (by RM and by gold reward) and KL to
it, needle retrieval at the model's trained context length, and the family reports' public benchmarks
(the `lm_eval` block). The gold reward and the benchmarks both run through lm-evaluation-harness: one
evaluation path for tiny and real models. Each measurement runs when its inputs are given; the report
names the ones skipped and why."""

from __future__ import annotations

import logging

from pydantic import Field

from llmfab.checkpoint_refs import loadable_folder
from llmfab.data.options import DataOptions
from llmfab.errors import DataError
from llmfab.evaluation import harness
from llmfab.evaluation.gold import task_prompts
from llmfab.evaluation.measures import (
    Measured,
    benchmarks,
    greedy_gold_reward,
    harness_files,
    heldout_perplexity,
    needle_retrieval,
    sampled_comparison,
)
from llmfab.evaluation.report import Report
from llmfab.models import load_model, load_tokenizer
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.distributed import training_device
from llmfab.train.reward_inputs import load_reward_model

log = logging.getLogger(__name__)

HELDOUT = ["heldout_loss", "heldout_ppl"]
GOLD = ["gold_reward"]
NEEDLE = ["needle_acc", "needle_nll", "needle_margin", "needle_length"]
SAMPLED = {  # metric -> the inputs it needs besides prompts
    "rm_score": ("reward_model",),
    "kl_to_reference": ("reference",),
    "win_rate_gold": ("reference",),
    "rm_score_reference": ("reward_model", "reference"),
    "win_rate_rm": ("reward_model", "reference"),
}


class EvaluateConfig(DataOptions, StageConfig):
    prompts: int = Field(64, ge=0, description="held-out task prompts answered greedily for the gold reward (0: off)")
    heldout_conversations: int = Field(256, ge=0, description="test conversations for held-out loss (0: off)")
    max_len: int | None = Field(
        None, gt=1, description="tokens per held-out row, longer conversations dropped [default: context, ≤2048]"
    )
    sample_prompts: int = Field(
        32, ge=0, description="held-out prompts sampled for RM score, win rates and KL to the reference (0: off)"
    )
    samples_per_prompt: int = Field(2, gt=0, description="sampled answers per prompt (from each model)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the gold reward is greedy)")
    max_new_tokens: int = Field(64, gt=0)
    needle_length: int | None = Field(
        None, ge=0, description="needle haystack tokens; 0/None: the model's trained context (max_position_embeddings)"
    )
    max_needle_length: int = Field(8192, ge=64, description="cap on the needle length")
    needle_samples: int = Field(8, ge=0, description="needle depths probed (0: off)")
    batch_size: int = Field(16, gt=0)
    lm_eval: harness.HarnessConfig = Field(
        default_factory=harness.HarnessConfig,
        description="public benchmarks through lm-evaluation-harness, e.g. {tasks: [gsm8k], limit: 200}",
    )


def _prompt_records(
    inputs: dict[str, str], limit: int, gold_only: bool, options: DataOptions
) -> tuple[list[dict], str]:
    """Test-split prompts of `prompts`, else the last user turns of `data`'s test conversations."""
    name, kind = ("prompts", "prompt") if "prompts" in inputs else ("data", "chat")
    return task_prompts(inputs[name], kind, "test", limit, gold_only=gold_only, options=options), f"{name} test split"


def _keep_harness(measured: Measured, folder: str, out, ctx: StageContext) -> None:
    """lm-eval's results JSON and per-document samples, under `lm_eval/<folder>/` in the report output and the
    MLflow run."""
    for name, text in harness_files(measured.harness).items():
        out.put_text(f"lm_eval/{folder}/{name}", text)
        if ctx.run is not None:
            ctx.run.log_text(text, f"lm_eval/{folder}/{name}")


def _why_not(missing_input: str, count: int, field: str) -> str:
    """Why a measurement is skipped: its missing input, else its count field set to 0 ('': it runs)."""
    return missing_input or ("" if count else f"{field}=0")


@stage(
    "evaluate",
    EvaluateConfig,
    inputs={"model": "checkpoint to evaluate (with its tokenizer)"},
    optional_inputs={
        "data": "chat dataset: held-out loss on its test split (and prompts when `prompts` is not given)",
        "prompts": "prompt dataset whose test split is answered (gold reward, RM score, win rates, KL)",
        "reward_model": "reward model scoring sampled answers",
        "reference": "model compared against: win rates and KL(model || reference) (same tokenizer)",
        "corpus": "text dataset whose held-out prose is the needle haystack",
    },
    outputs={"report": "the evaluation table (evaluation.json)"},
)
def run(config: EvaluateConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Held-out perplexity, gold reward, RM score, win rate and KL vs a reference, needle retrieval, benchmarks."""
    benchmark = config.lm_eval
    manager = None
    if benchmark.tasks:  # a wrong backend, task name, YAML or data file fails here, before any measurement
        if benchmark.backend == "vllm":
            harness.require_vllm()
        manager = harness.task_manager(benchmark.tasks, benchmark.include_path)
        harness.check_loadable(manager, list(benchmark.tasks))
    device = training_device()  # a GPU when there is one
    tokenizer = load_tokenizer(inputs["model"])
    model = load_model(inputs["model"], device=device).eval()
    context = model.config.max_position_embeddings
    report = Report()
    out = ctx.output("report")
    no_data = "" if "data" in inputs else "no `data` input"
    no_prompts = "" if "prompts" in inputs or "data" in inputs else "no `prompts` or `data` input"
    no_corpus = "" if "corpus" in inputs else "no `corpus` input (needle haystack)"

    if why := _why_not(no_data, config.heldout_conversations, "heldout_conversations"):
        report.skip(HELDOUT, why)
    else:
        try:
            heldout = heldout_perplexity(
                model,
                tokenizer,
                inputs["data"],
                max_len=config.max_len or min(context, 2048),
                conversations=config.heldout_conversations,
                batch_size=config.batch_size,
                options=config,
            )
            report.add(heldout.metrics, heldout.on, heldout.n)
        except DataError as e:
            report.skip(HELDOUT, str(e))

    if why := _why_not(no_prompts, config.prompts, "prompts"):
        report.skip(GOLD, why)
    else:
        try:
            records, on = _prompt_records(inputs, config.prompts, gold_only=True, options=config)
        except DataError as e:
            report.skip(GOLD, str(e))
        else:
            gold = greedy_gold_reward(
                model,
                tokenizer,
                records,
                on,
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
                seed=config.seed,
            )
            report.add(gold.metrics, gold.on, gold.n)
            ctx.log_table(gold.samples, "samples/gold.json")
            _keep_harness(gold, harness.TESTBED_TASK, out, ctx)

    # Sampled measurements, each needing the models named in SAMPLED (and prompts).
    wanted = [m for m, needs in SAMPLED.items() if all(k in inputs for k in needs)]
    for name, needs in SAMPLED.items():
        if name not in wanted:
            report.skip([name], " and ".join(f"no `{k}` input" for k in needs if k not in inputs))
    if wanted and (why := _why_not(no_prompts, config.sample_prompts, "sample_prompts")):
        report.skip(wanted, why)
        wanted = []
    reward_model = reference = None
    if wanted:
        if "reward_model" in inputs:
            reward_model = load_reward_model(inputs["reward_model"], tokenizer, device=device).eval()
        if "reference" in inputs:
            if load_tokenizer(inputs["reference"]).get_vocab() != tokenizer.get_vocab():
                raise DataError(f"reference {inputs['reference']} has a different tokenizer than {inputs['model']}")
            reference = load_model(inputs["reference"], device=device).eval()
        try:
            records, on = _prompt_records(inputs, config.sample_prompts, gold_only=False, options=config)
        except DataError as e:
            report.skip(wanted, str(e))
        else:
            sampled = sampled_comparison(
                model,
                tokenizer,
                records,
                on,
                reference=reference,
                reward_model=reward_model,
                n=config.samples_per_prompt,
                temperature=config.temperature,
                max_new_tokens=config.max_new_tokens,
                seed=config.seed,
                batch_size=config.batch_size,
            )
            report.add(sampled.metrics, sampled.on, sampled.n)
            report.skip([m for m in wanted if m not in sampled.metrics], f"no gold-reward tasks in the {on}")
            ctx.log_table(sampled.samples, "samples/sampled.json")
    del reward_model, reference  # free their memory before the long needle contexts

    if why := _why_not(no_corpus, config.needle_samples, "needle_samples"):
        report.skip(NEEDLE, why)
    else:
        length = min(config.needle_length or context, config.max_needle_length)
        needle = needle_retrieval(
            model, tokenizer, inputs["corpus"], length=length, samples=config.needle_samples, seed=config.seed
        )
        report.add(needle.metrics, needle.on, needle.n)

    if manager is not None:
        if benchmark.backend == "vllm":  # vLLM loads the checkpoint itself: give it the GPU memory
            model = None
            if device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
        scores = benchmarks(model, tokenizer, loadable_folder(inputs["model"]), benchmark, manager, config.seed)
        report.add(scores.metrics, scores.on, scores.n)
        _keep_harness(scores, "benchmarks", out, ctx)

    for name, why in report.skipped.items():
        log.info("evaluate: %s skipped (%s)", name, why)
    ctx.log_metrics(report.metrics)
    if report.rows:
        ctx.log_table(report.columns(), "evaluation.json")
    out.put_text("evaluation.json", report.to_json(inputs=inputs, config=config.model_dump(mode="json")))
    return {"report": out.uri}
