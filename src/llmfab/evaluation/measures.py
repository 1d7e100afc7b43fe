"""The evaluate stage's four measurements, one function each: held-out perplexity, greedy gold reward,
sampled answers compared with a reference (reward-model score, win rates, KL) and needle retrieval.
Each returns a Measured under the report's metric names, whatever the model family."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from llmfab.evaluation.gold import gold_eval
from llmfab.evaluation.long_context import needle_eval, prose_filler
from llmfab.evaluation.report import compare_sampled, heldout_loss


@dataclass
class Measured:
    """One measurement: its metrics, what they were measured on and over how many items (one count, or
    one per metric name), and its table of samples (None when it keeps none): a Report row per metric."""

    metrics: dict[str, float]
    on: str
    n: int | dict[str, int]
    samples: dict[str, list] | None = None


def heldout_perplexity(
    model, tokenizer, data: str, *, max_len: int, conversations: int, batch_size: int, options=None
) -> Measured:
    """heldout_loss = −(1/T) Σ_t log π(y_t | y_<t) over the T assistant tokens of chat dataset `data`'s first
    `conversations` test conversations (packed rows of `max_len`); heldout_ppl = exp(heldout_loss).
    Counted in scored tokens. `options` (DataOptions) name its test split."""
    metrics, convs, tokens = heldout_loss(model, tokenizer, data, max_len, conversations, batch_size, options)
    return Measured(metrics, f"data test split: assistant tokens of {convs} conversations", tokens)


def greedy_gold_reward(
    model, tokenizer, records: list[dict], on: str, *, max_new_tokens: int, batch_size: int, seed: int
) -> Measured:
    """gold_reward = (1/N) Σ_i gold(task_i, y_i) for y_i the greedy answer to prompt i, the task's verifiable
    reward; gold_reward_<task> the same mean per task; response_tokens = mean |y_i|. Counted in prompts."""
    metrics, rows = gold_eval(
        model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
    )
    per_task = Counter(r["task"] for r in records)
    counts = {f"gold_reward_{t}": c for t, c in per_task.items()} | {"gold_reward": len(records)}
    counts["response_tokens"] = len(records)
    return Measured(metrics, f"{on}, greedy", counts, rows)


def sampled_comparison(
    model,
    tokenizer,
    records: list[dict],
    on: str,
    *,
    reference=None,
    reward_model=None,
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
) -> Measured:
    """Over n answers y ~ π (and y_ref ~ π_ref, same seed) per prompt x, at temperature T:
    rm_score = E[r(x, y)], rm_score_reference = E[r(x, y_ref)],
    win_rate_rm = P(r(x, y) > r(x, y_ref)) + ½·P(r(x, y) = r(x, y_ref)), win_rate_gold the same with the
    gold reward (over prompts with a gold-reward task), kl_to_reference = E_{y~π}[log π(y|x) − log π_ref(y|x)].
    The RM metrics need `reward_model`, the rest `reference`. Counted in sampled answers."""
    metrics, rows = compare_sampled(
        model,
        tokenizer,
        records,
        reference=reference,
        reward_model=reward_model,
        n=n,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
    )
    return Measured(metrics, f"{on}, {n} samples per prompt at T={temperature}", len(records) * n, rows)


def needle_retrieval(model, tokenizer, corpus: str, *, length: int, samples: int, seed: int) -> Measured:
    """One number planted at `samples` depths spread over a `length`-token haystack of text dataset `corpus`'s
    test prose: needle_acc = P(greedy answer = planted number), needle_nll = NLL per answer token,
    needle_margin = E[NLL(random number) − NLL(planted number)] (> 0: retrieved, not guessed), and
    needle_length. Counted in depths probed."""
    filler = prose_filler(corpus, "test")
    metrics = needle_eval(model, tokenizer, length, filler, samples, seed=seed)
    return Measured({**metrics, "needle_length": length}, "corpus test prose, depths spread evenly", samples)
