"""online_dpo: Qwen2's online DPO. Each episode the current policy answers a slice of the
prompts n times, the reward model scores the answers, the best becomes chosen and the worst
rejected, and the policy takes DPO steps on those pairs; optionally through the Online Merging
Optimizer."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from llmfab.data.io import read_dataset
from llmfab.errors import DataError
from llmfab.evaluation.gold import GoldEvalConfig, eval_records, log_gold_eval, score_gold
from llmfab.generation import generate_chat
from llmfab.models import load_model, load_tokenizer, save_model
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.config import TrainConfig
from llmfab.train.distributed import training_device
from llmfab.train.dpo import DPOLossConfig, dpo_loss_fn, online_merging_wrapper
from llmfab.train.pairs import encode_pairs, pair_batch, reference_logps, reward_scores
from llmfab.train.rollouts import EpisodeBatches
from llmfab.train.trainer import Trainer


class OnlineDPOConfig(StageConfig, DPOLossConfig):
    max_len: int = Field(256, gt=1)
    episodes: int = Field(4, gt=0, description="sample-score-train rounds; train.max_steps is split evenly over them")
    prompts_per_episode: int = Field(64, gt=0)
    samples_per_prompt: int = Field(4, ge=2)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    keep_truncated: bool = Field(False, description="also pair answers cut off by max_new_tokens")
    min_score_gap: float = Field(0.0, ge=0, description="skip prompts whose best and worst scores are closer")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: GoldEvalConfig = Field(default_factory=GoldEvalConfig)

    @model_validator(mode="after")
    def _even_episodes(self):
        if self.train.max_steps % self.episodes:
            raise ValueError(
                f"train.max_steps ({self.train.max_steps}) must be a multiple of episodes ({self.episodes})"
            )
        return self


class Episodes:
    """Builds an episode's pairs from the current policy (EpisodeBatches calls it when the episode's
    first step comes, after a resume from the restored policy)."""

    def __init__(self, policy, reference, reward_model, tokenizer, prompts, config: OnlineDPOConfig, ctx):
        self.policy, self.reference, self.rm, self.tok = policy, reference, reward_model, tokenizer
        self.prompts, self.config, self.ctx = prompts, config, ctx
        self.steps = config.train.max_steps // config.episodes

    def build(self, episode: int) -> dict[str, torch.Tensor]:
        cfg, n = self.config, self.config.samples_per_prompt
        start = episode * cfg.prompts_per_episode
        batch = [self.prompts[(start + i) % len(self.prompts)] for i in range(cfg.prompts_per_episode)]
        was_training = self.policy.training
        samples = generate_chat(
            self.policy,
            self.tok,
            [r["prompt"] for r in batch],
            n=n,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed * 7919 + episode,
            finished_only=not cfg.keep_truncated,
        )
        self.policy.train(was_training)
        flat_prompts = [r["prompt"] for r, group in zip(batch, samples, strict=True) for _ in group]
        flat_scores = reward_scores(self.rm, self.tok, flat_prompts, [s for group in samples for s in group])
        pairs, gold_all, gold_chosen, gold_rejected = [], [], [], []
        offset = 0
        for record, group in zip(batch, samples, strict=True):
            score, offset = flat_scores[offset : offset + len(group)], offset + len(group)
            gold = score_gold([record] * len(group), group) if record.get("task") else None
            if gold:
                gold_all.extend(gold)
            if len(group) < 2:
                continue
            best, worst = int(score.argmax()), int(score.argmin())
            if group[best] == group[worst] or float(score[best] - score[worst]) <= cfg.min_score_gap:
                continue
            pairs.append({"prompt": record["prompt"], "chosen": group[best], "rejected": group[worst]})
            if gold:
                gold_chosen.append(gold[best])
                gold_rejected.append(gold[worst])
        if not pairs:
            raise DataError(
                f"online_dpo episode {episode}: no prompt gave two different finished answers with distinct "
                "scores; raise temperature, samples_per_prompt or max_new_tokens"
            )
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        self.ctx.log_metrics(
            {
                "episode": episode,
                "episode_pairs": len(pairs),
                "episode_rm_score": flat_scores.mean().item() if len(flat_scores) else None,
                "episode_finished": len(flat_scores) / (len(batch) * n),  # the rest hit max_new_tokens
                "episode_gold_reward": mean(gold_all),  # reward hacking shows as RM up, gold flat
                "episode_gold_chosen": mean(gold_chosen),
                "episode_gold_rejected": mean(gold_rejected),
            },
            step=episode * self.steps,
        )
        if episode == 0:
            self.ctx.log_table(
                {
                    "prompt": [p["prompt"][-200:] for p in pairs[:32]],
                    "chosen": [p["chosen"] for p in pairs[:32]],
                    "rejected": [p["rejected"] for p in pairs[:32]],
                },
                "samples/episode0_pairs.json",
            )
        rows = encode_pairs(self.tok, pairs, cfg.max_len, mask_formatting=cfg.mask_formatting, where="episode pairs")
        ref = reference_logps(self.reference, rows, cfg.train.batch_size, cfg.train.precision)
        rows["ref_chosen"], rows["ref_rejected"] = ref
        return rows


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
    tokenizer = load_tokenizer(inputs["model"])
    policy = load_model(inputs["model"])
    reference = load_model(inputs.get("reference", inputs["model"])).eval().requires_grad_(False)
    # The reward model scores every sample: next to the policy (a GPU when there is one).
    reward_model = load_model(inputs["reward_model"], kind="reward").eval().requires_grad_(False)
    reward_model.to(training_device())
    prompts = read_dataset(inputs["prompts"], "prompt", "train")
    if not prompts:
        raise DataError(f"{inputs['prompts']}: no training prompts")
    records = eval_records(config.eval, inputs, ("prompts", "prompt"))
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
    episodes = Episodes(policy, reference, reward_model, tokenizer, prompts, config, ctx)
    tc = config.train
    trainer.fit(EpisodeBatches(episodes.build, episodes.steps, tc.batch_size, tc.grad_accum, pair_batch))
    log_gold_eval(policy, tokenizer, records, config.eval, ctx)
    return {"model": save_model(policy, tokenizer, ctx.output("model"), {"stage": "online_dpo", **ctx.metrics})}
