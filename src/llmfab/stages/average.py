"""average: uniform or weighted parameter averaging of models that share an init (Llama 3.1
averages the models of one stage: several RMs, SFT or DPO runs over data or hyperparameters)."""

from __future__ import annotations

from pydantic import Field

from llmfab.config.recipe import as_refs
from llmfab.errors import ConfigError
from llmfab.evaluation.gold import GoldEvalConfig, eval_records, log_gold_eval
from llmfab.models import load_model, load_tokenizer, save_model
from llmfab.models.merge import average_state_dicts
from llmfab.stages.base import StageConfig, StageContext, stage


class AverageConfig(StageConfig):
    weights: list[float] | None = Field(None, description="one weight per model (normalised); None: uniform")
    kind: str = Field("causal_lm", pattern="^(causal_lm|reward)$", description="reward: average reward models")
    eval: GoldEvalConfig = Field(default_factory=GoldEvalConfig)


@stage(
    "average",
    AverageConfig,
    inputs={"models": "checkpoints to average (a list; same architecture, ideally the same init)"},
    optional_inputs={"eval_prompts": "prompt dataset: gold reward of every member and of the average"},
    outputs={"model": "averaged checkpoint"},
)
def run(config: AverageConfig, inputs: dict, ctx: StageContext) -> dict[str, str]:
    """Parameter averaging Σ w_i θ_i of models that share an architecture."""
    refs = as_refs(inputs["models"])
    if config.weights is not None and len(config.weights) != len(refs):
        raise ConfigError(f"average: weights has {len(config.weights)} entries for {len(refs)} models")
    models = [load_model(ref, kind=config.kind) for ref in refs]
    try:
        state = average_state_dicts([m.state_dict() for m in models], config.weights)
    except ValueError as exc:
        raise ConfigError(f"average: {exc}") from None
    tokenizer = load_tokenizer(refs[0])
    records = []
    if config.kind == "causal_lm" and "eval_prompts" in inputs:
        # [] for prompts without testbed tasks (a hub dataset): the gold reward cannot score them; skipped, said so
        records = eval_records(config.eval, inputs, ("eval_prompts", "prompt"))
        for i, member in enumerate(models):
            log_gold_eval(member, tokenizer, records, config.eval, ctx, f"_member{i}")
    merged = models[0]
    merged.load_state_dict(state)
    del models[1:]
    log_gold_eval(merged, tokenizer, records, config.eval, ctx)
    ctx.log_params({"members": refs})  # the weights are a config param already
    return {"model": save_model(merged, tokenizer, ctx.output("model"), {"stage": "average", **ctx.metrics})}
