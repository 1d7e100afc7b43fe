"""The model a training stage starts from: its `init` checkpoint, or its model config built from scratch; either
fitted to the stage's tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

from llmfab.config.model import ModelConfig
from llmfab.errors import ConfigError
from llmfab.models.architectures import build_model
from llmfab.models.checkpoints import load_model, resolve_ref
from llmfab.models.embeddings import match_vocab
from llmfab.tokenizer import load_tokenizer, special_token_ids

log = logging.getLogger(__name__)


def check_same_tokens(folder: str, tokenizer, ref: str) -> None:
    """A checkpoint that carries its tokenizer trains on only with that one, or one that extends it (e.g. an adopted
    tokenizer with added turn tokens): every token the model learned must keep its id. Raises ConfigError."""
    if not (Path(folder) / "tokenizer.json").is_file():
        return  # a bare model (e.g. a hub id's weights): nothing to compare with
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
    if init_ref:
        folder = resolve_ref(init_ref)
        check_same_tokens(folder, tokenizer, init_ref)
        model = load_model(folder, dtype=cfg.dtype if cfg else "float32")
        match_vocab(model, tokenizer)
        return model
    if cfg is None:
        raise ConfigError("model: required when the stage has no `init` checkpoint input")
    if cfg.pretrained is None and cfg.vocab_size < len(tokenizer):
        log.info("model.vocab_size %d -> %d (the tokenizer's)", cfg.vocab_size, len(tokenizer))
        cfg = cfg.model_copy(update={"vocab_size": len(tokenizer)})
    model = build_model(cfg, seed=seed, **special_token_ids(tokenizer))
    match_vocab(model, tokenizer)  # a pretrained model may predate tokens the tokenizer stage added
    return model
