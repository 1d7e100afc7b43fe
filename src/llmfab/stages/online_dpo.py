"""online_dpo: Qwen2's online DPO. Each episode the current policy answers a slice of the
prompts n times, the reward model scores the answers, the best becomes chosen and the worst
rejected, and the policy takes DPO steps on those pairs; optionally through the Online Merging
Optimizer."""

from __future__ import annotations

import hashlib
import json
import logging
import random

import torch
from pydantic import Field, model_validator

from llmfab.data.chat import formatting_mask
from llmfab.data.options import DataOptions
from llmfab.data.schemas import last_text
from llmfab.errors import DataError
from llmfab.evaluation.gold import GoldEvalConfig, log_gold_eval, score_gold
from llmfab.generation import Samples, sample_policy
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.config import TrainConfig
from llmfab.train.distributed import is_partitioned, most_on_any_rank, rank_and_world, whole_weights
from llmfab.train.dpo import DPOLossConfig, dpo_loss_fn, online_merging_wrapper
from llmfab.train.lora import LoraConfig, save_trained
from llmfab.train.pairs import best_and_worst, pair_batch, pair_tensors, reference_logps
from llmfab.train.rl_setup import load_rl_setup
from llmfab.train.rollouts import EpisodeBatches, rank_prompts, rank_seed, sample_scores
from llmfab.train.trainer import Trainer

log = logging.getLogger(__name__)


class OnlineDPOConfig(StageConfig, DPOLossConfig, DataOptions):
    max_len: int = Field(256, gt=1)
    episodes: int = Field(4, gt=0, description="sample-score-train rounds; train.max_steps is split evenly over them")
    prompts_per_episode: int = Field(64, gt=0)
    samples_per_prompt: int = Field(4, ge=2)
    temperature: float = Field(1.0, gt=0, description="answers are sampled from softmax(logits/T), nothing cut off")
    max_new_tokens: int = Field(32, gt=0)
    keep_truncated: bool = Field(False, description="also pair answers cut off by max_new_tokens")
    # As in rollouts: a cut-off answer is paired as sampled (no end token appended); the penalty keeps it
    # from being chosen over a finished one of about the same score.
    missing_eos_penalty: float = Field(
        1.0, ge=0, description="with keep_truncated: subtracted from the score of answers cut off by max_new_tokens"
    )
    min_score_gap: float = Field(0.0, ge=0, description="skip prompts whose best and worst scores are closer")
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig | None = Field(
        None, description="LoRA / QLoRA adapters on a frozen base, which is also the reference; None: full fine-tuning"
    )
    eval: GoldEvalConfig = Field(default_factory=GoldEvalConfig)

    @model_validator(mode="after")
    def _whole_episodes(self):
        tc = self.train
        if tc.max_steps % self.episodes:
            raise ValueError(f"train.max_steps ({tc.max_steps}) must be a multiple of episodes ({self.episodes})")
        steps = tc.max_steps // self.episodes
        if tc.checkpoint_every % steps:
            # A resume rebuilds the episode's pairs from the restored policy: exact only at an episode boundary.
            raise ValueError(
                f"train.checkpoint_every ({tc.checkpoint_every}) must be a multiple of an episode's steps "
                f"(train.max_steps / episodes = {steps})"
            )
        return self


