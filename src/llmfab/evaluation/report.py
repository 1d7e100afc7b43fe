"""The evaluate stage's measurements, under names that are the same for every family: held-out
perplexity on assistant tokens, reward-model score, win rates against a reference model and KL to
it, and the report that collects them (with what each was measured on, and what was skipped)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from llmfab.data.schemas import last_text
from llmfab.data.tasks import TASKS
from llmfab.evaluation.gold import score_gold
from llmfab.generation import sample_policy
from llmfab.tracking import timing
from llmfab.train.lm import eval_lm_loss, perplexity
from llmfab.train.packing import IGNORE
from llmfab.train.rollouts import batched_sequence_logps, sample_rows, sample_scores
from llmfab.train.sft_data import held_out_rows


def win_rate(ours: list[float], theirs: list[float]) -> float:
    """P(ours_i > theirs_i) over paired scores, a tie counting 1/2."""
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"win_rate needs paired, non-empty scores (got {len(ours)} and {len(theirs)})")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)) / len(ours)


def heldout_loss(
    model, tokenizer, uri: str, max_len: int, limit: int, batch_size: int = 8, options=None
) -> tuple[dict, int, int]:
    """Mean loss on the assistant tokens of chat dataset `uri`'s first `limit` test conversations
    (SFT's eval rows); returns ({heldout_loss, heldout_ppl}, conversations, scored tokens)."""
    rows = held_out_rows(tokenizer, uri, max_len, limit, options)
    loss = eval_lm_loss(model, rows, batch_size)
    conversations = int((rows["position_ids"] == 0).sum())  # each packed conversation restarts its positions
    tokens = int((rows["labels"][:, 1:] != IGNORE).sum())
    return {"heldout_loss": loss, "heldout_ppl": perplexity(loss)}, conversations, tokens


@torch.no_grad()
@timing.timed("score")
def compare_sampled(
    policy,
    tokenizer,
    records: list[dict],
    *,
    reference=None,
    reward_model=None,
    n: int = 2,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
) -> tuple[dict[str, float], dict[str, list]]:
    """`n` sampled answers per record from the policy (and the reference): rm_score (and
    rm_score_reference), win_rate_rm / win_rate_gold of policy over reference on the same prompts,
    and kl_to_reference = mean Σ log π/π_ref over the policy's own answers. Both models sample
    with the same seed, so a model against itself gives identical answers: win rates 1/2, KL 0.
    Returns (metrics, sample table)."""
    prompts = [r["prompt"] for r in records]
    flat = [r for r in records for _ in range(n)]
    # The KL estimate E_π[log π − log π_ref] needs samples from π itself (softmax(logits/T), nothing cut
    # off) and the log-probs of that distribution for the tokens sampled: as the RL stages' rollouts.
    sampling = dict(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)

    def answer_and_score(model):
        samples = sample_policy(model, tokenizer, prompts, **sampling)
        scores = (
            sample_scores(reward_model, tokenizer, samples, batch_size, [r["prompt"] for r in flat]).tolist()
            if reward_model is not None
            else None
        )
        return samples.texts, samples, scores

    answers, samples, scores = answer_and_score(policy)
    metrics: dict[str, float] = {}
    table: dict[str, list] = {"prompt": [last_text(r["prompt"])[-200:] for r in flat], "response": answers}
    if scores is not None:
        metrics["rm_score"] = sum(scores) / len(scores)
        table["rm_score"] = scores
    if reference is None:
        return metrics, table

    rows = sample_rows(samples, tokenizer.pad_token_id)
    policy_logps = batched_sequence_logps(policy, rows, batch_size, temperature=temperature)
    kl = policy_logps - batched_sequence_logps(reference, rows, batch_size, temperature=temperature)
    metrics["kl_to_reference"] = kl.mean().item()
    table["kl_to_reference"] = kl.tolist()
    ref_answers, _, ref_scores = answer_and_score(reference)
    table["reference_response"] = ref_answers
    if scores is not None:
        metrics["rm_score_reference"] = sum(ref_scores) / len(ref_scores)
        metrics["win_rate_rm"] = win_rate(scores, ref_scores)
        table["rm_score_reference"] = ref_scores
    gradable = [j for j, r in enumerate(flat) if r.get("task") in TASKS]
    if gradable:
        ours = score_gold([flat[j] for j in gradable], [answers[j] for j in gradable])
        theirs = score_gold([flat[j] for j in gradable], [ref_answers[j] for j in gradable])
        metrics["win_rate_gold"] = win_rate(ours, theirs)
    return metrics, table


@dataclass
class Report:
    """The evaluation table: one row per metric (value, what it was measured on, over how many), and
    the metrics that were not measured with the reason."""

    rows: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, metrics: dict[str, float], on: str, n: int | dict[str, int]) -> None:
        """Record `metrics`, measured on `on` over `n` items (or per metric name)."""
        for name, value in metrics.items():
            count = n.get(name, 0) if isinstance(n, dict) else n
            self.rows.append({"metric": name, "value": float(value), "on": on, "n": int(count)})

    def skip(self, names: list[str], why: str) -> None:
        self.skipped.update(dict.fromkeys(names, why))

    @property
    def metrics(self) -> dict[str, float]:
        return {r["metric"]: r["value"] for r in self.rows}

    def columns(self) -> dict[str, list]:
        """The rows as columns (what an MLflow table takes)."""
        return {k: [r[k] for r in self.rows] for k in ("metric", "value", "on", "n")}

    def to_json(self, **about) -> str:
        return json.dumps({**about, "metrics": self.metrics, "rows": self.rows, "skipped": self.skipped}, indent=1)
