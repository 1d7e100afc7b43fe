"""extend_context: raise the context length with a new RoPE base, train on long documents.

Qwen2: context x8 with RoPE base x100 (YaRN available at inference); AFM: base x~12.6;
Llama 3.1: staged lengths, each stage entered only once a needle-in-a-haystack check passes at
the current length.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import Field, model_validator

from llmfab.data.options import DataOptions
from llmfab.errors import DataError, LlmfabError
from llmfab.evaluation.long_context import (
    continuous_rows,
    needle_eval,
    needle_training_docs,
    one_per_row,
    prose_filler,
)
from llmfab.models import load_model, load_tokenizer, save_model
from llmfab.models.rope import rope_theta, with_rope
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.config import TrainConfig
from llmfab.train.distributed import micro_batches_per_step
from llmfab.train.lm import corpus_splits, eval_lm_loss, lm_loss, load_corpus, perplexity, step_batch
from llmfab.train.trainer import Trainer


class GateError(LlmfabError):
    """A staged extension did not pass its needle check; the last trained stage's checkpoints are kept."""


class ExtendContextConfig(DataOptions, StageConfig):
    seq_len: int = Field(gt=1, description="the new context length (the last stage's)")
    stages: list[int] | None = Field(None, description="Llama: increasing lengths, ending at seq_len")
    base_seq_len: int | None = Field(None, gt=1, description="the old length [default: the model's max positions]")
    rope_theta_factor: float = Field(1.0, gt=0, description="new RoPE base = old base x this (Qwen2 100, AFM 12.6)")
    rope_theta: float | None = Field(None, gt=0, description="absolute new RoPE base (overrides the factor)")
    yarn_factor: float | None = Field(None, gt=1, description="YaRN scaling written into the output for inference")
    needle_fraction: float = Field(0.5, ge=0, le=1, description="share of training rows that are retrieval docs")
    train: TrainConfig = Field(default_factory=TrainConfig, description="per stage (per round when gated)")
    gate: bool = Field(False, description="advance a stage only when the needle check passes (Llama)")
    gate_metric: Literal["needle_acc", "needle_margin", "needle_nll"] = Field(
        "needle_acc",
        description="what the gate checks: accuracy or margin (at least the threshold), or answer "
        "NLL per token (at most the threshold)",
    )
    needle_threshold: float = Field(0.5, description="value of gate_metric a gated stage must reach")
    max_rounds: int = Field(3, gt=0, description="training rounds a gated stage may take before failing")
    needle_samples: int = Field(8, gt=0)
    eval_rows: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _stages(self):
        if self.stages is not None:
            if not self.stages:
                raise ValueError("stages must list at least one length")
            if sorted(self.stages) != self.stages or len(set(self.stages)) != len(self.stages):
                raise ValueError("stages must be strictly increasing")
            if self.stages[-1] != self.seq_len:
                raise ValueError(f"the last stage ({self.stages[-1]}) must equal seq_len ({self.seq_len})")
        return self


def _training_rows(tokenizer, docs, long_docs, filler, length: int, n_rows: int, needle_fraction: float, seed: int):
    """`n_rows` rows of `length`: retrieval documents (built-in, or `long_docs`) and long runs of
    corpus text, shuffled."""
    n_needle = round(n_rows * needle_fraction)
    parts = []
    if n_needle:
        if long_docs:
            fitting = [d for d in long_docs if len(d) <= length]
            if not fitting:
                raise DataError(
                    f"long_data: no document fits in {length} tokens (shortest: "
                    f"{min(len(d) for d in long_docs)}); raise seq_len or shorten the documents"
                )
            needles = [fitting[i % len(fitting)] for i in range(seed, seed + n_needle)]
        else:
            needles = needle_training_docs(tokenizer, length, n_needle, seed, filler)
        # One document per row: the question, its evidence and the answer always share a context.
        parts.append(one_per_row(needles, length, tokenizer.pad_token_id))
    if n_rows > n_needle:
        parts.append(continuous_rows(docs, length, n_rows - n_needle))
    rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = torch.randperm(len(rows["input_ids"]), generator=torch.Generator().manual_seed(seed))
    return {k: v[order] for k, v in rows.items()}


def _passes(value: float, config: ExtendContextConfig) -> bool:
    if config.gate_metric == "needle_nll":
        return value <= config.needle_threshold
    return value >= config.needle_threshold


