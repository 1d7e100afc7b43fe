"""Rollouts for the RL stages: the policy answers each prompt K times, the reward model scores
the answers, and every sample gets a KL-regularised reward and a leave-one-out advantage.

Rows are right-padded (ids, response mask) so one forward scores a micro-batch; log-probs are of
the sampled text re-encoded with the chat template, the same tokens the update is computed on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.data.chat import encode_response
from llmfab.data.io import read_dataset
from llmfab.errors import DataError, LlmfabError
from llmfab.evaluation.gold import score_gold
from llmfab.generation import sample_chat
from llmfab.losses.preference import sequence_logps
from llmfab.losses.rl import kl_penalized_rewards, leave_one_out_advantages
from llmfab.tracking import timing
from llmfab.train.distributed import micro_batches_per_step
from llmfab.train.lm import step_batch
from llmfab.train.pairs import pad_right, reward_scores_of_ids

Rows = dict[str, torch.Tensor]


class RolloutError(LlmfabError):
    """A rollout cannot be used (non-finite rewards or log-probs); training stops, checkpoints kept."""


class RolloutConfig(StrictModel):
    """How the RL stages sample and reward (shared by mdloo and rlhf_warp)."""

    beta: float = Field(0.1, ge=0, description="weight of log(π/π_anchor) subtracted from the reward")
    samples_per_prompt: int = Field(4, ge=2, description="K answers per prompt (leave-one-out needs 2)")
    prompts_per_rollout: int = Field(16, gt=0)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    max_len: int = Field(256, gt=1, description="prompt + answer tokens; a longer prompt is an error")
    max_prompts: int | None = Field(None, gt=0, description="use at most this many training prompts")
    missing_eos_penalty: float = Field(
        0.0, ge=0, description="subtracted from the score of answers cut off by max_new_tokens"
    )
    normalize_advantages: bool = Field(False, description="scale advantages to zero mean, unit std per rollout")
    heldout_prompts: int = Field(
        64, ge=0, description="test-split prompts on which reward and KL to the input model are measured (0: off)"
    )
    heldout_samples: int = Field(2, ge=2, description="samples per held-out prompt in each measurement")


@torch.no_grad()
@timing.timed("score")
def batched_sequence_logps(model, rows: Rows, batch_size: int = 32) -> torch.Tensor:
    """Σ log π(response | prompt) of every row under `model`."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows["input_ids"]), batch_size):
        batch = trim({k: v[i : i + batch_size] for k, v in rows.items()})
        ids, mask = batch["input_ids"].to(device), batch["mask"].to(device)
        out.append(sequence_logps(model(input_ids=ids, use_cache=False).logits, ids, mask).float().cpu())
    return torch.cat(out)


def response_rows(encoded: list[tuple[list[int], list[int]]], pad_token_id: int) -> Rows:
    """(ids, response mask) pairs from encode_response as right-padded rows, with each row's length."""
    return {
        "input_ids": pad_right([ids for ids, _ in encoded], pad_token_id),
        "mask": pad_right([mask for _, mask in encoded], 0),
        "length": torch.tensor([len(ids) for ids, _ in encoded]),
    }


def trim(batch: Rows) -> Rows:
    """Drop padding columns past the longest row of this batch."""
    end = int(batch["length"].max())
    return {k: v[:, :end] if v.ndim == 2 else v for k, v in batch.items()}


def rollout_batch(rows: Rows, step: int, micro: int, batch_size: int, per_step: int) -> Rows:
    return trim(step_batch(rows, step, micro, batch_size, per_step))


