"""Training-memory switches the Trainer applies to the model it takes (TrainConfig.gradient_checkpointing)."""

from __future__ import annotations

import torch


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' per-layer activation recomputation (non-reentrant torch.utils.checkpoint: works with DDP, ZeRO
    and frozen inputs), with the KV cache off while training (recomputation and a cache do not mix). A peft model
    reaches its base's switch through attribute forwarding. Active in train mode only: eval forwards and generate()
    run as before."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise TypeError(f"{type(model).__name__}: no gradient_checkpointing_enable (not a transformers model)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def restore_use_cache(model: torch.nn.Module) -> None:
    """After training: the saved config asks for the KV cache again (what inference wants)."""
    if getattr(model, "is_gradient_checkpointing", False) and getattr(model, "config", None) is not None:
        model.config.use_cache = True
