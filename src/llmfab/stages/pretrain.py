"""pretrain: causal-LM training on a weighted mixture, packed with document-boundary masking."""

from __future__ import annotations

from llmfab.data.options import DataOptions
from llmfab.models import init_model, load_tokenizer, save_model
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.causal_lm import CausalLMConfig, packed_corpus, train_causal_lm


# StageConfig last: pydantic collects fields from the last base first, so `seed` stays the first field.
class PretrainConfig(CausalLMConfig, DataOptions, StageConfig):
    pass


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
    corpus = [inputs["corpus"], *([inputs["extra"]] if "extra" in inputs else [])]
    train_causal_lm(
        config,
        ctx,
        model,
        tokenizer,
        packed_corpus(config, corpus, tokenizer, config.seed),
        meta={"stage": "pretrain"},
    )
    return {"model": save_model(model, tokenizer, ctx.output("model"), {"stage": "pretrain", **ctx.metrics})}