def sample_rollout(
    policy, anchor, reward_model, tokenizer, records: list[dict], config: RolloutConfig, seed: int
) -> tuple[Rows, dict[str, float]]:
    """K samples per record from `policy`; rows with ids, response mask, the sampling policy's
    log-probs (`old_logps`) and advantages of R = score − β·log(π/π_anchor); and rollout stats."""
    k = config.samples_per_prompt
    prompts = [r["prompt"] for r in records]
    was_training = policy.training
    texts, finished = sample_chat(
        policy, tokenizer, prompts, n=k, temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=seed
    )
    flat_prompts = [p for p in prompts for _ in range(k)]
    encoded = [encode_response(tokenizer, p, t) for p, t in zip(flat_prompts, texts, strict=True)]
    for j, (ids, mask) in enumerate(encoded):
        if len(ids) > config.max_len:
            prompt_len = len(ids) - sum(mask)
            raise DataError(
                f"prompt {records[j // k].get('id', j // k)!r} is {prompt_len} tokens; with its answer it exceeds "
                f"max_len={config.max_len} (raise max_len or drop long prompts)"
            )
    rows = response_rows(encoded, tokenizer.pad_token_id)
    old = batched_sequence_logps(policy, rows)
    policy.train(was_training)
    anchor_logps = batched_sequence_logps(anchor, rows)
    scores = reward_scores_of_ids(reward_model, [ids for ids, _ in encoded], tokenizer.pad_token_id)
    done = torch.tensor(finished, dtype=torch.float32)
    for name, values in (
        ("reward model scores", scores),
        ("policy log-probs", old),
        ("anchor log-probs", anchor_logps),
    ):
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise RolloutError(f"{bad} of {len(values)} {name} are NaN/inf; stopping (checkpoints kept)")
    rewards = kl_penalized_rewards(scores - config.missing_eos_penalty * (1 - done), old, anchor_logps, config.beta)
    advantages = leave_one_out_advantages(rewards, k)
    if config.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    rows.update(old_logps=old, advantages=advantages)
    stats = {
        "rm_score": scores.mean().item(),
        "reward": rewards.mean().item(),
        "kl_anchor": (old - anchor_logps).mean().item(),
        "response_tokens": (rows["mask"].sum(1).float() - 1).mean().item(),  # the end token excluded
        "finished": done.mean().item(),
    }
    tasks = [(records[j // k], text) for j, text in enumerate(texts) if records[j // k].get("task")]
    if tasks:  # the testbed's ground truth: RM score up with gold flat is reward hacking
        gold = score_gold([r for r, _ in tasks], [t for _, t in tasks])
        stats["gold_reward_sampled"] = sum(gold) / len(gold)
    return rows, stats


def heldout_records(inputs: dict[str, str], config: RolloutConfig) -> list[dict]:
    """The test split of `eval_prompts` (else of `prompts`): prompts no rollout samples."""
    if not config.heldout_prompts:
        return []
    uri = inputs.get("eval_prompts", inputs["prompts"])
    records = read_dataset(uri, "prompt", "test", limit=config.heldout_prompts)
    if not records:
        raise DataError(f"{uri}: no test-split prompts for the held-out measurements (or set heldout_prompts: 0)")
    return records


def measure_policy(model, reference, reward_model, tokenizer, records, config: RolloutConfig, seed: int):
    """On held-out prompts: KL(π‖π_ref) (sequence level, on π's samples), the reward-model score and
    the sampled gold reward. Every call answers the same prompts with the same sampling stream."""
    probe = config.model_copy(update={"samples_per_prompt": config.heldout_samples, "normalize_advantages": False})
    _, stats = sample_rollout(model, reference, reward_model, tokenizer, records, probe, seed=seed)
    out = {"kl": stats["kl_anchor"], "rm_reward": stats["rm_score"], "response_tokens": stats["response_tokens"]}
    if "gold_reward_sampled" in stats:
        out["gold_sampled"] = stats["gold_reward_sampled"]
    return out


class EpisodeBatches:
    """batch_for_step for the Trainer when the policy makes its own data: episode e's rows come from
    `build(e)` when its first step arrives (after a resume, from the restored policy) and are served
    for `steps_per_episode` steps."""

    def __init__(self, build: Callable[[int], Rows], steps_per_episode: int, batch_size: int, grad_accum: int, batcher):
        self.build, self.steps, self.batch_size, self.grad_accum = build, steps_per_episode, batch_size, grad_accum
        self.batcher = batcher
        self.current, self.rows = -1, None

    def __call__(self, step: int, micro: int) -> Rows:
        episode = step // self.steps
        if episode != self.current:
            self.rows, self.current = self.build(episode), episode
        per_step = micro_batches_per_step(self.grad_accum)
        return self.batcher(self.rows, step - episode * self.steps, micro, self.batch_size, per_step)
