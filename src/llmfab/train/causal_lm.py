"""Causal-LM training on a packed, weighted text mixture: what pretrain, and the stages built on it (anneal,
distill), configure and run."""

from __future__ import annotations

from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.config.model import ModelConfig
from llmfab.data.options import DataOptions
from llmfab.train.config import TrainConfig
from llmfab.train.context import RunContext
from llmfab.train.lm import PackedCorpus, lm_loss
from llmfab.train.trainer import LossFn, SummedLoss, Trainer


class CausalLMConfig(StrictModel):
    model: ModelConfig | None = Field(None, description="architecture when training from scratch (no `init` input)")
    seq_len: int = Field(256, gt=1)
    mixture: dict[str, float] = Field(default_factory=dict, description="weight per text source; 1.0 = natural share")
    sources: list[str] | None = Field(None, description="train only on these sources (e.g. a high-quality slice)")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval_rows: int = Field(32, gt=0, description="held-out packed rows for eval loss")
    eval_every: int = Field(0, ge=0)


def packed_corpus(config: CausalLMConfig, corpus_uri: str | list[str], tokenizer, seed: int) -> PackedCorpus:
    tc = config.train
    return PackedCorpus(
        corpus_uri,
        tokenizer,
        seq_len=config.seq_len,
        batch_size=tc.batch_size,
        grad_accum=tc.grad_accum,
        max_steps=tc.max_steps,
        mixture=config.mixture,
        sources=config.sources,
        eval_rows=config.eval_rows,
        seed=seed,
        options=config if isinstance(config, DataOptions) else None,  # the stage's data fields
    )


def train_causal_lm(
    config: CausalLMConfig,
    ctx: RunContext,
    model,
    tokenizer,
    data: PackedCorpus,
    loss_fn: LossFn | SummedLoss = lm_loss,
    meta: dict | None = None,
) -> Trainer:
    """Train `model` on `data` with `loss_fn`, logging held-out loss before and after."""
    ctx.log_params(
        {
            "train_rows": len(data.train["input_ids"]),
            "vocab_size": model.config.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    )
    ctx.log_metrics({f"{k}_before": v for k, v in data.evaluate(model).items()})
    trainer = Trainer(
        model,
        config.train,
        ctx,
        loss_fn,
        tokenizer=tokenizer,
        eval_fn=data.evaluate,
        eval_every=config.eval_every,
        checkpoint_meta=meta,
    )
    trainer.fit(data.batch_for_step)
    trainer.evaluate()
    return trainer
