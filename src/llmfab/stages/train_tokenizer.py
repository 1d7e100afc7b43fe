"""train_tokenizer: the pipeline's tokenizer, trained (byte-level BPE) or adopted, with a
multilingual coverage report."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from typing import Literal

from pydantic import Field, model_validator

from llmfab.config.base import StrictModel
from llmfab.data import multilingual
from llmfab.data.io import iter_records
from llmfab.data.options import DataOptions
from llmfab.errors import DataError
from llmfab.evaluation import tokenizer_report as report
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.storage.checkpoint import write_checkpoint
from llmfab.tokenizer import CHAT_FORMATS, adopt_tokenizer, train_bpe_tokenizer, train_char_bpe_tokenizer


class ReportConfig(StrictModel):
    """Fertility, compression and unknown-rate per language on held-out multilingual text, for the
    stage's tokenizer and for a sweep of vocabulary sizes."""

    languages: list[str] = Field(default_factory=lambda: list(multilingual.LANGUAGES))
    vocab_sizes: list[int] = Field(
        default_factory=list,
        description="sweep: a byte-level BPE per size, trained on the corpus (capped at corpus_chars) plus the "
        "multilingual training split",
    )
    corpus_chars: int = Field(200_000, ge=0, description="pipeline-corpus characters in each sweep tokenizer's data")
    held_out: float = Field(0.2, gt=0, lt=1, description="share of each language's phrases only measured on")
    no_byte_baseline: bool = Field(
        True, description="also a character BPE without byte fallback at the largest sweep size (its unknown rate)"
    )

    @model_validator(mode="after")
    def _check(self):
        unknown = sorted(set(self.languages) - set(multilingual.LANGUAGES))
        if unknown:
            raise ValueError(f"unknown language(s) {', '.join(unknown)}; known: {', '.join(multilingual.LANGUAGES)}")
        if any(v < 300 for v in self.vocab_sizes):
            raise ValueError("vocab_sizes: each must be >= 300 (256 byte symbols + special tokens + merges)")
        return self


class TokenizerConfig(DataOptions, StageConfig):
    source: Literal["train", "adopt"] = Field("train", description="train a byte-level BPE, or adopt `path`")
    path: str | None = Field(None, description="adopt: a hub id, a local folder or a store URI")
    chat_format: Literal["chatml", "llama3", "gemma"] | None = Field(
        "chatml",
        description="special tokens and chat template (Qwen2/AFM: chatml, Llama 3.1: llama3, Gemma 2: gemma); "
        "adopt with null keeps the adopted template",
    )
    vocab_size: int = Field(2048, ge=300, description="train: including the 256 byte symbols and special tokens")
    min_frequency: int = Field(2, ge=1)
    model_max_length: int | None = Field(None, gt=0, description="default: 2048 when trained, as adopted")
    max_chars: int | None = Field(None, gt=0, description="train on at most this many corpus characters")
    multilingual: bool = Field(False, description="train: add the multilingual training split to the corpus")
    report: ReportConfig | None = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _check_source(self):
        if self.source == "adopt" and not self.path:
            raise ValueError("source 'adopt' needs `path` (hub id, folder or store URI)")
        if self.source == "train" and self.path:
            raise ValueError("`path` is only for source 'adopt'")
        if self.source == "train" and self.chat_format is None:
            raise ValueError(f"a trained tokenizer needs a chat_format ({', '.join(CHAT_FORMATS)})")
        return self


def _first_chars(texts: Iterable[str], max_chars: int | None, cut: bool = False) -> list[str]:
    """Texts in order until `max_chars` characters are taken; with `cut` the last one is cut to fit."""
    out, chars = [], 0
    for text in texts:
        if max_chars is not None and chars >= max_chars:
            break
        out.append(text[: max_chars - chars] if cut else text)
        chars += len(out[-1])
    return out


def _multilingual_train(config: ReportConfig | None, languages: list[str], seed: int) -> list[str]:
    held_out = config.held_out if config else ReportConfig().held_out
    return [d for code in languages for d in multilingual.documents(code, "train", held_out=held_out, seed=seed)]


def multilingual_report(tokenizer, corpus: list[str], config: TokenizerConfig, ctx: StageContext) -> list[dict]:
    """Measure the stage's tokenizer and the sweep on the held-out phrases; log metrics, table, plot."""
    rc = config.report
    held_out = {code: multilingual.documents(code, "test", held_out=rc.held_out) for code in rc.languages}
    rows = report.language_rows("output", tokenizer, held_out)
    ctx.log_metrics(report.row_metrics(rows))
    if rc.vocab_sizes:
        capped = _first_chars(corpus, rc.corpus_chars, cut=True)
        texts = capped + _multilingual_train(rc, rc.languages, config.seed)
        for size in sorted(rc.vocab_sizes):
            swept = train_bpe_tokenizer(texts, size, config.min_frequency)
            sweep_rows = report.language_rows(str(size), swept, held_out)
            ctx.log_metrics(report.row_metrics(sweep_rows, f"_{size}"))
            rows += sweep_rows
        if rc.no_byte_baseline:
            size = max(rc.vocab_sizes)
            base_rows = report.language_rows(f"char-bpe {size}", train_char_bpe_tokenizer(texts, size), held_out)
            ctx.log_metrics(report.row_metrics(base_rows, "_nobyte"))
            rows += base_rows
    ctx.log_table(report.as_table(rows), "tokenizer_report.json")
    ctx.log_figure(report.plot(rows, [str(size) for size in sorted(rc.vocab_sizes)]), "tokenizer_report.png")
    return rows


@stage(
    "train_tokenizer",
    TokenizerConfig,
    inputs={"corpus": "text dataset (trained on; mixed into the report's sweep)"},
    outputs={"tokenizer": "tokenizer checkpoint (HF format, with chat template)"},
)
def run(config: TokenizerConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Train a byte-level BPE (or adopt a tokenizer) with a family's chat template; report per-language coverage."""
    limit = config.max_chars
    if config.source == "adopt" and limit is None:  # read only what the report's sweep and chars_per_token use
        limit = max(100_000, config.report.corpus_chars if config.report else 0)
    records = ctx.progress(iter_records(inputs["corpus"], "text", "train", config), desc="read corpus")
    corpus = _first_chars((r["text"] for r in records), limit)
    if config.source == "train":
        if not corpus:
            raise DataError(f"{inputs['corpus']}: no text records in split 'train' to train the tokenizer on")
        texts = corpus
        if config.multilingual:
            texts = corpus + _multilingual_train(config.report, list(multilingual.LANGUAGES), config.seed)
        tokenizer = train_bpe_tokenizer(
            texts, config.vocab_size, config.min_frequency, config.model_max_length or 2048, config.chat_format
        )
        ctx.log_metrics({"train_chars": sum(len(t) for t in texts)})
    else:
        tokenizer = adopt_tokenizer(config.path, config.chat_format, config.model_max_length)
    sample = corpus[:500]
    n_tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"])
    ctx.log_metrics({"vocab_size": len(tokenizer), "chars_per_token": sum(map(len, sample)) / max(1, n_tokens)})
    if config.report is not None:
        multilingual_report(tokenizer, corpus, config, ctx)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        meta = {"kind": "tokenizer", "vocab_size": len(tokenizer), "source": config.source}
        uri = write_checkpoint(ctx.output("tokenizer"), tmp, meta=meta)
    return {"tokenizer": uri}