def _report(
    ctx, model, tokenizer, held_out_docs, filler, lengths: dict[str, int], n_needles: int, rows: int, when: str
):
    for name, length in lengths.items():
        loss = eval_lm_loss(model, continuous_rows(held_out_docs, length, rows))
        ctx.log_metrics({f"{when}_ppl_{name}": perplexity(loss)})
        ctx.log_metrics(
            {
                f"{when}_loss_{name}": loss,
                **{
                    f"{when}_{k}_{name}": v for k, v in needle_eval(model, tokenizer, length, filler, n_needles).items()
                },
            }
        )


@stage(
    "extend_context",
    ExtendContextConfig,
    inputs={"model": "model checkpoint (with tokenizer)", "corpus": "text dataset for long rows"},
    optional_inputs={
        "long_data": "long documents (e.g. synthetic long-context Q&A) replacing the built-in "
        "key-value retrieval documents"
    },
    outputs={"model": "long-context model checkpoint"},
)
def run(config: ExtendContextConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Context extension: new RoPE base, long-document training, perplexity and needle before/after."""
    tokenizer = load_tokenizer(inputs["model"])
    base = load_model(inputs["model"])
    old_len = config.base_seq_len or base.config.max_position_embeddings
    lengths = {"old": old_len, "new": config.seq_len}
    train_by_source, held_by_source = corpus_splits(inputs["corpus"], tokenizer, options=config)
    train_docs = [d for docs in train_by_source.values() for d in docs]
    held_out = [d for docs in held_by_source.values() for d in docs]
    random.Random(config.seed).shuffle(train_docs)
    random.Random(config.seed + 1).shuffle(held_out)
    # Needle haystacks are prose: training ones from the train split, evaluation ones held out.
    train_filler = prose_filler(inputs["corpus"], "train")
    eval_filler = prose_filler(inputs["corpus"], "test")
    long_docs = (
        [d for docs in load_corpus(inputs["long_data"], tokenizer, "train").values() for d in docs]
        if "long_data" in inputs
        else None
    )
    _report(ctx, base, tokenizer, held_out, eval_filler, lengths, config.needle_samples, config.eval_rows, "before")

    theta = config.rope_theta or rope_theta(base.config) * config.rope_theta_factor
    ctx.log_params({"old_len": old_len, "old_rope_theta": rope_theta(base.config), "new_rope_theta": theta})
    model = with_rope(base, theta=theta, max_positions=config.seq_len)
    tc = config.train
    for length in config.stages or [config.seq_len]:
        for round_ in range(1, config.max_rounds + 1 if config.gate else 2):
            phase = ctx.child(f"len{length}-round{round_}")
            rows = _training_rows(
                tokenizer,
                train_docs,
                long_docs,
                train_filler,
                length,
                tc.max_steps * micro_batches_per_step(tc.grad_accum) * tc.batch_size,
                config.needle_fraction,
                seed=config.seed + 1000 * round_ + length,
            )

            def batch_for_step(step, micro, rows=rows):
                return step_batch(rows, step, micro, tc.batch_size, micro_batches_per_step(tc.grad_accum))

            Trainer(
                model,
                tc,
                phase,
                lm_loss,
                tokenizer=tokenizer,
                checkpoint_meta={"stage": "extend_context", "length": length},
            ).fit(batch_for_step)
            needle = needle_eval(model, tokenizer, length, eval_filler, config.needle_samples)
            phase.log_metrics(needle)
            if not config.gate or _passes(needle[config.gate_metric], config):
                break
        else:
            relation = ">" if config.gate_metric == "needle_nll" else "<"
            raise GateError(
                f"needle check at length {length} failed after {config.max_rounds} rounds "
                f"({config.gate_metric} {needle[config.gate_metric]:.3f} {relation} {config.needle_threshold}); "
                f"checkpoints kept under {ctx.store.uri}"
            )
        ctx.log_metrics({"reached_len": length})
    if config.yarn_factor:
        model = with_rope(
            model,
            yarn_factor=config.yarn_factor,
            yarn_original=config.seq_len,
            max_positions=int(config.seq_len * config.yarn_factor),
        )
    _report(ctx, model, tokenizer, held_out, eval_filler, lengths, config.needle_samples, config.eval_rows, "after")
    return {"model": save_model(model, tokenizer, ctx.output("model"), {"stage": "extend_context", **ctx.metrics})}
