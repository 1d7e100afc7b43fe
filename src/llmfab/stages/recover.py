"""recover: AFM's accuracy-recovery adapters. LoRA (rank 16, every linear layer) trained with the SFT
recipe on a slice of its data over the frozen, dequantized palettized base; the output checkpoint holds
the palettized base and the adapter together (load_model applies the adapter)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import Field

from llmfab.data.options import DataOptions
from llmfab.errors import ConfigError
from llmfab.evaluation.gold import GoldEvalConfig, eval_records, log_gold_eval
from llmfab.models import count_parameters, load_model, load_tokenizer
from llmfab.models.checkpoints import ADAPTER_CONFIG, resolve_ref
from llmfab.models.palettize import copy_palettized_files, is_palettized, weights_bytes
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.storage import ObjectStore
from llmfab.storage.checkpoint import write_checkpoint
from llmfab.train.config import TrainConfig
from llmfab.train.distributed import barrier, is_main_process, micro_batches_per_step
from llmfab.train.lm import eval_lm_loss, step_batch
from llmfab.train.lora import ADAPTER_FILES, LoraSettings
from llmfab.train.sft import sft_loss
from llmfab.train.sft_data import load_sft_rows
from llmfab.train.trainer import Trainer


class RecoveryLora(LoraSettings):
    """AFM's recovery adapters: rank 16 on every linear layer (alpha 2r = 32), no dropout."""

    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")


class RecoverConfig(DataOptions, StageConfig):
    lora: RecoveryLora = Field(default_factory=RecoveryLora)
    max_len: int = Field(256, gt=1, description="tokens per packed row; longer conversations are dropped")
    max_examples: int | None = Field(None, gt=0, description="train on the first N conversations (a slice)")
    teacher_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="weight of KL to the float model's next-token distribution on the responses (needs the "
        "float_model input); 0: the SFT loss alone",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: GoldEvalConfig = Field(default_factory=GoldEvalConfig)


def gap_closed(float_value: float, palettized: float, recovered: float, *, higher_is_better: bool) -> float | None:
    """Share of the palettized model's loss of quality that recovery won back (1: back to float). None
    when palettization lost nothing: a share of no gap (or of a gain) means nothing."""
    sign = 1 if higher_is_better else -1
    gap = sign * (float_value - palettized)
    return sign * (recovered - palettized) / gap if gap > 1e-9 else None


