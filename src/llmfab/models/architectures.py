"""Qwen2, Gemma 2, Llama and AFM decoders from a ModelConfig, at any size.

AFM has no transformers class of its own: its published shape (pre-norm RMSNorm decoder, GQA,
SwiGLU, RoPE, shared input/output embeddings) is a Llama decoder with tied embeddings.
"""

from __future__ import annotations

import torch

from llmfab.config.model import ModelConfig
from llmfab.models.checkpoints import load_model
from llmfab.models.dtypes import DTYPES


def _rope(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(
            rope_type=cfg.rope_scaling.type,
            factor=cfg.rope_scaling.factor,
            original_max_position_embeddings=cfg.rope_scaling.original_max_position_embeddings,
        )
    return rope


def build_hf_config(cfg: ModelConfig, **special_tokens):
    """The transformers config for `cfg`; `special_tokens` are pad/bos/eos ids from the tokenizer."""
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=_rope(cfg),
        tie_word_embeddings=cfg.tie_word_embeddings,
        **special_tokens,
    )
    if cfg.arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if cfg.arch == "gemma2":
        return Gemma2Config(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=cfg.sliding_window or cfg.max_position_embeddings,
            attn_logit_softcapping=cfg.attn_logit_softcapping,
            final_logit_softcapping=cfg.final_logit_softcapping,
        )
    return LlamaConfig(**common, head_dim=head_dim)


def build_model(cfg: ModelConfig, *, seed: int = 0, device: str | torch.device = "cpu", **special_tokens):
    """A randomly initialised model (seeded), or the pretrained one `cfg.pretrained` names."""
    if cfg.pretrained:
        return load_model(cfg.pretrained, dtype=cfg.dtype, device=device)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(build_hf_config(cfg, **special_tokens), dtype=DTYPES[cfg.dtype])
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    # A ZeRO-3 partitioned parameter holds a slice; ds_numel is its whole size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in params.values())
