"""rlhf_warp: Gemma 2's RLHF with WARP, Weight Averaged Rewarded Policies (arXiv:2406.16768).

Each iteration: M REINFORCE runs start from θ_init and differ only in the order of their
prompts; each optimises R = r − β·log(π/π_ema) against its own exponential moving average
anchor (θ_ema ← (1−μ)θ_ema + μθ every step), with a leave-one-out baseline over the K samples
of a prompt. The runs' task vectors θ_m − θ_init are merged by per-tensor SLERP, and LITI moves
(1−η)θ_init + η·θ_slerp, which is the next iteration's θ_init.

The last iteration's η sweep measures KL to the stage's input model and reward along the LITI line
next to the individual runs: WARP's claim is that the line reaches each run's reward at less KL.
"""

from __future__ import annotations

import copy
import random

from pydantic import Field, model_validator

from llmfab.data.options import DataOptions
from llmfab.evaluation.gold import GoldEvalConfig, log_gold_eval
from llmfab.losses.rl import masked_entropy, reinforce_loss
from llmfab.models import load_model, save_model
from llmfab.models.merge import ema_update, liti, slerp_state_dicts
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.storage.checkpoint import is_checkpoint
from llmfab.train.config import TrainConfig
from llmfab.train.distributed import whole_weights
from llmfab.train.rl_setup import RLSetup, load_rl_setup
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


class WARPConfig(StageConfig, RolloutConfig, DataOptions):
    runs: int = Field(2, ge=2, description="M: REINFORCE runs per iteration, differing only in data order")
    iterations: int = Field(1, ge=1, description="I: the LITI model of one iteration is the next one's init")
    ema_decay: float = Field(0.01, gt=0, le=1, description="μ: θ_ema ← (1−μ)θ_ema + μθ every rollout")
    eta: float = Field(0.3, ge=0, le=1, description="LITI: θ ← (1−η)θ_init + η·θ_slerp")
    steps_per_rollout: int = Field(1, gt=0, description="optimizer steps on each rollout (REINFORCE: 1)")
    sweep: list[float] = Field(
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], description="η values measured on the last iteration"
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="each run's training")
    eval: GoldEvalConfig = Field(default_factory=GoldEvalConfig)

    @model_validator(mode="after")
    def _check(self):
        tc = self.train
        if tc.max_steps % self.steps_per_rollout or tc.checkpoint_every % self.steps_per_rollout:
            raise ValueError(
                f"train.max_steps ({tc.max_steps}) and train.checkpoint_every ({tc.checkpoint_every}) must be "
                f"multiples of steps_per_rollout ({self.steps_per_rollout})"
            )
        if any(not 0 <= eta <= 1 for eta in self.sweep):
            raise ValueError(f"sweep: every η must be in [0, 1], got {self.sweep}")
        return self


def reinforce_loss_fn(temperature: float):
    def loss_fn(model, batch):
        logps, logits = response_logps(model, batch["input_ids"], batch["mask"], temperature)
        loss = reinforce_loss(logps, batch["advantages"])
        return loss, {"entropy": masked_entropy(logits.detach(), batch["mask"]).item()}  # of the sampled distribution

    return loss_fn


