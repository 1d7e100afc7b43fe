"""train_tokenizer: a byte-level BPE tokenizer trained on the pre-training corpus."""

from __future__ import annotations

import tempfile

from pydantic import Field

from llmfab.data.io import iter_records
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.storage.checkpoint import write_checkpoint
from llmfab.tokenizer import train_bpe_tokenizer


class TokenizerConfig(StageConfig):
    vocab_size: int = Field(2048, ge=300, description="including the 256 byte symbols and special tokens")
    min_frequency: int = Field(2, ge=1)
    model_max_length: int = Field(2048, gt=0)
    max_chars: int | None = Field(None, gt=0, description="train on at most this many characters")


@stage(
    "train_tokenizer",
    TokenizerConfig,
    inputs={"corpus": "text dataset"},
    outputs={"tokenizer": "tokenizer checkpoint (HF format, with chat template)"},
)
def run(config: TokenizerConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Train a BPE tokenizer with special tokens and a chat template on the corpus."""
    texts, chars = [], 0
    for record in ctx.progress(iter_records(inputs["corpus"], "text", "train"), desc="read corpus"):
        texts.append(record["text"])
        chars += len(record["text"])
        if config.max_chars and chars >= config.max_chars:
            break
    tokenizer = train_bpe_tokenizer(texts, config.vocab_size, config.min_frequency, config.model_max_length)
    n_tokens = sum(len(ids) for ids in tokenizer(texts[:500])["input_ids"])
    sample_chars = sum(len(t) for t in texts[:500])
    ctx.log_metrics(
        {"vocab_size": len(tokenizer), "train_chars": chars, "chars_per_token": sample_chars / max(1, n_tokens)}
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        uri = write_checkpoint(ctx.output("tokenizer"), tmp, meta={"kind": "tokenizer", "vocab_size": len(tokenizer)})
    return {"tokenizer": uri}
