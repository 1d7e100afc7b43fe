"""rejection_sampling: sample K answers per prompt from one or more models, keep the reward
model's favourite per prompt, fine-tune the policy on the kept answers. One sampler is Llama
3.1's rejection sampling; a committee of several (the latest SFT / RS / DPO / RL models plus the
best earlier ones) is AFM's iterative teaching committee (iTeC)."""

from __future__ import annotations

import random
from collections import Counter

from pydantic import Field

from llmfab.config.recipe import as_refs
from llmfab.data.io import read_dataset, write_dataset
from llmfab.data.options import DataOptions
from llmfab.data.schemas import as_messages
from llmfab.errors import DataError
from llmfab.evaluation.gold import score_gold
from llmfab.generation import SamplingConfig
from llmfab.models import load_tokenizer
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.distributed import training_device
from llmfab.train.pairs import reward_scores
from llmfab.train.reward_inputs import load_reward_model, scoring_tokenizer
from llmfab.train.sft import FineTuneConfig, fine_tune


# What the sft stage takes (its SFTConfig; stages do not import each other): the settings and a seed of their own.
class KeptAnswersSFTConfig(FineTuneConfig, StageConfig):
    pass


class RejectionSamplingConfig(StageConfig, SamplingConfig, DataOptions):
    min_score: float | None = Field(None, description="drop prompts whose best answer scores below this")
    keep_top: float = Field(
        1.0, gt=0, le=1, description="keep only this fraction of prompts, those whose best answer scores highest"
    )
    held_out: float = Field(0.05, ge=0, lt=1, description="fraction of kept answers held out for SFT eval loss")
    sft: KeptAnswersSFTConfig = Field(
        default_factory=KeptAnswersSFTConfig, description="fine-tuning on the kept answers"
    )


@stage(
    "rejection_sampling",
    RejectionSamplingConfig,
    inputs={
        "model": "policy checkpoint: fine-tuned on the kept answers (and a sampler)",
        "reward_model": "reward model that ranks the answers",
        "prompts": "prompt dataset",
    },
    optional_inputs={
        "committee": "more sampler checkpoints (iTeC); a list",
        "eval_prompts": "prompt dataset whose test split measures the gold reward",
    },
    outputs={"model": "fine-tuned policy", "data": "chat dataset of the kept answers"},
)
def run(config: RejectionSamplingConfig, inputs: dict, ctx: StageContext) -> dict[str, str]:
    """Best-of-K by the reward model (over one model or a committee), then SFT on the winners."""
    samplers = [inputs["model"], *as_refs(inputs.get("committee", []))]
    tokenizer = load_tokenizer(inputs["model"])
    prompts = read_dataset(inputs["prompts"], "prompt", "train", limit=config.max_prompts, options=config)
    if not prompts:
        raise DataError(f"{inputs['prompts']}: no training prompts")
    texts = [r["prompt"] for r in prompts]
    # (answer, sampler index) per prompt
    candidates = config.sample_answers(samplers, tokenizer, texts, seed=config.seed * 104_729)
    reward_model = load_reward_model(inputs["reward_model"], tokenizer).to(training_device())  # a GPU if any
    flat = [(i, answer, who) for i, slot in enumerate(candidates) for answer, who in slot]
    if not flat:
        raise DataError("rejection_sampling: no answer kept (every sample was cut off by max_new_tokens)")
    rm_tokenizer = scoring_tokenizer(reward_model, tokenizer)
    scores = reward_scores(reward_model, rm_tokenizer, [texts[i] for i, _, _ in flat], [a for _, a, _ in flat])
    del reward_model  # its (GPU) memory goes back before the fine-tuning below
    best: dict[int, tuple[float, str, int]] = {}
    for (i, answer, who), score in zip(flat, scores.tolist(), strict=True):
        if answer and (i not in best or score > best[i][0]):
            best[i] = (score, answer, who)
    kept = {i: b for i, b in best.items() if config.min_score is None or b[0] >= config.min_score}
    if config.keep_top < 1:
        ranked = sorted(kept, key=lambda i: kept[i][0], reverse=True)
        kept = {i: kept[i] for i in ranked[: max(1, round(len(ranked) * config.keep_top))]}
    if not kept:
        raise DataError("rejection_sampling: no answer kept (all empty, cut off by max_new_tokens, or below min_score)")

    metrics = {"candidates": len(flat), "kept": len(kept), "rm_score_all": scores.mean().item()}
    metrics["rm_score_kept"] = sum(b[0] for b in kept.values()) / len(kept)
    gold_idx = [j for j, (i, _, _) in enumerate(flat) if prompts[i].get("task")]
    if gold_idx:  # how much better the kept answers are by the gold reward: the selection gain
        metrics["gold_reward_all"] = sum(
            score_gold([prompts[flat[j][0]] for j in gold_idx], [flat[j][1] for j in gold_idx])
        ) / len(gold_idx)
        kept_gold = [i for i in kept if prompts[i].get("task")]
        if kept_gold:
            metrics["gold_reward_kept"] = sum(
                score_gold([prompts[i] for i in kept_gold], [kept[i][1] for i in kept_gold])
            ) / len(kept_gold)
    wins = Counter(b[2] for b in kept.values())
    metrics.update({f"winner_share_sampler{k}": wins[k] / len(kept) for k in range(len(samplers))})
    ctx.log_metrics(metrics)
    ctx.log_params({"samplers": samplers})

    records = [
        {
            "messages": [*as_messages(texts[i], "user"), {"role": "assistant", "content": answer}],
            "task": prompts[i].get("task"),
            "meta": {**(prompts[i].get("meta") or {}), "rm_score": score, "sampler": who},
        }
        for i, (score, answer, who) in sorted(kept.items())
    ]
    ctx.log_table(
        {
            "prompt": [r["messages"][-2]["content"][-200:] for r in records[:32]],
            "kept": [r["messages"][-1]["content"] for r in records[:32]],
            "rm_score": [r["meta"]["rm_score"] for r in records[:32]],
            "sampler": [r["meta"]["sampler"] for r in records[:32]],
        },
        "samples/kept.json",
    )
    random.Random(config.seed).shuffle(records)
    n_test = max(1, round(len(records) * config.held_out)) if len(records) > 1 else 0
    data = write_dataset(ctx.output("data"), {"train": records[n_test:], "test": records[:n_test]}, "chat")
    sft_inputs = {"model": inputs["model"], "data": data}
    if "eval_prompts" in inputs:
        sft_inputs["eval_prompts"] = inputs["eval_prompts"]
    return {"model": fine_tune(config.sft, sft_inputs, ctx, config.sft.seed), "data": data}
