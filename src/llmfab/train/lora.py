"""LoRA and QLoRA fine-tuning (peft): the `lora` settings of the training stages, the frozen base
wrapped with trainable adapters, the base as the reference model (the adapter switched off: no second
copy of the weights), and the stage's output, merged into a plain transformers checkpoint or saved as
the adapter beside its base."""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from llmfab.checkpoint_refs import ADAPTER_CONFIG, loadable_folder
from llmfab.config.base import StrictModel
from llmfab.errors import ConfigError
from llmfab.models import load_model, save_model
from llmfab.models.checkpoints import ADAPTER_WEIGHTS
from llmfab.models.palettize import is_palettized
from llmfab.storage import ObjectStore
from llmfab.storage.checkpoint import write_checkpoint
from llmfab.train.distributed import barrier, is_main_process, training_device

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
REWARD_HEAD = "score"  # transformers' sequence-classification head: trained whole, beside the adapters


class LoraSettings(StrictModel):
    """The adapters' shape: rank r matrices B A on `target_modules`, the update scaled by alpha / r."""

    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float | None = Field(None, gt=0, description="the update is alpha / r * B A; None: 2 r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: str | list[str] = Field(
        "all-linear", description="peft target_modules; all-linear: every linear layer except the output head"
    )

    def peft_config(self, kind: str = "causal_lm"):
        """peft's LoraConfig; a reward model (kind='reward') also trains its new score head whole."""
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(
            r=self.r,
            lora_alpha=self.alpha if self.alpha is not None else 2 * self.r,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type="SEQ_CLS" if kind == "reward" else "CAUSAL_LM",
            modules_to_save=[REWARD_HEAD] if kind == "reward" else None,
        )


class LoraConfig(LoraSettings):
    """A training stage's `lora` section (None there: full fine-tuning)."""

    save: Literal["merged", "adapter"] = Field(
        "merged",
        description="merged: the adapter merged into a plain transformers checkpoint; adapter: the base as "
        "loaded plus the adapter files (load_model merges them)",
    )
    quantize: Literal["4bit"] | None = Field(
        None, description="QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, bf16 compute); needs a CUDA GPU"
    )


def check_quantize(lora: LoraConfig | None, field: str = "lora.quantize") -> None:
    """A clear error, before anything loads, where QLoRA cannot run."""
    if lora is None or lora.quantize is None:
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{field}={lora.quantize}: QLoRA needs a CUDA GPU (and bitsandbytes); none is visible")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{field}={lora.quantize}: QLoRA needs bitsandbytes (pip install bitsandbytes); it is not installed"
        ) from None


def _load_4bit(ref: str, kind: str):
    from transformers import BitsAndBytesConfig

    if is_palettized(loadable_folder(ref)):
        raise ConfigError(f"lora.quantize: {ref} is palettized; QLoRA quantizes a float checkpoint")
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = load_model(ref, kind=kind, dtype="bfloat16", device=training_device(), quantization_config=nf4)
    from peft import prepare_model_for_kbit_training

    # Norms and embeddings in fp32 (the 4-bit weights stay); gradient checkpointing is TrainConfig's to set.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def load_trainable(ref: str, lora: LoraConfig | None, *, kind: str = "causal_lm", seed: int = 0):
    """The model a stage trains: `ref` loaded whole (lora None), or frozen (in 4-bit for QLoRA) with
    trainable LoRA adapters. The adapters' A matrices start random: seeded, so a rerun or a resume is exact;
    their B matrices start at zero, so the model starts as the base."""
    if lora is None:
        return load_model(ref, kind=kind)
    from peft import get_peft_model

    check_quantize(lora)
    base = _load_4bit(ref, kind) if lora.quantize else load_model(ref, kind=kind)
    base.requires_grad_(False)
    torch.manual_seed(seed)
    return get_peft_model(base, lora.peft_config(kind))


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class AdapterOff(torch.nn.Module):
    """A LoRA model's frozen base as a reference model: its forward runs the model with the adapter
    disabled, in eval mode and without grad (the model's mode is restored after). The model is not a
    submodule, so no weight is counted or copied twice; `.to()` moves the model itself."""

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "model", model)  # bypasses Module.__setattr__: not registered as a child

    @property
    def config(self):
        return self.model.config

    def to(self, *args, **kwargs):
        self.model.to(*args, **kwargs)
        return self

    def forward(self, *args, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)


def save_trained(
    model, tokenizer, store: ObjectStore, meta: dict, lora: LoraConfig | None, base_ref: str, kind: str = "causal_lm"
) -> str:
    """The stage's output checkpoint: the model as it is (full fine-tuning); or with LoRA, the adapter merged
    into the base (a plain transformers checkpoint), or (lora.save=adapter) the base beside the adapter files.
    A QLoRA adapter goes onto the base reloaded in full precision: the output holds no 4-bit weights."""
    if lora is None:
        return save_model(model, tokenizer, store, meta)
    meta = {**meta, "lora_r": lora.r, "lora_save": lora.save}
    if lora.quantize:
        model = _onto_full_precision(model, base_ref, kind)
    if lora.save == "merged":
        return save_model(model.merge_and_unload(), tokenizer, store, meta)
    if not is_main_process():
        barrier()
        return store.uri
    with tempfile.TemporaryDirectory(prefix="llmfab-lora-") as tmp, tempfile.TemporaryDirectory() as peft_files:
        model.save_pretrained(peft_files, save_embedding_layers=False)
        for name in ADAPTER_FILES:
            shutil.move(Path(peft_files) / name, Path(tmp) / name)
        model.unload().save_pretrained(tmp, safe_serialization=True)  # the base, adapter layers taken out
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        uri = write_checkpoint(store, tmp, meta)
    barrier()
    return uri


def _onto_full_precision(model, base_ref: str, kind: str):
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = {k: v.float().cpu() for k, v in get_peft_model_state_dict(model).items()}
    config = copy.deepcopy(model.peft_config["default"])
    full = get_peft_model(load_model(base_ref, kind=kind), config)
    set_peft_model_state_dict(full, adapter)
    return full
