"""Optimisation settings shared by every training stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from llmfab.config.base import StrictModel


class OptimConfig(StrictModel):
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None turns it off")


class TrainConfig(StrictModel):
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description=(
            "bf16: mixed precision with fp32 master weights. The trained model keeps fp32 weights and AdamW states "
            "(plain torch: matmuls autocast to bf16; DeepSpeed: bf16 working weights and gradients, fp32 master "
            "copy and states in its optimizer), never AdamW on bf16 weights, whose small updates round away; "
            "frozen models the stage holds (reference, reward model, teacher) load in bf16"
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "recompute each decoder layer's activations in the backward instead of keeping them (non-reentrant "
            "torch.utils.checkpoint): about a third more compute for activations of one hidden state per layer"
        ),
    )
    checkpoint_every: int = Field(
        0, ge=0, description="save a resumable checkpoint every N steps (0: none; the stage still writes its output)"
    )
    keep_checkpoints: int = Field(2, ge=1, description="resumable checkpoints kept (older ones deleted)")
    log_every: int = Field(10, gt=0)
    deepspeed: dict[str, Any] | None = Field(None, description="DeepSpeed config (ZeRO stage etc.); None: plain torch")
