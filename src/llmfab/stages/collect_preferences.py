"""collect_preferences: the preference-data round of Llama 3.1 / AFM / Qwen2. The latest models
answer the prompts several times each; an annotator ranks the answers; the best and the worst
answer of a prompt become a pair. Pairs drawn from the policy's own answers are what DPO and the
reward model need: they cover the mistakes the policy actually makes, where pairs written
offline do not.

Annotators: `verifier`, the tasks' verifiable rewards (answer checkers, format checkers: the
testbed's gold reward; Llama 3.1 and Qwen2 rank math and code this way), standing in for the
human raters of a real round; or `reward_model`, an RM's scores (RLAIF)."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from llmfab.config.recipe import as_refs
from llmfab.data.io import read_dataset, write_dataset
from llmfab.data.options import DataOptions
from llmfab.data.tasks import TASKS
from llmfab.errors import ConfigError, DataError
from llmfab.evaluation.gold import score_gold
from llmfab.generation import SamplingConfig
from llmfab.models import load_tokenizer
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.distributed import training_device
from llmfab.train.pairs import best_and_worst, reward_scores
from llmfab.train.reward_inputs import load_reward_model, scoring_tokenizer


class CollectPreferencesConfig(StageConfig, SamplingConfig, DataOptions):
    annotator: Literal["verifier", "reward_model"] = "verifier"
    min_gap: float = Field(0.0, ge=0, description="keep a pair only when best - worst score exceeds this")
    held_out: float = Field(0.1, ge=0, lt=1, description="fraction of pairs in the test split")


def preference_level(gap: float) -> int:
    """A verifier score gap in [0, 1] as AFM's level: 0 significantly ... 3 negligibly better."""
    return 0 if gap >= 0.75 else 1 if gap >= 0.5 else 2 if gap >= 0.25 else 3


@stage(
    "collect_preferences",
    CollectPreferencesConfig,
    inputs={"models": "the model(s) that answer: one checkpoint or a list", "prompts": "prompt dataset"},
    optional_inputs={"reward_model": "ranks the answers when annotator=reward_model"},
    outputs={"data": "preference dataset (train/test) of the models' own answers"},
)
def run(config: CollectPreferencesConfig, inputs: dict, ctx: StageContext) -> dict[str, str]:
    """Sample answers from the models, rank them, write best-vs-worst pairs per prompt."""
    models = as_refs(inputs["models"])
    if config.annotator == "reward_model" and "reward_model" not in inputs:
        raise ConfigError("collect_preferences: annotator=reward_model needs a `reward_model` input")
    prompts = read_dataset(inputs["prompts"], "prompt", "train", limit=config.max_prompts, options=config)
    if config.annotator == "verifier":
        prompts = [r for r in prompts if r.get("task") in TASKS]
    if not prompts:
        raise DataError(f"{inputs['prompts']}: no training prompts the {config.annotator} can score")
    tokenizer = load_tokenizer(models[0])
    texts = [r["prompt"] for r in prompts]
    sampled = config.sample_answers(models, tokenizer, texts, seed=config.seed * 104_729)
    answers: list[dict[str, int]] = [{} for _ in prompts]  # distinct answer -> the model that gave it first
    for slot, group in zip(answers, sampled, strict=True):
        for answer, index in group:
            if answer:
                slot.setdefault(answer, index)

    flat = [(i, answer) for i, slot in enumerate(answers) for answer in slot]
    if config.annotator == "verifier":
        scores = score_gold([prompts[i] for i, _ in flat], [a for _, a in flat])
    else:
        rm = load_reward_model(inputs["reward_model"], tokenizer).eval().to(training_device())  # a GPU if any
        rm_tokenizer = scoring_tokenizer(rm, tokenizer)
        scores = reward_scores(rm, rm_tokenizer, [texts[i] for i, _ in flat], [a for _, a in flat]).tolist()
    by_prompt: dict[int, list[tuple[str, float]]] = {}
    for (i, answer), score in zip(flat, scores, strict=True):
        by_prompt.setdefault(i, []).append((answer, score))

    rng = random.Random(config.seed)
    pairs, chosen_scores, rejected_scores = [], [], []
    for i, scored in sorted(by_prompt.items()):
        picked = best_and_worst([s for _, s in scored], rng)
        if picked is None:
            continue  # all answers equally good (or bad): no preference to learn
        best, worst = picked
        gap = scored[best][1] - scored[worst][1]
        if gap <= config.min_gap:
            continue
        record = prompts[i]
        chosen_scores.append(scored[best][1])
        rejected_scores.append(scored[worst][1])
        pairs.append(
            {
                "prompt": record["prompt"],
                "chosen": scored[best][0],
                "rejected": scored[worst][0],
                "level": preference_level(gap) if config.annotator == "verifier" else None,
                "margin": gap,
                "task": record.get("task"),
                "meta": {
                    **(record.get("meta") or {}),
                    "chosen_model": answers[i][scored[best][0]],
                    "rejected_model": answers[i][scored[worst][0]],
                },
            }
        )
    if not pairs:
        raise DataError(
            "collect_preferences: no prompt had two answers of different quality; raise temperature, "
            "samples_per_model or max_new_tokens, or add models"
        )
    metrics = {
        "prompts": len(prompts),
        "answers": len(flat),
        "pairs": len(pairs),
        "score_all": sum(scores) / len(scores),
        "score_chosen": sum(chosen_scores) / len(pairs),
        "score_rejected": sum(rejected_scores) / len(pairs),
    }
    ctx.log_metrics(metrics)
    ctx.log_params({"models": models})
    columns = ("prompt", "chosen", "rejected", "margin")
    ctx.log_table({k: [p[k] for p in pairs[:32]] for k in columns}, "samples/pairs.json")
    rng.shuffle(pairs)
    # At least one pair on each side whenever there are two and a held-out share was asked for.
    n_test = min(len(pairs) - 1, max(1, round(len(pairs) * config.held_out))) if config.held_out else 0
    return {"data": write_dataset(ctx.output("data"), {"train": pairs[n_test:], "test": pairs[:n_test]}, "preference")}