def _train_run(policy, reward_model, tokenizer, prompts, config: WARPConfig, ctx: StageContext, seed: int):
    """One REINFORCE run from `policy`'s weights with an EMA anchor; the prompts come in this run's order."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)  # the only difference between the runs of an iteration
    ema = copy.deepcopy(policy).eval().requires_grad_(False)
    trainer = Trainer(policy, config.train, ctx, reinforce_loss_fn(config.temperature), tokenizer=tokenizer,
                      checkpoint_meta={"stage": "rlhf_warp"}, extra_state=ema)  # fmt: skip
    ema.to(trainer.device)  # next to the policy (a GPU when there is one), as the reward model already is
    scoring = like_training(config.train)

    def build(episode: int):
        if episode:  # the anchor trails the policy by one rollout; restored with the checkpoint on resume
            with whole_weights(policy):  # ZeRO-3: every rank reads the whole policy
                ema_update(ema, policy, config.ema_decay)
        batch = rank_prompts(prompts, episode, config.prompts_per_rollout, order)  # each rank its own
        rows, stats = sample_rollout(
            policy, ema, reward_model, tokenizer, batch, config, seed=rank_seed(seed * 7919 + episode), **scoring
        )
        ctx.log_metrics({f"rollout_{k}": v for k, v in stats.items()}, step=episode * config.steps_per_rollout)
        return rows

    tc = config.train
    trainer.fit(EpisodeBatches(build, config.steps_per_rollout, tc.batch_size, tc.grad_accum, rollout_batch))
    return policy


def frontier_gaps(curve: list[dict], runs: list[dict]) -> list[float]:
    """Per run: the best reward the LITI line reaches at no more KL than the run, minus the run's
    reward (≥ 0: the run is on or below the line's frontier)."""
    gaps = []
    for run in runs:
        reachable = [p["rm_reward"] for p in curve if p["kl"] <= run["kl"]]
        gaps.append((max(reachable) if reachable else float("-inf")) - run["rm_reward"])
    return gaps


def plot_sweep(curve: list[dict], runs: list[dict]):
    """Reward vs KL: the LITI line (η labelled) and the individual runs. A matplotlib Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([p["kl"] for p in curve], [p["rm_reward"] for p in curve], "o-", label="LITI (1−η)θ_init + η·θ_slerp")
    for p in curve:
        ax.annotate(
            f"η={p['eta']:g}", (p["kl"], p["rm_reward"]), fontsize=7, xytext=(3, -9), textcoords="offset points"
        )
    ax.plot([r["kl"] for r in runs], [r["rm_reward"] for r in runs], "s", label="individual runs")
    ax.set(xlabel="KL(π ‖ π_input), nats per response", ylabel="reward-model score", title="WARP: reward vs KL")
    ax.legend()
    return fig


@stage(
    "rlhf_warp",
    WARPConfig,
    inputs={
        "model": "policy checkpoint after SFT: θ_init of the first iteration",
        "reward_model": "reward model that scores the answers",
        "prompts": "prompt dataset",
    },
    optional_inputs={"eval_prompts": "prompt dataset whose test split measures the gold reward and the η sweep"},
    outputs={"model": "the last iteration's LITI policy"},
)
def run(config: WARPConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """M REINFORCE runs with EMA anchors, SLERP of their task vectors, LITI towards the init; iterated."""
    rl = load_rl_setup(inputs, config, reference_is_policy_copy=True)  # the input model: KL of the sweep
    policy, tokenizer, records = rl.policy, rl.tokenizer, rl.eval_records
    log_gold_eval(policy, tokenizer, records, config.eval, ctx, "_before")

    init = {k: v.clone() for k, v in policy.state_dict().items()}
    for i in range(config.iterations):
        done = ctx.output("iterations").sub(f"{i}")
        if is_checkpoint(done):  # finished before a restart
            init = load_model(done.uri).state_dict()
            continue
        runs = []
        for m in range(config.runs):
            policy.load_state_dict(init)
            seed = config.seed * 1000 + i * config.runs + m
            _train_run(policy, rl.reward_model, tokenizer, rl.prompts, config, ctx.child(f"iter{i}_run{m}"), seed)
            runs.append({k: v.detach().cpu().clone() for k, v in policy.state_dict().items()})  # merged on CPU
        merged = slerp_state_dicts(init, runs)
        last = i == config.iterations - 1
        if last and rl.held_out:
            _sweep(rl, init, merged, runs, config, ctx)
        init = liti(init, merged, config.eta)
        policy.load_state_dict(init)
        # Full precision: a rerun resumes from this iteration exactly (the stage's output keeps the input's dtype).
        save_model(policy, tokenizer, done, {"stage": "rlhf_warp", "iteration": i}, dtype="float32")
    policy.load_state_dict(init)
    log_gold_eval(policy, tokenizer, records, config.eval, ctx)
    return {"model": save_model(policy, tokenizer, ctx.output("model"), {"stage": "rlhf_warp", **ctx.metrics})}


def _sweep(rl: RLSetup, init, merged, runs, config: WARPConfig, ctx) -> None:
    """Measure the LITI line (η sweep) and the individual runs on the held-out prompts (loading each state into
    the policy); log a table, a plot and the frontier gaps."""
    policy, scoring = rl.policy, like_training(config.train)

    def measure(state):
        policy.load_state_dict(state)
        seed = config.seed * 7 + 1
        return measure_policy(policy, rl.reference, rl.reward_model, rl.tokenizer, rl.held_out, config, seed, **scoring)

    curve = [{"point": f"eta={eta:g}", "eta": eta, **measure(liti(init, merged, eta))} for eta in config.sweep]
    members = [{"point": f"run{m}", "eta": None, **measure(state)} for m, state in enumerate(runs)]
    gaps = frontier_gaps(curve, members)
    rows = curve + members
    ctx.log_table({k: [r.get(k) for r in rows] for k in rows[0]}, "warp/eta_sweep.json")
    ctx.log_figure(plot_sweep(curve, members), "warp/eta_sweep.png")
    metrics = {f"sweep_eta{p['eta']:g}_{k}": p[k] for p in curve for k in ("kl", "rm_reward")}
    metrics.update({f"sweep_run{m}_{k}": r[k] for m, r in enumerate(members) for k in ("kl", "rm_reward")})
    metrics.update({f"frontier_gap_run{m}": g for m, g in enumerate(gaps)})
    metrics["frontier_gap_min"] = min(gaps)
    ctx.log_metrics(metrics)
