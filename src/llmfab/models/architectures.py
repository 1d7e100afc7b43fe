"""Qwen2, Gemma 2, Llama and AFM decoders from a ModelConfig, at any size.

AFM has no transformers class of its own: its published shape (pre-norm RMSNorm decoder, GQA,
SwiGLU, RoPE, shared input/output embeddings) is a Llama decoder with tied embeddings.
"""

from __future__ import annotations

import torch

from llmfab.config.model import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        from llmfab.models.checkpoints import load_model

        return load_model(cfg.pretrained, dtype=cfg.dtype, device=device)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(build_hf_config(cfg, **special_tokens), dtype=DTYPES[cfg.dtype])
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())


def check_same_tokens(folder: str, tokenizer, ref: str) -> None:
    """A checkpoint that carries its tokenizer trains on only with that one, or one that extends it (e.g. an adopted
    tokenizer with added turn tokens): every token the model learned must keep its id. Raises ConfigError."""
    from pathlib import Path

    from llmfab.errors import ConfigError

    if not (Path(folder) / "tokenizer.json").is_file():
        return  # a bare model (e.g. a hub id's weights): nothing to compare with
    from llmfab.models.checkpoints import load_tokenizer

    own = load_tokenizer(folder).get_vocab()
    given = tokenizer.get_vocab()
    moved = sorted((i, t) for t, i in own.items() if given.get(t) != i)
    if moved:
        i, token = moved[0]
        raise ConfigError(
            f"tokenizer does not match model {ref}: {len(moved)} of its {len(own)} tokens have another id or are "
            f"missing (e.g. {token!r}: id {i} in the model's tokenizer, {given.get(token)} in the one given); "
            "give the tokenizer the model was trained with, or one that extends it"
        )


def init_model(cfg: ModelConfig | None, init_ref: str | None, tokenizer, *, seed: int = 0):
    """The model a training stage starts from: the `init` checkpoint if given, else `cfg` built
    from scratch with its vocab_size grown to the tokenizer's length when that is larger (never shrunk:
    rows beyond the tokenizer are kept, as hub checkpoints pad theirs), and the tokenizer's special-token
    ids. A loaded model whose embeddings are smaller than the tokenizer is resized to it."""
    import logging

    from llmfab.errors import ConfigError
    from llmfab.models.embeddings import match_vocab

    if init_ref:
        from llmfab.models.checkpoints import load_model, resolve_ref

        folder = resolve_ref(init_ref)
        check_same_tokens(folder, tokenizer, init_ref)
        model = load_model(folder, dtype=cfg.dtype if cfg else "float32")
        match_vocab(model, tokenizer)
        return model
    if cfg is None:
        raise ConfigError("model: required when the stage has no `init` checkpoint input")
    if cfg.pretrained is None and cfg.vocab_size < len(tokenizer):
        logging.getLogger(__name__).info("model.vocab_size %d -> %d (the tokenizer's)", cfg.vocab_size, len(tokenizer))
        cfg = cfg.model_copy(update={"vocab_size": len(tokenizer)})
    from llmfab.tokenizer import special_token_ids

    model = build_model(cfg, seed=seed, **special_token_ids(tokenizer))
    match_vocab(model, tokenizer)  # a pretrained model may predate tokens the tokenizer stage added
    return model