def pick_pairs(
    samples: Samples, scores: torch.Tensor, n: int, config: OnlineDPOConfig, rng: random.Random
) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices: for each prompt (n consecutive samples) the best and the worst
    of its answers (finished ones unless keep_truncated) by `scores`, ties broken at random as
    collect_preferences breaks them. No pair when all tie, when the two are the same answer, or when
    their scores are within min_score_gap."""
    pairs = []
    for start in range(0, len(samples.finished), n):
        group = [j for j in range(start, start + n) if samples.finished[j] or config.keep_truncated]
        picked = best_and_worst([float(scores[j]) for j in group], rng) if len(group) >= 2 else None
        if picked is None:
            continue
        best, worst = group[picked[0]], group[picked[1]]
        same = samples.completion_ids[best] == samples.completion_ids[worst]
        if not same and float(scores[best] - scores[worst]) > config.min_score_gap:
            pairs.append((best, worst))
    return pairs


def pair_rows(tokenizer, samples: Samples, pairs: list[tuple[int, int]], mask_formatting: bool) -> dict:
    """encode_pairs' tensors for (chosen, rejected) sample indices: rendered prompt ids + the response ids
    exactly as sampled (a cut-off answer gets no end token appended), the mask on the response."""
    cols: dict[str, list] = {k: [] for k in ("c_ids", "c_mask", "c_full", "r_ids", "r_mask")}
    for chosen, rejected in pairs:
        for side, j in (("c", chosen), ("r", rejected)):
            prompt, response = samples.prompt_ids[j], samples.completion_ids[j]
            seq, mask = prompt + response, [0] * len(prompt) + [1] * len(response)
            if side == "c":
                cols["c_full"].append(mask)  # the NLL term's mask keeps the formatting tokens
            if mask_formatting:
                mask = [m * (1 - f) for m, f in zip(mask, formatting_mask(tokenizer, seq), strict=True)]
            cols[f"{side}_ids"].append(seq)
            cols[f"{side}_mask"].append(mask)
    return pair_tensors({**cols, "margin": [0.0] * len(pairs), "label": [1.0] * len(pairs)}, tokenizer.pad_token_id)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


class Episodes:
    """Builds an episode's pairs from the current policy (EpisodeBatches calls it when the episode's
    first step comes, after a resume from the restored policy)."""

    def __init__(self, policy, reference, reward_model, tokenizer, prompts, config: OnlineDPOConfig, ctx):
        self.policy, self.reference, self.rm, self.tok = policy, reference, reward_model, tokenizer
        self.prompts, self.config, self.ctx = prompts, config, ctx
        self.steps = config.train.max_steps // config.episodes

    def sample(self, batch: list[dict], seed: int) -> Samples:
        was_training = self.policy.training
        with whole_weights(self.policy):  # ZeRO-3: gathered on every rank, which answer different prompts
            samples = sample_policy(
                self.policy,
                self.tok,
                [r["prompt"] for r in batch],
                n=self.config.samples_per_prompt,
                temperature=self.config.temperature,
                max_new_tokens=self.config.max_new_tokens,
                seed=seed,
            )
        self.policy.train(was_training)
        return samples

    def fitting(self, samples: Samples, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The pairs whose prompt + longer answer fit max_len (the others dropped with a warning)."""
        max_len = self.config.max_len
        kept = [
            p
            for p in pairs
            if len(samples.prompt_ids[p[0]]) + max(len(samples.completion_ids[j]) for j in p) <= max_len
        ]
        if len(kept) < len(pairs):
            log.warning(
                "episode pairs: dropped %d of %d pairs longer than %d tokens",
                len(pairs) - len(kept),
                len(pairs),
                max_len,
            )
        return kept

    def build(self, episode: int) -> dict[str, torch.Tensor]:
        cfg, n = self.config, self.config.samples_per_prompt
        batch = rank_prompts(self.prompts, episode, cfg.prompts_per_episode)  # under torchrun, each rank its own
        seed = rank_seed(cfg.seed * 7919 + episode)
        rank, world = rank_and_world()
        digests = [hashlib.sha256(json.dumps(r["prompt"]).encode()).hexdigest()[:10] for r in batch]
        log.info("episode %d: rank %d of %d samples prompts %s", episode, rank, world, " ".join(digests))
        samples = self.sample(batch, seed)
        finished = torch.tensor(samples.finished, dtype=torch.float32)
        prompts = [batch[j // n]["prompt"] for j in range(len(samples.texts))]
        scores = sample_scores(self.rm, self.tok, samples, prompts=prompts)
        ranked = scores - cfg.missing_eos_penalty * (1 - finished)
        pairs = self.fitting(samples, pick_pairs(samples, ranked, n, cfg, random.Random(seed)))
        if not pairs:
            raise DataError(
                f"online_dpo episode {episode}: no prompt gave two different finished answers with distinct "
                "scores; raise temperature, samples_per_prompt or max_new_tokens"
            )
        self.log_episode(episode, batch, samples, scores, pairs)
        rows = pair_rows(self.tok, samples, pairs, cfg.mask_formatting)
        n_pairs = len(pairs)
        if is_partitioned(self.reference):  # ZeRO-3: every rank runs as many reference forwards (the last pair again)
            more = most_on_any_rank(n_pairs) - n_pairs
            scored = {k: torch.cat([v, v[-1:].expand(more, *v.shape[1:])]) for k, v in rows.items()}
        else:
            scored = rows
        chosen, rejected = reference_logps(self.reference, scored, cfg.train.batch_size, cfg.train.precision)
        rows["ref_chosen"], rows["ref_rejected"] = chosen[:n_pairs], rejected[:n_pairs]
        return rows

    def log_episode(self, episode: int, batch, samples: Samples, scores, pairs) -> None:
        n, keep_truncated = self.config.samples_per_prompt, self.config.keep_truncated
        kept = [j for j, done in enumerate(samples.finished) if done or keep_truncated]
        graded = [j for j in kept if batch[j // n].get("task")]
        gold = dict(
            zip(graded, score_gold([batch[j // n] for j in graded], [samples.texts[j] for j in graded]), strict=True)
        )
        self.ctx.log_metrics(
            {
                "episode": episode,
                "episode_pairs": len(pairs),
                "episode_rm_score": _mean([float(scores[j]) for j in kept]),
                "episode_finished": _mean([float(done) for done in samples.finished]),  # the rest hit max_new_tokens
                "episode_gold_reward": _mean(list(gold.values())),  # reward hacking shows as RM up, gold flat
                "episode_gold_chosen": _mean([gold[c] for c, _ in pairs if c in gold]),
                "episode_gold_rejected": _mean([gold[r] for _, r in pairs if r in gold]),
            },
            step=episode * self.steps,
        )
        if episode == 0:
            shown = pairs[:32]
            self.ctx.log_table(
                {
                    "prompt": [last_text(batch[c // n]["prompt"])[-200:] for c, _ in shown],
                    "chosen": [samples.texts[c] for c, _ in shown],
                    "rejected": [samples.texts[r] for _, r in shown],
                },
                "samples/episode0_pairs.json",
            )


@stage(
    "online_dpo",
    OnlineDPOConfig,
    inputs={
        "model": "policy checkpoint (typically after offline DPO)",
        "reward_model": "reward model that picks chosen/rejected",
        "prompts": "prompt dataset",
    },
    optional_inputs={
        "reference": "reference policy (default: the `model` input)",
        "base": "pretrained model for optimizer=online_merging's task vector",
        "eval_prompts": "prompt dataset whose test split measures the gold reward",
    },
    outputs={"model": "policy checkpoint"},
)
def run(config: OnlineDPOConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Online DPO episodes: sample n answers, RM best = chosen / worst = rejected, DPO update."""
    # The reference moves to the training device when reference_logps runs.
    rl = load_rl_setup(inputs, config, lora=config.lora)
    policy, tokenizer, records = rl.policy, rl.tokenizer, rl.eval_records
    log_gold_eval(policy, tokenizer, records, config.eval, ctx, "_before")
    trainer = Trainer(
        policy,
        config.train,
        ctx,
        dpo_loss_fn(config),
        tokenizer=tokenizer,
        checkpoint_meta={"stage": "online_dpo"},
        wrap_optimizer=online_merging_wrapper(config, policy, inputs.get("base"), config.seed),
    )
    episodes = Episodes(policy, rl.reference, rl.reward_model, tokenizer, rl.prompts, config, ctx)
    tc = config.train
    trainer.fit(EpisodeBatches(episodes.build, episodes.steps, tc.batch_size, tc.grad_accum, pair_batch))
    log_gold_eval(policy, tokenizer, records, config.eval, ctx)
    meta = {"stage": "online_dpo", **ctx.metrics}
    return {"model": save_trained(policy, tokenizer, ctx.output("model"), meta, config.lora, inputs["model"])}
