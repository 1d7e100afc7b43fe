"""sft: supervised fine-tuning on conversations, loss on assistant tokens only; optionally
distilled from a teacher (Gemma 2): on the data's responses, or on-policy on the student's own."""

from __future__ import annotations

from llmfab.data.options import DataOptions
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.sft import FineTuneConfig, fine_tune


# StageConfig last: pydantic collects fields from the last base first, so `seed` stays the first field.
class SFTConfig(FineTuneConfig, DataOptions, StageConfig):
    pass


@stage(
    "sft",
    SFTConfig,
    inputs={"model": "policy checkpoint (with its tokenizer)", "data": "chat dataset (train/test)"},
    optional_inputs={
        "teacher": "teacher checkpoint for distill=logits|on_policy (same tokenizer)",
        "eval_prompts": "prompt dataset whose test split measures the gold reward",
    },
    outputs={"model": "fine-tuned checkpoint"},
)
def run(config: SFTConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Supervised fine-tuning, loss on assistant tokens only (optionally distilled from a teacher)."""
    return {"model": fine_tune(config, inputs, ctx, config.seed)}
