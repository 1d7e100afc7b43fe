"""anneal: Llama 3.1 annealing — linear LR to 0 on a high-quality slice, then average the
checkpoints taken along the way into the final model."""

from __future__ import annotations

from pydantic import Field, model_validator

from llmfab.data.options import DataOptions
from llmfab.models import load_model, load_tokenizer, save_model
from llmfab.models.merge import average_state_dicts
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.storage.checkpoint import fetch_checkpoint, list_step_checkpoints
from llmfab.train.causal_lm import CausalLMConfig, packed_corpus, train_causal_lm
from llmfab.train.config import OptimConfig, TrainConfig
from llmfab.train.trainer import load_weights


def _anneal_train() -> TrainConfig:
    return TrainConfig(optim=OptimConfig(schedule="linear", warmup_steps=0, lr=3e-4))


class AnnealConfig(CausalLMConfig, DataOptions, StageConfig):  # pretrain's fields, seed first (see PretrainConfig)
    train: TrainConfig = Field(default_factory=_anneal_train)
    average_last: int = Field(3, ge=1, description="checkpoints (evenly spaced, ending at the last step) averaged")

    @model_validator(mode="before")
    @classmethod
    def _linear_by_default(cls, data):
        # A `train` section without a schedule still anneals: linear, no warmup.
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            optim = dict(data["train"].get("optim") or {})
            optim.setdefault("schedule", "linear")
            optim.setdefault("warmup_steps", 0)
            data = {**data, "train": {**data["train"], "optim": optim}}
        return data

    @model_validator(mode="after")
    def _linear(self):
        if self.train.optim.schedule != "linear":
            raise ValueError("train.optim.schedule must be 'linear' (annealing takes the LR linearly to 0)")
        if self.train.max_steps % self.average_last:
            raise ValueError(
                f"train.max_steps ({self.train.max_steps}) must be a multiple of average_last "
                f"({self.average_last}) so checkpoints are evenly spaced"
            )
        return self


@stage(
    "anneal",
    AnnealConfig,
    inputs={"init": "model checkpoint to anneal (with tokenizer)", "corpus": "text dataset"},
    outputs={"model": "average of the annealing checkpoints"},
)
def run(config: AnnealConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Annealing with linear LR decay on a high-quality slice, then checkpoint averaging."""
    tokenizer = load_tokenizer(inputs["init"])
    model = load_model(inputs["init"])
    every = config.train.max_steps // config.average_last
    train = config.train.model_copy(update={"checkpoint_every": every, "keep_checkpoints": config.average_last})
    cfg = config.model_copy(update={"train": train})
    data = packed_corpus(cfg, inputs["corpus"], tokenizer, config.seed)
    trainer = train_causal_lm(cfg, ctx, model, tokenizer, data, meta={"stage": "anneal"})
    found = list_step_checkpoints(trainer.ckpt_store)[-config.average_last :]
    states = []
    for _, name in found:
        load_weights(model, fetch_checkpoint(trainer.ckpt_store.sub(name)))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(average_state_dicts(states))
    ctx.log_params({"averaged_steps": [step for step, _ in found]})
    ctx.log_metrics({f"averaged_{k}": v for k, v in data.evaluate(model).items()})
    return {"model": save_model(model, tokenizer, ctx.output("model"), {"stage": "anneal", **ctx.metrics})}
