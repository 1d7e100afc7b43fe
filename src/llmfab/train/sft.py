"""Supervised fine-tuning on conversations, loss on assistant tokens only; optionally distilled from a teacher
(Gemma 2): on the data's responses, or on-policy on the student's own. The sft stage runs it, and so does
rejection_sampling on the answers it kept; recover trains its adapters with its loss."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.data.chat import encode_response
from llmfab.data.options import DataOptions
from llmfab.errors import ConfigError
from llmfab.evaluation.gold import GoldEvalConfig, eval_records, log_gold_eval
from llmfab.losses.distill import generalized_jsd
from llmfab.models import load_model, load_tokenizer
from llmfab.models.checkpoints import frozen_dtype
from llmfab.train.config import TrainConfig
from llmfab.train.context import RunContext
from llmfab.train.distributed import frozen_model, micro_batches_per_step, training_device, whole_weights
from llmfab.train.lm import eval_lm_loss, lm_forward, lm_loss, step_batch, target_tokens, token_nll_sum
from llmfab.train.lora import LoraConfig, load_trainable, save_trained
from llmfab.train.sft_data import load_sft_rows
from llmfab.train.trainer import SummedLoss, Trainer


class FineTuneConfig(StrictModel):
    max_len: int = Field(256, gt=1, description="tokens per packed row; longer conversations are dropped")
    max_examples: int | None = Field(None, gt=0, description="train on the first N conversations only")
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig | None = Field(None, description="LoRA / QLoRA adapters on a frozen base; None: full fine-tuning")
    eval: GoldEvalConfig = Field(default_factory=GoldEvalConfig)
    distill: Literal["none", "logits", "on_policy"] = Field(
        "none",
        description="logits: also match the teacher's next-token distribution on the data's responses; "
        "on_policy: the student answers the data's prompts and learns the teacher's distribution on its "
        "own answers (Gemma 2)",
    )
    teacher_weight: float = Field(0.5, ge=0, le=1, description="logits: weight of the KL term (1 - w on true tokens)")
    temperature: float = Field(1.0, gt=0, description="on_policy: the student's sampling temperature")
    max_new_tokens: int = Field(32, gt=0, description="on_policy: length of the student's answers")


def teacher_kl(teacher, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward KL(teacher || student) summed over the response tokens (labels != -100); the teacher sits on
    the training device already (it is loaded there)."""
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False).logits
    return generalized_jsd(logits[:, :-1], t_logits[:, :-1], batch["labels"][:, 1:], beta=0.0, reduction="sum")


def sft_loss(teacher=None, weight: float = 0.0) -> SummedLoss:
    """Next-token loss on the response tokens, or with a teacher (1 - w)·CE + w·KL(teacher || student),
    summed over the response tokens: the Trainer divides by the step's response tokens."""
    if teacher is None:
        return lm_loss

    def loss_sum(model, batch):
        logits = lm_forward(model, batch).logits
        ce, kl = token_nll_sum(logits, batch["labels"]), teacher_kl(teacher, logits, batch)
        n = max(target_tokens(batch), 1)
        return (1 - weight) * ce + weight * kl, {"ce": ce.item() / n, "teacher_kl": kl.item() / n}

    return SummedLoss(loss_sum, target_tokens)


class OnPolicyBatches:
    """Gemma 2's on-policy distillation: each step the student answers a slice of the prompts
    (sampling seeded by step, so a resumed run draws the same answers) and the batch is those
    answers with the loss on the answer tokens."""

    def __init__(self, model, tokenizer, prompts: list[str], config: FineTuneConfig, seed: int):
        self.model, self.tokenizer, self.prompts, self.config, self.seed = model, tokenizer, prompts, config, seed

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        from llmfab.generation import generate_chat

        bs = self.config.train.batch_size
        start = ((step * micro_batches_per_step(self.config.train.grad_accum) + micro) * bs) % len(self.prompts)
        prompts = (self.prompts * 2)[start : start + bs]
        was_training = self.model.training
        with whole_weights(self.model):  # ZeRO-3: gathered on every rank, which answer their own prompts
            answers = generate_chat(
                self.model,
                self.tokenizer,
                prompts,
                temperature=self.config.temperature,
                max_new_tokens=self.config.max_new_tokens,
                seed=self.seed * 100_003 + step * 1009 + micro,
                batch_size=bs,
            )
        self.model.train(was_training)
        # Truncated answers are kept: the loss is the teacher's whole distribution at each answer
        # position, not the sampled token, so a cut-off answer is still a valid target.
        examples = [encode_response(self.tokenizer, p, a[0]) for p, a in zip(prompts, answers, strict=True)]
        width = max(len(ids) for ids, _ in examples)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in examples]),
            "position_ids": torch.arange(width).expand(len(examples), width).clone(),
            "labels": torch.tensor(
                [
                    [t if m else -100 for t, m in zip(ids, mask, strict=True)] + [-100] * (width - len(ids))
                    for ids, mask in examples
                ]
            ),
        }


def fine_tune(config: FineTuneConfig, inputs: dict[str, str], ctx: RunContext, seed: int) -> str:
    """Fine-tune the `model` input on the `data` chat dataset (with a `teacher` input for distill, and an optional
    `eval_prompts` one for the gold reward); returns the URI of the fine-tuned checkpoint, ctx's output `model`."""
    if config.distill != "none" and "teacher" not in inputs:
        raise ConfigError(f"sft: distill={config.distill} needs a `teacher` input")
    tokenizer = load_tokenizer(inputs["model"])
    model = load_trainable(inputs["model"], config.lora, seed=seed)
    tc = config.train
    options = config if isinstance(config, DataOptions) else None  # the sft stage's; rejection_sampling's own data
    data = load_sft_rows(
        tokenizer, inputs["data"], config.max_len, max_examples=config.max_examples, seed=seed, options=options
    )
    records = eval_records(config.eval, inputs, ("data", "chat"), options)
    ctx.log_params(data.params())

    def evaluate(m):
        return {"eval_loss": eval_lm_loss(m, data.held_out, tc.batch_size)}

    ctx.log_metrics({f"{k}_before": v for k, v in evaluate(model).items()})
    log_gold_eval(model, tokenizer, records, config.eval, ctx, "_before")
    teacher = None
    if config.distill != "none":
        teacher = load_model(inputs["teacher"], dtype=frozen_dtype(tc), device=training_device())
        teacher = frozen_model(teacher, tc)  # partitioned under ZeRO-3 like the student
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ConfigError("sft: teacher and student vocabularies differ; distillation needs a shared tokenizer")
    if config.distill == "on_policy":
        prompts = [m[0]["content"] for m in data.conversations if m[0]["role"] == "user"]
        batches = OnPolicyBatches(model, tokenizer, prompts, config, seed)
        loss_fn = sft_loss(teacher, 1.0)
    else:
        per_step = micro_batches_per_step(tc.grad_accum)

        def batches(step, micro):
            return step_batch(data.train, step, micro, tc.batch_size, per_step)

        loss_fn = sft_loss(teacher, config.teacher_weight if teacher is not None else 0.0)
    trainer = Trainer(model, tc, ctx, loss_fn, tokenizer=tokenizer, eval_fn=evaluate, checkpoint_meta={"stage": "sft"})
    trainer.fit(batches)
    trainer.evaluate()
    log_gold_eval(model, tokenizer, records, config.eval, ctx)
    meta = {"stage": "sft", **ctx.metrics}
    return save_trained(model, tokenizer, ctx.output("model"), meta, config.lora, inputs["model"])
