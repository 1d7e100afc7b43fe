"""dpo: offline DPO on preference pairs with precomputed reference log-probs; the Llama 3.1
variant (formatting tokens masked, + 0.2 NLL on chosen) and Qwen2's Online Merging Optimizer."""

from __future__ import annotations

import torch
from pydantic import Field

from llmfab.data.io import read_dataset
from llmfab.data.options import DataOptions
from llmfab.evaluation.gold import GoldEvalConfig, eval_records, log_gold_eval
from llmfab.models import load_model, load_tokenizer
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.config import TrainConfig
from llmfab.train.distributed import frozen_model, micro_batches_per_step, release_frozen
from llmfab.train.dpo import DPOLossConfig, dpo_loss_fn, online_merging_wrapper
from llmfab.train.lora import AdapterOff, LoraConfig, load_trainable, save_trained
from llmfab.train.pairs import encode_pairs, pair_batch, reference_logps
from llmfab.train.trainer import Trainer


class DPOConfig(StageConfig, DPOLossConfig, DataOptions):
    max_len: int = Field(256, gt=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig | None = Field(
        None, description="LoRA / QLoRA adapters on a frozen base, which is also the reference; None: full fine-tuning"
    )
    eval: GoldEvalConfig = Field(default_factory=GoldEvalConfig)


@stage(
    "dpo",
    DPOConfig,
    inputs={"model": "policy checkpoint (typically the SFT model)", "data": "preference dataset"},
    optional_inputs={
        "reference": "reference policy (default: the `model` input)",
        "base": "pretrained model the policy was fine-tuned from (optimizer=online_merging)",
        "eval_prompts": "prompt dataset whose test split measures the gold reward",
    },
    outputs={"model": "DPO-trained checkpoint"},
)
def run(config: DPOConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Offline DPO (sigmoid, sequence-summed log-probs), Llama 3.1 variant and OnDARE optional."""
    tokenizer = load_tokenizer(inputs["model"])
    model = load_trainable(inputs["model"], config.lora, seed=config.seed)
    train = read_dataset(inputs["data"], "preference", "train", options=config)
    rows = encode_pairs(
        tokenizer,
        train,
        config.max_len,
        mask_formatting=config.mask_formatting,
        where=inputs["data"],
        num_proc=config.num_proc,
    )
    order = torch.randperm(len(rows["chosen_ids"]), generator=torch.Generator().manual_seed(config.seed))
    tc = config.train
    # The seed sets the data order; batches are consecutive slices of it, so a run of S steps reads only
    # its first S x batch pairs: the reference scores those, not the whole dataset (3.5x fewer on tiny).
    used = min(len(order), tc.max_steps * micro_batches_per_step(tc.grad_accum) * tc.batch_size)
    rows = {k: v[order[:used]] for k, v in rows.items()}
    if config.lora is not None and "reference" not in inputs:
        reference = AdapterOff(model)  # the base itself: no second copy of the weights
    else:
        # Under ZeRO-3 partitioned like the policy will be (every rank scores the same pairs: same forwards).
        reference = frozen_model(load_model(inputs.get("reference", inputs["model"])), tc)
    rows["ref_chosen"], rows["ref_rejected"] = reference_logps(reference, rows, tc.batch_size, tc.precision)
    release_frozen(reference)
    del reference
    ctx.log_params({"train_pairs": len(order), "train_pairs_used": used})
    records = eval_records(config.eval, inputs, ("data", "preference"), config)
    log_gold_eval(model, tokenizer, records, config.eval, ctx, "_before")
    trainer = Trainer(
        model,
        tc,
        ctx,
        dpo_loss_fn(config),
        tokenizer=tokenizer,
        checkpoint_meta={"stage": "dpo"},
        wrap_optimizer=online_merging_wrapper(config, model, inputs.get("base"), config.seed),
    )
    trainer.fit(lambda step, micro: pair_batch(rows, step, micro, tc.batch_size, micro_batches_per_step(tc.grad_accum)))
    log_gold_eval(model, tokenizer, records, config.eval, ctx)
    meta = {"stage": "dpo", **ctx.metrics}
    return {"model": save_trained(model, tokenizer, ctx.output("model"), meta, config.lora, inputs["model"])}
