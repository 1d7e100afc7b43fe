"""DPO training pieces shared by the offline (dpo) and online (online_dpo) stages."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.errors import ConfigError
from llmfab.losses.preference import dpo_loss, length_normalized_nll_of, masked_logps_sum
from llmfab.train.online_merging import OnlineMergingOptimizer
from llmfab.train.pairs import packed_token_logps, stacked, stacked_lengths


class DPOLossConfig(StrictModel):
    beta: float = Field(0.1, gt=0)
    nll_weight: float = Field(
        0.0, ge=0, description="Llama 3.1: + 0.2 x NLL on the chosen responses (per token of each, mean over pairs)"
    )
    mask_formatting: bool = Field(
        False, description="Llama 3.1: formatting tokens (headers, terminators) carry no loss"
    )
    optimizer: Literal["adamw", "online_merging"] = Field(
        "adamw", description="online_merging: Qwen2's OnDARE around AdamW (needs the `base` input)"
    )
    keep_prob: float = Field(0.01, gt=0, le=1, description="online_merging: DARE keep probability of the Adam delta")
    merge_alpha: float = Field(1e-6, ge=0, description="online_merging: weight of the reference task vector per step")


def dpo_loss_fn(config: DPOLossConfig):
    """Loss over a pair batch carrying `ref_chosen` / `ref_rejected` (precomputed reference log-probs)."""

    def loss_fn(model, batch):
        ids, mask = stacked(batch)
        n = len(batch["chosen_ids"])
        scored = mask
        if config.nll_weight:  # the NLL reads the whole chosen response, formatting tokens included
            scored = mask + torch.cat([batch["chosen_full_mask"], torch.zeros_like(batch["rejected_mask"])])
        token_logps = packed_token_logps(model, ids, stacked_lengths(batch), scored.clamp_max(1))
        chosen, rejected = masked_logps_sum(token_logps, mask).chunk(2)
        losses, chosen_r, rejected_r = dpo_loss(
            chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], config.beta
        )
        loss = losses.mean()
        metrics = {
            "reward_accuracy": (chosen_r > rejected_r).float().mean().item(),
            "reward_margin": (chosen_r - rejected_r).mean().item(),
            "logps_chosen": chosen.mean().item(),
        }
        if config.nll_weight:
            nll = length_normalized_nll_of(token_logps[:n], batch["chosen_full_mask"])
            loss = loss + config.nll_weight * nll
            metrics["nll_chosen"] = nll.item()
        return loss, metrics

    return loss_fn


def online_merging_wrapper(config: DPOLossConfig, model, base_ref: str | None, seed: int):
    """The Trainer's optimizer wrapper for optimizer=online_merging: τ_r = θ_SFT - θ_base, with
    θ_SFT the policy this stage starts from and θ_base the pretrained model."""
    if config.optimizer != "online_merging":
        return None
    if base_ref is None:
        raise ConfigError("optimizer=online_merging needs the `base` input (the model SFT started from)")
    from llmfab.train.lora import is_lora

    if is_lora(model):  # it merges whole weights' task vectors; a LoRA run trains adapters only
        raise ConfigError("optimizer=online_merging does not run with lora (it merges full weights); drop one")
    from llmfab.models import load_model

    base = dict(load_model(base_ref).named_parameters())
    names = {p: n for n, p in model.named_parameters()}
    missing = sorted(n for n in names.values() if n not in base)
    if missing:
        raise ConfigError(f"base model lacks parameters {missing[:3]}: it must share the policy's architecture")
    with torch.no_grad():
        tau = {p: (p.detach().float() - base[n].detach().float()).to(p.dtype) for p, n in names.items()}

    def wrap(inner):
        return OnlineMergingOptimizer(inner, tau, keep_prob=config.keep_prob, alpha=config.merge_alpha, seed=seed)

    return wrap
