"""Tiny stand-ins for hub models: a Qwen2, a Llama 3.1 and a Gemma 2, each saved by transformers with a
byte-level BPE tokenizer holding its family's special tokens and OFFICIAL chat template (the Llama one,
like every Llama 3.x base, without a pad token or a config pad_token_id), and a fake offline hub cache
that serves one of them as hf://ORG/NAME."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmfab.chat_templates import GEMMA2, LLAMA31, QWEN2

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "What is two plus three? Five. Spell apple backwards: elppa. Hello, world!",
    "Tools, dates and system prompts: you are a helpful assistant that answers briefly.",
] * 20


@dataclass(frozen=True)
class Family:
    arch: str
    special: tuple[str, ...]  # in vocabulary order
    tokens: dict  # transformers tokenizer kwargs (bos/eos/pad)
    template: str
    config: dict  # transformers config kwargs beyond the tiny shape


FAMILIES = {
    "qwen2": Family(
        "qwen2",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        QWEN2,
        {"tie_word_embeddings": True},
    ),
    "llama": Family(
        "llama",
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|finetune_right_pad_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ),
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},  # no pad, as every Llama 3.x
        LLAMA31,
        {},
    ),
    "gemma2": Family(
        "gemma2",
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
        GEMMA2,
        {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 32},
    ),
}


def tiny_tokenizer(family: Family, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    named = set(family.tokens.values())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=[t for t in family.special if t not in named],
        **family.tokens,
    )
    fast.chat_template = family.template
    return fast


def tiny_model(family: Family, tokenizer):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(
        family.arch,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **family.config,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def save_hub_model(name: str, folder: Path) -> Path:
    """The `name` family's tiny model and tokenizer, saved as a hub repo holds them."""
    family = FAMILIES[name]
    tokenizer = tiny_tokenizer(family)
    tiny_model(family, tokenizer).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def fake_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = "a" * 40) -> Path:
    """A hub cache (HF_HUB_CACHE layout) holding `source`'s files as repo `repo_id` at `commit` on main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot
