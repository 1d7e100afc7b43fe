"""distill: pretrain a student on a teacher's next-token distribution (Gemma 2, AFM)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from llmfab.data.options import DataOptions
from llmfab.errors import ConfigError
from llmfab.losses.distill import afm_top1_loss, generalized_jsd
from llmfab.models import count_parameters, init_model, load_model, load_tokenizer, save_model
from llmfab.models.checkpoints import frozen_dtype
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.train.causal_lm import CausalLMConfig, packed_corpus, train_causal_lm
from llmfab.train.distributed import frozen_model, training_device
from llmfab.train.lm import target_tokens, token_nll_sum
from llmfab.train.trainer import SummedLoss


class DistillConfig(CausalLMConfig, DataOptions, StageConfig):  # pretrain's fields, seed first (see PretrainConfig)
    """Student pretraining on a teacher's next-token distribution."""

    loss: Literal["kl", "afm_top1"] = Field(
        "kl",
        description="kl: generalised JSD (beta=0: forward KL, Gemma 2); "
        "afm_top1: 0.9 teacher top-1 + 0.1 true token (AFM)",
    )
    beta: float = Field(0.0, ge=0, le=1, description="JSD interpolation; 0 = forward KL")
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, gt=0, description="keep the teacher's top-k probabilities, renormalised")
    teacher_weight: float = Field(0.9, ge=0, le=1, description="afm_top1: weight of the teacher's top-1 label")

    @model_validator(mode="after")
    def _support(self):
        if self.top_k is not None and self.beta == 1:
            raise ValueError(
                "top_k with beta=1 (reverse KL) is infinite wherever the student puts mass outside "
                "the teacher's top-k; use beta < 1"
            )
        return self


def distillation_loss(teacher: torch.nn.Module, config: DistillConfig) -> SummedLoss:
    """The configured distillation loss summed over target tokens (the Trainer divides by the step's); the
    teacher sits on the training device (it is loaded there)."""

    def loss_sum(model, batch):
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        with torch.no_grad():
            t_logits = teacher(**kwargs).logits[:, :-1]
        s_logits = model(**kwargs).logits
        labels = batch["labels"][:, 1:]
        if config.loss == "afm_top1":
            loss = afm_top1_loss(s_logits[:, :-1], t_logits, labels, config.teacher_weight, reduction="sum")
        else:
            loss = generalized_jsd(
                s_logits[:, :-1], t_logits, labels, config.beta, config.temperature, config.top_k, reduction="sum"
            )
        with torch.no_grad():
            ce = token_nll_sum(s_logits, batch["labels"]) / max(target_tokens(batch), 1)
        return loss, {"ce": ce.item()}

    return SummedLoss(loss_sum, target_tokens)


@stage(
    "distill",
    DistillConfig,
    inputs={"corpus": "text dataset", "tokenizer": "tokenizer checkpoint", "teacher": "teacher model checkpoint"},
    optional_inputs={"init": "student checkpoint to continue from"},
    outputs={"model": "student model checkpoint"},
)
def run(config: DistillConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Student pretraining on the teacher's next-token distribution (forward KL / JSD / AFM top-1)."""
    tokenizer = load_tokenizer(inputs["tokenizer"])
    # A GPU when there is one; bf16 under precision bf16 (frozen_dtype).
    teacher = load_model(inputs["teacher"], dtype=frozen_dtype(config.train), device=training_device())
    teacher = frozen_model(teacher, config.train)  # partitioned under ZeRO-3 like the student
    student = init_model(config.model, inputs.get("init"), tokenizer, seed=config.seed)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ConfigError(
            f"teacher vocab {teacher.config.vocab_size} != student vocab {student.config.vocab_size}: "
            "distillation needs a shared tokenizer"
        )
    n_student, n_teacher = count_parameters(student), count_parameters(teacher)
    ctx.log_params(
        {
            "student_parameters": n_student,
            "teacher_parameters": n_teacher,
            "teacher_to_student": round(n_teacher / n_student, 2),
        }
    )
    data = packed_corpus(config, inputs["corpus"], tokenizer, config.seed)
    ctx.log_metrics({"teacher_eval_loss": data.evaluate(teacher)["eval_loss"]})
    train_causal_lm(config, ctx, student, tokenizer, data, distillation_loss(teacher, config), {"stage": "distill"})
    return {"model": save_model(student, tokenizer, ctx.output("model"), {"stage": "distill", **ctx.metrics})}
