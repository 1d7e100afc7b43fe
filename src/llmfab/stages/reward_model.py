"""reward_model: a Bradley–Terry reward model (scalar head read at a conversation's last token, see
train/pairs), with Llama 2 margins, Llama 3.1's dropping of weak pairs, AFM's soft labels per preference
level, and WARM (a uniform average of several reward models fine-tuned from one init)."""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from llmfab.data.io import read_dataset
from llmfab.data.options import DataOptions
from llmfab.errors import DataError
from llmfab.losses.preference import bradley_terry_loss
from llmfab.models import load_tokenizer
from llmfab.models.merge import average_state_dicts
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.tracking import timing
from llmfab.train.config import TrainConfig
from llmfab.train.distributed import micro_batches_per_step
from llmfab.train.lora import LoraConfig, load_trainable, save_trained
from llmfab.train.pairs import AFM_LEVEL_LABELS, encode_pairs, pair_batch, pair_rewards, trim
from llmfab.train.trainer import Trainer

LLAMA2_LEVEL_MARGINS = (1.0, 2 / 3, 1 / 3, 0.0)


class RewardModelConfig(DataOptions, StageConfig):
    max_len: int = Field(256, gt=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    margin: Literal["none", "record", "level"] = Field(
        "none", description="record: each pair's `margin`; level: Llama 2's margin per preference level"
    )
    level_margins: tuple[float, float, float, float] = LLAMA2_LEVEL_MARGINS
    drop_levels: list[int] = Field(
        default_factory=list, description="preference levels dropped from training (Llama 3.1 drops the weak ones)"
    )
    soft_labels: bool = Field(False, description="AFM: P(chosen better) = 0.95/0.85/0.75/0.65 by level")
    warm: int = Field(
        1, ge=1, description="WARM: reward models fine-tuned from one init (data orders differ), averaged uniformly"
    )
    eval_pairs: int = Field(512, gt=0, description="held-out pairs scored for accuracy")
    lora: LoraConfig | None = Field(
        None, description="LoRA / QLoRA adapters on a frozen base (the score head trains whole); None: full"
    )

    @field_validator("lora")
    @classmethod
    def _reward_model_lora(cls, lora: LoraConfig | None, info: ValidationInfo):
        if lora is not None and lora.save == "adapter":
            # load_model applies adapters to causal LMs only; a reward model's checkpoint is a whole classifier.
            raise ValueError("save=adapter: a reward model is saved merged (save=merged)")
        if lora is not None and lora.quantize and info.data.get("warm", 1) > 1:
            raise ValueError("quantize with warm > 1: WARM averages whole weights, here 4-bit ones; train one (warm=1)")
        return lora


def reward_loss(config: RewardModelConfig):
    def loss_fn(model, batch):
        chosen, rejected = pair_rewards(model, batch)
        margin = batch["margin"] if config.margin != "none" else None
        label = batch["label"] if config.soft_labels else None
        loss = bradley_terry_loss(chosen, rejected, margin, label)
        return loss, {"accuracy": (chosen > rejected).float().mean().item()}

    return loss_fn


@torch.no_grad()
@timing.timed("score")
def pairwise_accuracy(model, rows: dict[str, torch.Tensor], levels: list[int | None], batch_size: int = 32):
    """Held-out accuracy (chosen scored above rejected) overall and per preference level."""
    model.eval()
    device = next(model.parameters()).device
    correct = []
    for i in range(0, len(rows["chosen_ids"]), batch_size):
        batch = trim({k: v[i : i + batch_size].to(device) for k, v in rows.items()})
        chosen, rejected = pair_rewards(model, batch)
        correct.extend((chosen > rejected).tolist())
    out = {"eval_accuracy": sum(correct) / len(correct)}
    by_level = defaultdict(list)
    for level, ok in zip(levels, correct, strict=True):
        if level is not None:
            by_level[level].append(ok)
    out.update({f"eval_accuracy_level{lv}": sum(v) / len(v) for lv, v in sorted(by_level.items())})
    return out


def _with_margins(records: list[dict], config: RewardModelConfig) -> list[dict]:
    if config.margin != "level":
        return records
    return [{**r, "margin": config.level_margins[r["level"]] if r.get("level") is not None else 0.0} for r in records]


@stage(
    "reward_model",
    RewardModelConfig,
    inputs={"init": "checkpoint the reward model starts from (any size)", "data": "preference dataset (train/test)"},
    outputs={"model": "reward model checkpoint (sequence classification, one score)"},
)
def run(config: RewardModelConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Bradley–Terry reward model with margins, weak-pair dropping, soft labels and WARM."""
    tokenizer = load_tokenizer(inputs["init"])
    train = [
        r
        for r in read_dataset(inputs["data"], "preference", "train", options=config)
        if r.get("level") not in config.drop_levels
    ]
    if not train:
        raise DataError(f"{inputs['data']}: no training pairs left after dropping levels {config.drop_levels}")
    test = read_dataset(inputs["data"], "preference", "test", limit=config.eval_pairs, options=config)
    rows = encode_pairs(
        tokenizer,
        _with_margins(train, config),
        config.max_len,
        level_labels=AFM_LEVEL_LABELS if config.soft_labels else None,
        where=inputs["data"],
        num_proc=config.num_proc,
    )
    test_rows = encode_pairs(
        tokenizer, test, config.max_len, where=f"{inputs['data']} (test)", num_proc=config.num_proc
    )
    levels = [r.get("level") for r in test]
    if len(levels) != len(test_rows["chosen_ids"]):
        levels = [None] * len(test_rows["chosen_ids"])  # some were too long: per-level counts would misalign

    def evaluate(model):
        return pairwise_accuracy(model, test_rows, levels, config.train.batch_size)

    tc = config.train
    states, n = [], len(rows["chosen_ids"])
    ctx.log_params({"train_pairs": n, "test_pairs": len(test_rows["chosen_ids"])})
    for i in range(config.warm):
        member = ctx.child(f"rm{i}") if config.warm > 1 else ctx
        # Every member starts from the same init, the new score head's included: WARM averages weights, which
        # only makes sense for models fine-tuned from one init. They differ in data order alone.
        torch.manual_seed(config.seed)
        model = load_trainable(inputs["init"], config.lora, kind="reward", seed=config.seed)
        if i == 0:
            ctx.log_params({"parameters": sum(p.numel() for p in model.parameters())})
            ctx.log_metrics({f"{k}_before": v for k, v in evaluate(model).items()})
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + i))  # data order differs
        member_rows = {k: v[order] for k, v in rows.items()}

        def batches(step, micro, member_rows=member_rows):
            return pair_batch(member_rows, step, micro, tc.batch_size, micro_batches_per_step(tc.grad_accum))

        trainer = Trainer(
            model, tc, member, reward_loss(config), tokenizer=tokenizer, checkpoint_meta={"stage": "reward_model"}
        )
        trainer.fit(batches)
        member.log_metrics(evaluate(model))
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    if config.warm > 1:
        model.load_state_dict(average_state_dicts(states))
        ctx.log_metrics(evaluate(model))
    meta = {"stage": "reward_model", **ctx.metrics}
    return {"model": save_trained(model, tokenizer, ctx.output("model"), meta, config.lora, inputs["init"], "reward")}
