"""The LM head on the positions that carry loss only.

A causal LM's head (hidden → vocabulary) and the log-softmax after it cost as much as a few decoder layers at
a small width, and most positions of a training batch carry no loss (prompts, padding, SFT's user turns).
`logits_at` runs the model's own forward, through whatever wraps it (DDP, DeepSpeed's engine, PEFT), with a
pre-hook on its output head that hands the head only the hidden states at the given positions: the model
then applies its own head as a module call (ZeRO-3 gathers its weight in the call; tied embeddings stay
tied) and its own post-processing (Gemma 2's final-logit softcapping), and the (B, T, V) logits never exist.
"""

from __future__ import annotations

import contextlib

import torch


def output_head(model) -> torch.nn.Module | None:
    """The output embeddings of `model` or of the model a wrapper holds: DDP's and DeepSpeed's `module`,
    lora.AdapterOff's `model` (None: none found)."""
    inner = model
    while not hasattr(inner, "get_output_embeddings"):
        inner = getattr(inner, "module", None) or getattr(inner, "model", None)
        if inner is None:
            return None
    return inner.get_output_embeddings()


@contextlib.contextmanager
def head_on(model, index: torch.Tensor):
    """Within the block, a forward of `model` returns logits (K, V) of the flattened positions `index` (K,)
    of its (B, T) input instead of (B, T, V). Yields False when the model has no output head to hook (the
    caller then selects from the full logits itself)."""
    head = output_head(model)
    if head is None:
        yield False
        return

    def select(_module, args):
        hidden, *rest = args
        return (hidden.flatten(0, -2).index_select(0, index), *rest)

    hook = head.register_forward_pre_hook(select)
    try:
        yield True
    finally:
        hook.remove()


def logits_at(model, index: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """(K, V) logits of `model(**forward_kwargs)` at the flattened positions `index` of its input."""
    with head_on(model, index) as hooked:
        logits = model(**forward_kwargs, use_cache=False).logits
    return logits if hooked else logits.flatten(0, -2).index_select(0, index)
