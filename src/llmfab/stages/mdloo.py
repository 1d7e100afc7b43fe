"""mdloo: AFM's online RL, Mirror Descent with Leave-One-Out estimation (arXiv:2407.21075).

Each iteration k the policy π_k answers a batch of prompts K times; the reward model scores the
answers and each gets R = r − β·log(π_k/π_ref) (the whole response is one action); the advantage
is leave-one-out, A_i = R_i − mean_{j≠i} R_j; then a few inner steps from θ_k maximise
E_{π_k}[(π_θ/π_k)·A] − KL(π_θ‖π_k)/t_k, with no ratio clipping (the KL term keeps π_θ near π_k)."""

from __future__ import annotations

from pydantic import Field, model_validator

from llmfab.data.options import DataOptions
from llmfab.evaluation.gold import GoldEvalConfig, log_gold_eval
from llmfab.losses.rl import masked_entropy, mirror_descent_loss
from llmfab.models import save_model
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.config import TrainConfig
from llmfab.train.rl_setup import load_rl_setup
from llmfab.train.rollouts import (
    EpisodeBatches,
    RolloutConfig,
    like_training,
    measure_policy,
    rank_prompts,
    rank_seed,
    response_logps,
    rollout_batch,
    sample_rollout,
)
from llmfab.train.trainer import Trainer


class MDLOOConfig(StageConfig, RolloutConfig, DataOptions):
    inner_steps: int = Field(4, gt=0, description="optimizer steps per rollout; train.max_steps / inner_steps rollouts")
    mirror_kl: float = Field(1.0, ge=0, description="1/t_k: weight of KL(π_θ‖π_k) in each iteration's objective")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: GoldEvalConfig = Field(default_factory=GoldEvalConfig)

    @model_validator(mode="after")
    def _whole_iterations(self):
        tc = self.train
        if tc.max_steps % self.inner_steps:
            raise ValueError(f"train.max_steps ({tc.max_steps}) must be a multiple of inner_steps ({self.inner_steps})")
        if tc.checkpoint_every % self.inner_steps:
            # A resume rebuilds the rollout from the restored policy: exact only at an iteration boundary.
            raise ValueError(
                f"train.checkpoint_every ({tc.checkpoint_every}) must be a multiple of inner_steps ({self.inner_steps})"
            )
        return self


def mdloo_loss_fn(config: MDLOOConfig):
    def loss_fn(model, batch):
        logps, logits = response_logps(model, batch["input_ids"], batch["mask"], config.temperature)
        loss, metrics = mirror_descent_loss(logps, batch["old_logps"], batch["advantages"], config.mirror_kl)
        metrics["entropy"] = masked_entropy(logits.detach(), batch["mask"]).item()  # of the sampled distribution
        return loss, metrics

    return loss_fn


@stage(
    "mdloo",
    MDLOOConfig,
    inputs={
        "model": "policy checkpoint (after SFT / DPO / iTeC); also π_ref unless `reference` is given",
        "reward_model": "reward model that scores the answers",
        "prompts": "prompt dataset",
    },
    optional_inputs={
        "reference": "reference policy of the KL penalty (default: the `model` input)",
        "eval_prompts": "prompt dataset whose test split measures the gold reward",
    },
    outputs={"model": "policy checkpoint"},
)
def run(config: MDLOOConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Mirror-descent policy optimisation with leave-one-out advantages over K samples per prompt."""
    rl = load_rl_setup(inputs, config)
    policy, reference, reward_model, tokenizer = rl.policy, rl.reference, rl.reward_model, rl.tokenizer
    prompts, records, held_out = rl.prompts, rl.eval_records, rl.held_out
    log_gold_eval(policy, tokenizer, records, config.eval, ctx, "_before")
    scoring = like_training(config.train)

    def log_heldout(suffix: str) -> None:  # what the stage optimises, on prompts it never samples
        if held_out:
            seed = config.seed * 7 + 1
            m = measure_policy(policy, reference, reward_model, tokenizer, held_out, config, seed, **scoring)
            ctx.log_metrics({f"heldout_{k}{suffix}": v for k, v in m.items() if not (suffix and k == "kl")})

    log_heldout("_before")
    trainer = Trainer(policy, config.train, ctx, mdloo_loss_fn(config), tokenizer=tokenizer,
                      checkpoint_meta={"stage": "mdloo"})  # fmt: skip
    reference.to(trainer.device)  # next to the policy (a GPU when there is one), as the reward model already is

    def build(iteration: int):
        batch = rank_prompts(prompts, iteration, config.prompts_per_rollout)  # each rank its own
        seed = rank_seed(config.seed * 7919 + iteration)
        rows, stats = sample_rollout(policy, reference, reward_model, tokenizer, batch, config, seed=seed, **scoring)
        ctx.log_metrics({"iteration": iteration, **{f"rollout_{k}": v for k, v in stats.items()}},
                        step=iteration * config.inner_steps)  # fmt: skip
        return rows

    tc = config.train
    trainer.fit(EpisodeBatches(build, config.inner_steps, tc.batch_size, tc.grad_accum, rollout_batch))
    log_heldout("")
    log_gold_eval(policy, tokenizer, records, config.eval, ctx)
    return {"model": save_model(policy, tokenizer, ctx.output("model"), {"stage": "mdloo", **ctx.metrics})}
