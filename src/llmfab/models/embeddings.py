"""Fit a model's embeddings to a tokenizer whose vocabulary changed (e.g. an adopted tokenizer that
got a pad or turn token)."""

from __future__ import annotations

import logging

import torch

from llmfab.tokenizer import special_token_ids

log = logging.getLogger(__name__)


@torch.no_grad()
def resize_embeddings(model, new_size: int) -> int:
    """Resize the input and output embeddings to `new_size` rows; new rows are the mean of the old
    ones (a neutral start: logits of a new token are the average logit). Returns the old size."""
    old_in = model.get_input_embeddings().weight
    old_size = old_in.shape[0]
    if new_size == old_size:
        return old_size
    out = model.get_output_embeddings()
    untied_out = out is not None and out.weight.data_ptr() != old_in.data_ptr()
    mean_in = old_in.float().mean(0)
    mean_out = out.weight.float().mean(0) if untied_out else None
    mean_bias = out.bias.float().mean() if untied_out and getattr(out, "bias", None) is not None else None
    model.resize_token_embeddings(new_size, mean_resizing=False)
    if new_size > old_size:
        emb = model.get_input_embeddings().weight
        emb[old_size:] = mean_in.to(emb.dtype)
        if untied_out:
            out = model.get_output_embeddings()
            out.weight[old_size:] = mean_out.to(out.weight.dtype)
            if mean_bias is not None:
                out.bias[old_size:] = mean_bias.to(out.bias.dtype)
    return old_size


def match_vocab(model, tokenizer) -> bool:
    """Grow the model's embeddings when the tokenizer has more tokens than it has rows, and set the
    tokenizer's pad/eos/bos ids where the model's config has none. A model with more rows than
    tokens (hub checkpoints pad their matrices, e.g. Qwen2's 151936 rows for 151646 tokens) is left
    as it is, so its shapes stay those of the released weights. Returns whether it was resized."""
    rows = model.get_input_embeddings().weight.shape[0]
    resized = len(tokenizer) > rows
    if resized:
        resize_embeddings(model, len(tokenizer))
        log.info("model embeddings resized %d -> %d rows (the tokenizer's length)", rows, len(tokenizer))
    for key, value in special_token_ids(tokenizer).items():
        if value is not None and getattr(model.config, key, None) is None:
            setattr(model.config, key, value)
    return resized
