"""compress: palettize a post-trained model for on-device use (AFM): every linear layer's weights become
k-means LUT indices, mixed bit widths averaging under 4 bits per weight (see models.palettize)."""

from __future__ import annotations

from pydantic import Field

from llmfab.data.options import DataOptions
from llmfab.evaluation.gold import GoldEvalConfig, eval_records, log_gold_eval
from llmfab.models import load_model, load_tokenizer
from llmfab.models.checkpoints import resolve_ref
from llmfab.models.palettize import PalettizeConfig, palettize_model, save_palettized, weights_bytes
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.lm import eval_lm_loss
from llmfab.train.sft_data import held_out_rows


class CompressConfig(StageConfig, PalettizeConfig, DataOptions):
    max_len: int = Field(256, gt=1, description="data: tokens per packed held-out row")
    eval_batch_size: int = Field(8, gt=0, description="data: rows per held-out loss batch")
    eval: GoldEvalConfig = Field(default_factory=GoldEvalConfig)


def size_metrics(float_folder: str, palettized_folder: str) -> dict[str, float]:
    """Weight bytes on disk of the float checkpoint and the palettized one, and their ratio."""
    before, after = weights_bytes(float_folder), weights_bytes(palettized_folder)
    return {"size_bytes_float": before, "size_bytes": after, "compression_ratio": before / max(after, 1)}


@stage(
    "compress",
    CompressConfig,
    inputs={"model": "float checkpoint (with its tokenizer)"},
    optional_inputs={
        "data": "chat dataset: held-out loss of the float and palettized model on its test split",
        "eval_prompts": "prompt dataset whose test split measures the gold reward (else data's test split)",
    },
    outputs={"model": "palettized checkpoint (load_model dequantizes it)"},
)
def run(config: CompressConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Palettize a model's linear layers (k-means LUTs per row group, mixed bits); report bits per weight and size."""
    tokenizer = load_tokenizer(inputs["model"])
    model = load_model(inputs["model"])
    pal = palettize_model(model, config, seed=config.seed, progress=ctx.progress)
    summary = pal.summary()
    uri = save_palettized(pal, model, tokenizer, ctx.output("model"), {"stage": "compress", **summary})
    ctx.log_metrics({**summary, **size_metrics(resolve_ref(inputs["model"]), resolve_ref(uri))})
    ctx.log_table({k: [row[k] for row in pal.layers] for k in pal.layers[0]}, "layers.json")

    # Quality, when asked for: the float model against the checkpoint as written (load_model dequantizes
    # it), so the numbers are those of what a later stage loads.
    held_out = held_out_rows(tokenizer, inputs["data"], config.max_len, options=config) if "data" in inputs else None
    records = (
        eval_records(config.eval, inputs, ("data", "chat"), config) if {"data", "eval_prompts"} & set(inputs) else []
    )
    if held_out is None and not records:
        return {"model": uri}
    for suffix, m in (("_float", model), ("", load_model(uri))):
        if held_out is not None:
            ctx.log_metrics({f"eval_loss{suffix}": eval_lm_loss(m, held_out, config.eval_batch_size)})
        log_gold_eval(m, tokenizer, records, config.eval, ctx, suffix)
    return {"model": uri}
