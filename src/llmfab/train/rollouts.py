"""Rollouts for the RL stages: the policy answers each prompt K times, the reward model scores the
answers, and every sample gets a KL-regularised reward and a leave-one-out advantage.

A row is the rendered prompt's ids followed by the ids exactly as sampled (through the stop token when
one ended the answer; a cut-off answer gets none appended), right-padded, with a mask on the sampled
ids. Samples come from softmax(logits / T) itself (generation.sample_policy), and every log-prob of a
ratio or a KL term is of that distribution: `response_logps` is the one place that computes them, for
the training forward and for the sampling policy's and the anchor's log-probs alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.data.chat import encode_response, stop_token_ids
from llmfab.data.io import read_dataset
from llmfab.data.options import DataOptions
from llmfab.errors import DataError, LlmfabError
from llmfab.evaluation.gold import score_gold
from llmfab.generation import Samples, sample_policy
from llmfab.losses.preference import sequence_logps
from llmfab.losses.rl import kl_penalized_rewards, leave_one_out_advantages
from llmfab.tracking import timing
from llmfab.train.distributed import rank_and_world, whole_weights
from llmfab.train.lm import step_batch
from llmfab.train.pairs import pad_right, reward_scores_of_ids
from llmfab.train.reward_inputs import OWN_TOKENIZER, reencoded

Rows = dict[str, torch.Tensor]


class RolloutError(LlmfabError):
    """A rollout cannot be used (non-finite rewards or log-probs); training stops, checkpoints kept."""


class RolloutConfig(StrictModel):
    """How the RL stages sample and reward (shared by mdloo and rlhf_warp)."""

    beta: float = Field(0.1, ge=0, description="weight of log(π/π_anchor) subtracted from the reward")
    samples_per_prompt: int = Field(4, ge=2, description="K answers per prompt (leave-one-out needs 2)")
    prompts_per_rollout: int = Field(16, gt=0)
    temperature: float = Field(
        1.0, gt=0, description="samples come from softmax(logits/T); log-probs, ratios and KL are of that distribution"
    )
    max_new_tokens: int = Field(32, gt=0)
    max_len: int = Field(256, gt=1, description="prompt + answer tokens; a longer prompt is an error")
    max_prompts: int | None = Field(None, gt=0, description="use at most this many training prompts")
    # A cut-off answer is trained on as sampled (no end token appended), but with a high score it would
    # still teach rambling to the limit; one unit of reward-model score is a Bradley-Terry odds of e:1.
    missing_eos_penalty: float = Field(
        1.0, ge=0, description="subtracted from the score of answers cut off by max_new_tokens"
    )
    normalize_advantages: bool = Field(False, description="scale advantages to zero mean, unit std per rollout")
    heldout_prompts: int = Field(
        64, ge=0, description="test-split prompts on which reward and KL to the input model are measured (0: off)"
    )
    heldout_samples: int = Field(2, ge=2, description="samples per held-out prompt in each measurement")


def response_logps(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float):
    """(Σ log softmax(logits/T) over the masked tokens of each row, the tempered logits): the
    log-probabilities of the distribution the rollout sampled from. The training forward, the sampling
    policy's (old) log-probs and the anchor's all come from here, so ratios and KL terms compare like
    with like (TRL's online trainers divide by the temperature the same way)."""
    logits = model(input_ids=ids, use_cache=False).logits.float() / temperature
    return sequence_logps(logits, ids, mask), logits


@torch.no_grad()
@timing.timed("score")
def batched_sequence_logps(
    model, rows: Rows, batch_size: int = 32, precision: str = "fp32", temperature: float = 1.0
) -> torch.Tensor:
    """response_logps of every row under `model`, computed as the training forward computes them: on the
    model's device, under the training's autocast, in micro-batches of the training's size trimmed alike
    (rollout_batch), so the policy's log-probs before its first update equal these exactly (ratio 1)."""
    model.eval()
    device = next(model.parameters()).device
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    out = []
    for i in range(0, len(rows["input_ids"]), batch_size):
        batch = trim({k: v[i : i + batch_size] for k, v in rows.items()})
        with bf16:
            logps, _ = response_logps(model, batch["input_ids"].to(device), batch["mask"].to(device), temperature)
        out.append(logps.float().cpu())
    return torch.cat(out)


def sample_rows(samples: Samples, pad_token_id: int) -> Rows:
    """Right-padded rows of prompt ids + sampled ids, the mask on the sampled ids, and each row's length."""
    seqs = [p + c for p, c in zip(samples.prompt_ids, samples.completion_ids, strict=True)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(samples.prompt_ids, samples.completion_ids, strict=True)]
    return {
        "input_ids": pad_right(seqs, pad_token_id),
        "mask": pad_right(masks, 0),
        "length": torch.tensor([len(s) for s in seqs]),
    }


def turn_closing(tokenizer) -> list[int]:
    """The ids the chat template writes after an answer's end token (chatml: a newline)."""
    ids, _ = encode_response(tokenizer, "?", "!")
    ends = set(stop_token_ids(tokenizer))
    last = max((i for i, t in enumerate(ids) if t in ends), default=len(ids) - 1)
    return ids[last + 1 :]


def sample_scores(
    reward_model, tokenizer, samples: Samples, batch_size: int = 32, prompts: list | None = None
) -> torch.Tensor:
    """The reward model's score of each sampled conversation, from the sampled ids when the reward model
    shares the policy's tokenizer: a finished answer closed as the chat template closes a turn, which is how
    the reward model saw its training pairs; a cut-off one as it was sampled. A reward model with its own
    tokenizer (reward_inputs.load_reward_model) reads each sample's prompt (`prompts`, one per sample) and
    answer text re-encoded with it."""
    own = getattr(reward_model, OWN_TOKENIZER, None)
    if own is not None:
        if prompts is None:
            raise ValueError("sample_scores: a reward model with its own tokenizer needs the samples' prompts")
        encoded = reencoded(own, prompts, samples.texts, samples.finished)
        return reward_scores_of_ids(reward_model, encoded, own.pad_token_id, batch_size)
    closing = turn_closing(tokenizer)
    conversations = [
        p + c + (closing if done else [])
        for p, c, done in zip(samples.prompt_ids, samples.completion_ids, samples.finished, strict=True)
    ]
    return reward_scores_of_ids(reward_model, conversations, tokenizer.pad_token_id, batch_size)


def trim(batch: Rows) -> Rows:
    """Drop padding columns past the longest row of this batch."""
    end = int(batch["length"].max())
    return {k: v[:, :end] if v.ndim == 2 else v for k, v in batch.items()}


def rollout_batch(rows: Rows, step: int, micro: int, batch_size: int, per_step: int) -> Rows:
    return trim(step_batch(rows, step, micro, batch_size, per_step))


def like_training(train) -> dict:
    """sample_rollout's `batch_size` and `precision` for a stage whose forward is trained with `train`
    (a TrainConfig): so the log-probs computed outside the training forward match it."""
    return {"batch_size": train.batch_size, "precision": train.precision}


def _check_lengths(samples: Samples, records: list[dict], k: int, max_len: int) -> None:
    for j, (p, c) in enumerate(zip(samples.prompt_ids, samples.completion_ids, strict=True)):
        if len(p) + len(c) > max_len:
            raise DataError(
                f"prompt {records[j // k].get('id', j // k)!r} is {len(p)} tokens; with its answer it exceeds "
                f"max_len={max_len} (raise max_len or drop long prompts)"
            )


def sample_rollout(
    policy,
    anchor,
    reward_model,
    tokenizer,
    records: list[dict],
    config: RolloutConfig,
    seed: int,
    *,
    batch_size: int = 32,
    precision: str = "fp32",
) -> tuple[Rows, dict[str, float]]:
    """K samples per record from `policy`; rows with ids, response mask, the sampling policy's
    log-probs (`old_logps`) and advantages of R = score − β·log(π/π_anchor); and rollout stats.
    `batch_size` and `precision` are the training's (micro-batch size, autocast): log-probs are
    computed as its forward computes them."""
    k = config.samples_per_prompt
    was_training = policy.training
    # Under ZeRO-3 the policy is gathered whole on every rank for this: ranks answer different prompts.
    with whole_weights(policy):
        samples = sample_policy(
            policy,
            tokenizer,
            [r["prompt"] for r in records],
            n=k,
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
            seed=seed,
        )
        _check_lengths(samples, records, k, config.max_len)
        rows = sample_rows(samples, tokenizer.pad_token_id)
        old = batched_sequence_logps(policy, rows, batch_size, precision, config.temperature)
    policy.train(was_training)
    anchor_logps = batched_sequence_logps(anchor, rows, batch_size, precision, config.temperature)
    prompts = [records[j // k]["prompt"] for j in range(len(samples.texts))]
    scores = sample_scores(reward_model, tokenizer, samples, prompts=prompts)
    done = torch.tensor(samples.finished, dtype=torch.float32)
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
        "response_tokens": (rows["mask"].sum(1).float() - done).mean().item(),  # a sampled end token excluded
        "finished": done.mean().item(),
    }
    tasks = [(records[j // k], text) for j, text in enumerate(samples.texts) if records[j // k].get("task")]
    if tasks:  # the testbed's ground truth: RM score up with gold flat is reward hacking
        gold = score_gold([r for r, _ in tasks], [t for _, t in tasks])
        stats["gold_reward_sampled"] = sum(gold) / len(gold)
    return rows, stats


def heldout_records(inputs: dict[str, str], config: RolloutConfig, options: DataOptions | None = None) -> list[dict]:
    """The test split of `eval_prompts` (else of `prompts`, read as `options` say): prompts no rollout samples."""
    if not config.heldout_prompts:
        return []
    if "eval_prompts" in inputs:
        uri, options = inputs["eval_prompts"], None
    else:
        uri = inputs["prompts"]
    records = read_dataset(uri, "prompt", "test", limit=config.heldout_prompts, options=options)
    if not records:
        raise DataError(f"{uri}: no test-split prompts for the held-out measurements (or set heldout_prompts: 0)")
    return records


def measure_policy(
    model, reference, reward_model, tokenizer, records, config: RolloutConfig, seed: int, **scoring
) -> dict[str, float]:
    """On held-out prompts: KL(π‖π_ref) (sequence level, on π's samples), the reward-model score and
    the sampled gold reward. Every call answers the same prompts with the same sampling stream.
    `scoring`: sample_rollout's batch_size and precision."""
    probe = config.model_copy(update={"samples_per_prompt": config.heldout_samples, "normalize_advantages": False})
    _, stats = sample_rollout(model, reference, reward_model, tokenizer, records, probe, seed=seed, **scoring)
    out = {"kl": stats["kl_anchor"], "rm_reward": stats["rm_score"], "response_tokens": stats["response_tokens"]}
    if "gold_reward_sampled" in stats:
        out["gold_sampled"] = stats["gold_reward_sampled"]
    return out


def rank_prompts(prompts: list, episode: int, per_rank: int, order: list[int] | None = None) -> list:
    """This rank's `per_rank` prompts of `episode` (in `order`, cycling): an episode takes per_rank × ranks
    consecutive prompts and rank r the r-th block of them, so under torchrun every rank samples its own
    prompts, and one process takes what it always took."""
    rank, world = rank_and_world()
    start = (episode * world + rank) * per_rank
    picked = [(start + i) % len(prompts) for i in range(per_rank)]
    return [prompts[order[i] if order is not None else i] for i in picked]


def rank_seed(seed: int) -> int:
    """`seed` on rank 0 (and in one process), a different stream on each other rank."""
    return seed + 1_000_003 * rank_and_world()[0]


class EpisodeBatches:
    """batch_for_step for the Trainer when the policy makes its own data: episode e's rows come from
    `build(e)` when its first step arrives (after a resume, from the restored policy) and are served
    for `steps_per_episode` steps. Under torchrun the rows are this rank's own (built from its own
    prompts, rank_prompts): the Trainer's micro-batch `m * ranks + rank` is this rank's m-th."""

    def __init__(self, build: Callable[[int], Rows], steps_per_episode: int, batch_size: int, grad_accum: int, batcher):
        self.build, self.steps, self.batch_size, self.grad_accum = build, steps_per_episode, batch_size, grad_accum
        self.batcher = batcher
        self.current, self.rows = -1, None

    def __call__(self, step: int, micro: int) -> Rows:
        episode = step // self.steps
        if episode != self.current:
            self.rows, self.current = self.build(episode), episode
        world = rank_and_world()[1]
        return self.batcher(self.rows, step - episode * self.steps, micro // world, self.batch_size, self.grad_accum)
