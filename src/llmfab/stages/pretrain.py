"""pretrain: causal-LM training on a weighted mixture, packed with document-boundary masking."""

from __future__ import annotations

from pydantic import Field

from llmfab.config.model import ModelConfig
from llmfab.models import init_model, load_tokenizer, save_model
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.config import TrainConfig
from llmfab.train.lm import PackedCorpus, lm_loss
from llmfab.train.trainer import LossFn, SummedLoss, Trainer


class PretrainConfig(StageConfig):
    model: ModelConfig | None = Field(None, description="architecture when training from scratch (no `init` input)")
    seq_len: int = Field(256, gt=1)
    mixture: dict[str, float] = Field(default_factory=dict, description="weight per text source; 1.0 = natural share")
    sources: list[str] | None = Field(None, description="train only on these sources (e.g. a high-quality slice)")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval_rows: int = Field(32, gt=0, description="held-out packed rows for eval loss")
    eval_every: int = Field(0, ge=0)


def packed_corpus(config: PretrainConfig, corpus_uri: str | list[str], tokenizer) -> PackedCorpus:
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
        seed=config.seed,
    )


def train_causal_lm(
    config: PretrainConfig,
    ctx: StageContext,
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


@stage(
    "pretrain",
    PretrainConfig,
    inputs={"corpus": "text dataset (train/test splits, `source` per record)", "tokenizer": "tokenizer checkpoint"},
    optional_inputs={
        "init": "checkpoint to continue from (continued pretraining)",
        "extra": "another text dataset mixed in by its sources (e.g. synthetic data)",
    },
    outputs={"model": "model checkpoint"},
)
def run(config: PretrainConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Causal-LM pretraining (from scratch or a checkpoint) on a weighted, packed mixture."""
    tokenizer = load_tokenizer(inputs["tokenizer"])
    model = init_model(config.model, inputs.get("init"), tokenizer, seed=config.seed)
    train_causal_lm(
        config,
        ctx,
        model,
        tokenizer,
        packed_corpus(config, [inputs["corpus"], *([inputs["extra"]] if "extra" in inputs else [])], tokenizer),
        meta={"stage": "pretrain"},
    )
    return {"model": save_model(model, tokenizer, ctx.output("model"), {"stage": "pretrain", **ctx.metrics})}
