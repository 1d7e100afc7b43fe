"""merge: weight merging of models fine-tuned from one init (WARP, arXiv:2406.16768): SLERP of
their task vectors or a linear average, optionally followed by LITI towards the init. Parameter
averaging (Llama 3.1's model averaging) is the `average` stage; this one adds the geometry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmfab.config.recipe import as_refs
from llmfab.errors import ConfigError
from llmfab.evaluation.gold import GoldEvalConfig, eval_records, log_gold_eval
from llmfab.models import load_model, load_tokenizer, save_model
from llmfab.models.merge import average_state_dicts, liti, slerp_state_dicts
from llmfab.stages.base import StageConfig, StageContext, stage


class MergeConfig(StageConfig):
    method: Literal["slerp", "linear"] = Field("slerp", description="slerp: spherical, per tensor, of task vectors")
    lam: float | None = Field(None, ge=0, le=1, description="slerp of 2 models: weight of the second (default 1/2)")
    weights: list[float] | None = Field(None, description="linear: one weight per model (normalised); None: uniform")
    eta: float = Field(1.0, ge=0, le=1, description="LITI: (1−η)·θ_init + η·θ_merged; 1 keeps the merge")
    kind: Literal["causal_lm", "reward"] = Field("causal_lm", description="reward: merge reward models (WARM)")
    eval: GoldEvalConfig = Field(default_factory=GoldEvalConfig)


@stage(
    "merge",
    MergeConfig,
    inputs={"models": "checkpoints to merge (a list; fine-tuned from the same init)"},
    optional_inputs={
        "init": "the shared init: SLERP's task vectors θ_m − θ_init and LITI's anchor",
        "eval_prompts": "prompt dataset whose test split measures the gold reward",
    },
    outputs={"model": "merged checkpoint"},
)
def run(config: MergeConfig, inputs: dict, ctx: StageContext) -> dict[str, str]:
    """SLERP or linear merge of task vectors, then LITI towards the init."""
    refs = as_refs(inputs["models"])
    if "init" not in inputs and (config.method == "slerp" or config.eta < 1):
        raise ConfigError("merge: method=slerp and eta < 1 need the `init` input (the models' shared init)")
    if config.weights is not None and (config.method != "linear" or len(config.weights) != len(refs)):
        raise ConfigError(f"merge: weights needs method=linear and one weight per model ({len(refs)})")
    models = [load_model(ref, kind=config.kind) for ref in refs]
    states = [m.state_dict() for m in models]
    try:
        if config.method == "linear":
            merged = average_state_dicts(states, config.weights)  # = init + the average task vector
        else:
            merged = slerp_state_dicts(load_model(inputs["init"], kind=config.kind).state_dict(), states, config.lam)
        if config.eta < 1:
            merged = liti(load_model(inputs["init"], kind=config.kind).state_dict(), merged, config.eta)
    except ValueError as exc:
        raise ConfigError(f"merge: {exc}") from None
    model = models[0]
    model.load_state_dict(merged)
    del models[1:], states
    tokenizer = load_tokenizer(refs[0])
    if config.kind == "causal_lm" and "eval_prompts" in inputs:
        log_gold_eval(model, tokenizer, eval_records(config.eval, inputs, ("eval_prompts", "prompt")), config.eval, ctx)
    ctx.log_params({"members": refs})
    return {"model": save_model(model, tokenizer, ctx.output("model"), {"stage": "merge", **ctx.metrics})}
