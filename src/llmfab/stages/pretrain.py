"""pretrain: causal-LM training on a weighted mixture, packed with document-boundary masking."""

from __future__ import annotations

from pydantic import Field

from llmfab.config.model import ModelConfig
from llmfab.models import init_model, load_tokenizer, save_model
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.config import TrainConfig
from llmfab.train.lm import eval_lm_loss, lm_loss, load_corpus, pack_eval, perplexity
from llmfab.train.packing import mixture_sample, pack_documents
from llmfab.train.trainer import Trainer


class PretrainConfig(StageConfig):
    model: ModelConfig | None = Field(None, description="architecture when training from scratch (no `init` input)")
    seq_len: int = Field(256, gt=1)
    mixture: dict[str, float] = Field(default_factory=dict, description="weight per text source; 1.0 = natural share")
    sources: list[str] | None = Field(None, description="train only on these sources (e.g. a high-quality slice)")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval_rows: int = Field(32, gt=0, description="held-out packed rows for eval loss")
    eval_every: int = Field(0, ge=0)


def train_causal_lm(config: PretrainConfig, inputs: dict[str, str], ctx: StageContext, *, meta: dict):
    """Shared by pretrain and anneal: returns (model, tokenizer, trainer, eval metrics before)."""
    tokenizer = load_tokenizer(inputs["tokenizer"])
    model = init_model(config.model, inputs.get("init"), tokenizer, seed=config.seed)
    tc = config.train
    rows_needed = tc.max_steps * tc.grad_accum * tc.batch_size
    train_docs = load_corpus(inputs["corpus"], tokenizer, "train", config.sources)
    docs = mixture_sample(train_docs, config.mixture, rows_needed * config.seq_len, config.seed)
    packed = pack_documents(docs, config.seq_len, tokenizer.pad_token_id)
    packed = {k: v[:rows_needed] for k, v in packed.items()}
    held_out = pack_eval(
        load_corpus(inputs["corpus"], tokenizer, "test", config.sources),
        config.seq_len,
        tokenizer.pad_token_id,
        config.eval_rows,
    )
    ctx.log_params(
        {
            "train_rows": len(packed["input_ids"]),
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": model.config.vocab_size,
        }
    )

    def batch_for_step(step: int, micro: int):
        start = ((step * tc.grad_accum + micro) * tc.batch_size) % len(packed["input_ids"])
        return {k: v[start : start + tc.batch_size] for k, v in packed.items()}

    def evaluate(m):
        loss = eval_lm_loss(m, held_out, tc.batch_size)
        return {"eval_loss": loss, "eval_ppl": perplexity(loss)}

    before = {f"{k}_before": v for k, v in evaluate(model).items()}
    ctx.log_metrics(before)
    trainer = Trainer(
        model,
        tc,
        ctx,
        lm_loss,
        tokenizer=tokenizer,
        eval_fn=evaluate,
        eval_every=config.eval_every,
        checkpoint_meta=meta,
    )
    trainer.fit(batch_for_step)
    trainer.evaluate()
    return model, tokenizer, trainer


@stage(
    "pretrain",
    PretrainConfig,
    inputs={"corpus": "text dataset (train/test splits, `source` per record)", "tokenizer": "tokenizer checkpoint"},
    optional_inputs={"init": "checkpoint to continue from (continued pretraining)"},
    outputs={"model": "model checkpoint"},
)
def run(config: PretrainConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Causal-LM pretraining (from scratch or a checkpoint) on a weighted, packed mixture."""
    model, tokenizer, _ = train_causal_lm(config, inputs, ctx, meta={"stage": "pretrain"})
    return {"model": save_model(model, tokenizer, ctx.output("model"), {"stage": "pretrain", **ctx.metrics})}