@stage(
    "recover",
    RecoverConfig,
    inputs={"model": "palettized checkpoint (compress output)", "data": "chat dataset (train/test)"},
    optional_inputs={
        "float_model": "the model before compression: measured too (three-way comparison); teacher_weight's teacher",
        "eval_prompts": "prompt dataset whose test split measures the gold reward",
    },
    outputs={"model": "palettized base + recovery LoRA adapter (load_model merges the adapter)"},
)
def run(config: RecoverConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Train accuracy-recovery LoRA adapters on a frozen palettized base; compare float / palettized / recovered."""
    from peft import get_peft_model

    base_folder = Path(resolve_ref(inputs["model"]))
    if not is_palettized(base_folder):
        raise ConfigError(f"recover: input `model` ({inputs['model']}) is not a palettized checkpoint; run compress")
    if (base_folder / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"recover: input `model` ({inputs['model']}) already has an adapter; use the compress output")
    if config.teacher_weight > 0 and "float_model" not in inputs:
        raise ConfigError("recover: teacher_weight > 0 needs the `float_model` input")
    tokenizer = load_tokenizer(inputs["model"])
    tc = config.train
    data = load_sft_rows(
        tokenizer, inputs["data"], config.max_len, max_examples=config.max_examples, seed=config.seed, options=config
    )
    records = eval_records(config.eval, inputs, ("data", "chat"), config)
    ctx.log_params(data.params())
    results: dict[str, dict[str, float | None]] = {}

    def measure(model, name: str) -> None:
        loss = eval_lm_loss(model, data.held_out, tc.batch_size)
        ctx.log_metrics({f"eval_loss_{name}": loss})
        gold = log_gold_eval(model, tokenizer, records, config.eval, ctx, f"_{name}")
        results[name] = {"eval_loss": loss, "gold_reward": gold.get(f"gold_reward_{name}")}

    teacher = None
    if "float_model" in inputs:
        reference = load_model(inputs["float_model"]).requires_grad_(False)
        measure(reference, "float")
        teacher = reference if config.teacher_weight > 0 else None
    base = load_model(inputs["model"]).requires_grad_(False)
    if teacher is not None and teacher.config.vocab_size != base.config.vocab_size:
        raise ConfigError("recover: float_model and model vocabularies differ; distillation needs a shared tokenizer")
    params = count_parameters(base)
    measure(base, "palettized")

    torch.manual_seed(config.seed)  # LoRA's A matrices start random: seeded, so a rerun (or resume) is exact
    model = get_peft_model(base, config.lora.peft_config())
    adapter_params = count_parameters(model, trainable_only=True)
    ctx.log_params({"adapter_params": adapter_params, "base_params": params})
    trainer = Trainer(
        model,
        tc,
        ctx,
        sft_loss(teacher, config.teacher_weight),
        tokenizer=tokenizer,
        checkpoint_meta={"stage": "recover"},
    )
    if teacher is not None:
        teacher.to(trainer.device)

    per_step = micro_batches_per_step(tc.grad_accum)

    def batches(step, micro):
        return step_batch(data.train, step, micro, tc.batch_size, per_step)

    trainer.fit(batches)
    measure(model, "recovered")
    summary = {f"{k}_{n}": v for n, r in results.items() for k, v in r.items() if v is not None}
    uri = save_recovered(
        model, base_folder, ctx.output("model"), {"stage": "recover", "base": inputs["model"], **summary}
    )

    disk = {"palettized": weights_bytes(base_folder), "recovered": weights_bytes(resolve_ref(uri))}
    ctx.log_metrics(
        {"size_bytes_palettized": disk["palettized"], "size_bytes_adapter": disk["recovered"] - disk["palettized"]}
    )
    if "float_model" in inputs:
        disk["float"] = weights_bytes(resolve_ref(inputs["float_model"]))
        f, p, r = results["float"], results["palettized"], results["recovered"]
        ctx.log_metrics(
            {
                "size_bytes_float": disk["float"],
                "loss_gap_closed": gap_closed(f["eval_loss"], p["eval_loss"], r["eval_loss"], higher_is_better=False),
            }
        )
        if records:
            gold = gap_closed(f["gold_reward"], p["gold_reward"], r["gold_reward"], higher_is_better=True)
            ctx.log_metrics({"gold_gap_closed": gold})
    names = list(results)
    ctx.log_table(
        {
            "model": names,
            "eval_loss": [results[n]["eval_loss"] for n in names],
            "gold_reward": [results[n]["gold_reward"] for n in names],
            "size_bytes": [disk[n] for n in names],
            "disk_bits_per_param": [8 * disk[n] / params for n in names],
        },
        "compression_comparison.json",
    )
    return {"model": uri}


def save_recovered(model, base_folder: Path, store: ObjectStore, meta: dict) -> str:
    """One checkpoint holding the palettized base (its files as they are) and the LoRA adapter; rank 0
    writes it while any other ranks wait."""
    if not is_main_process():
        barrier()
        return store.uri
    with tempfile.TemporaryDirectory(prefix="llmfab-recover-") as tmp:
        copy_palettized_files(base_folder, tmp)
        # The adapter only (the base is the palettized files; embeddings are not adapted).
        model.save_pretrained(Path(tmp) / "peft", save_embedding_layers=False)
        for name in ADAPTER_FILES:
            shutil.move(Path(tmp) / "peft" / name, Path(tmp) / name)
        shutil.rmtree(Path(tmp) / "peft")
        uri = write_checkpoint(store, tmp, meta)
    barrier()
    return uri
