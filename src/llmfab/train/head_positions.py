"""The LM head on the positions that carry loss only.

A causal LM's head (hidden → vocabulary) and the log-softmax after it cost as much as a few decoder layers at
a small width, and most positions of a training batch carry no loss (prompts, padding, SFT's user turns).
`logits_at` runs the model's own forward, through whatever wraps it (DDP, DeepSpeed's engine, PEFT), with a
pre-hook on its output head that hands the head only the hidden states at the given positions: the model
then applies its own head as a module call (ZeRO-3 gathers its weight in the call; tied embeddings stay
tied) and its own post-processing (Gemma 2's final-logit softcapping), and the (B, T, V) logits never exist.

Even the loss positions' logits are too many at scale: 32k positions of a 152k vocabulary are 5e9 floats (20 GB in
fp32, and their log-softmax as much again). `target_logps_at` computes them LOGITS_BUDGET elements at a time, each
chunk's logits recomputed in the backward instead of kept: no more than one chunk's logits ever exist.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from llmfab.losses.preference import target_logps

# Logits materialised at once by target_logps_at, in elements: 2^26, 256 MB in fp32.
LOGITS_BUDGET = 1 << 26


def _causal_lm(model):
    """`model`, or the model a wrapper holds (DDP's and DeepSpeed's `module`, lora.AdapterOff's `model`), that
    has output embeddings; None when none does."""
    inner = model
    while not hasattr(inner, "get_output_embeddings"):
        inner = getattr(inner, "module", None) or getattr(inner, "model", None)
        if inner is None:
            return None
    return inner


def output_head(model) -> torch.nn.Module | None:
    """The output embeddings of `model` or of the model a wrapper holds (None: none found)."""
    inner = _causal_lm(model)
    return None if inner is None else inner.get_output_embeddings()


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


def fits_budget(model, positions: int) -> bool:
    """Whether the logits of `positions` positions stay within LOGITS_BUDGET (or the head's width is unknown)."""
    vocab = getattr(output_head(model), "out_features", None)
    return vocab is None or positions * vocab <= LOGITS_BUDGET


def target_logps_at(model, index: torch.Tensor, targets: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """log softmax(logits)[target] (K,) at the flattened positions `index` (K,) of `model(**forward_kwargs)`, for
    next tokens `targets` (K,). Within LOGITS_BUDGET: target_logps of `logits_at`. Beyond it, the forward hands
    the head no rows and keeps the hidden states at `index`; the head (with the model's final softcap) then runs
    on LOGITS_BUDGET / V of them at a time under activation checkpointing."""
    if fits_budget(model, len(index)):
        return target_logps(logits_at(model, index, **forward_kwargs), targets)
    head = output_head(model)
    vocab = head.out_features
    kept = []

    def keep(_module, args):
        hidden, *rest = args
        kept.append(hidden.flatten(0, -2).index_select(0, index))
        return (kept[-1][:0], *rest)  # the model's forward ends with (0, V) logits

    hook = head.register_forward_pre_hook(keep)
    try:
        model(**forward_kwargs, use_cache=False)
    finally:
        hook.remove()
    hidden = kept[-1]
    softcap = getattr(getattr(_causal_lm(model), "config", None), "final_logit_softcapping", None)
    rows = max(1, LOGITS_BUDGET // vocab)
    chunks = [
        checkpoint(_chunk_logps, head, hidden[i : i + rows], targets[i : i + rows], softcap, use_reentrant=False)
        for i in range(0, len(index), rows)
    ]
    return torch.cat(chunks)


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden)
    if softcap:  # as Gemma 2's forward caps its logits: cap · tanh(logits / cap)
        logits = torch.tanh(logits / softcap) * softcap
    return target_logps(logits, targets)
