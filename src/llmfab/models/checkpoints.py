"""Load models and tokenizers from a hub id, a local folder or an object-store URI; save them as
atomic checkpoints (HF format files + manifest)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from llmfab.storage import ObjectStore
from llmfab.storage.checkpoint import MANIFEST, fetch_checkpoint, write_checkpoint

ADAPTER_CONFIG = "adapter_config.json"  # peft's: a LoRA adapter saved beside (or instead of) the weights


def resolve_ref(ref: str | Path) -> str:
    """A local folder for a store URI or local checkpoint (verified); a hub id is returned as is
    (transformers resolves it under HF_HOME)."""
    text = str(ref)
    if text.startswith(("s3://", "file://")):
        return str(fetch_checkpoint(text))
    path = Path(text).expanduser()
    if path.exists():
        if (path / MANIFEST).is_file():
            return str(fetch_checkpoint(path))
        return str(path)
    return text


def load_model(
    ref: str | Path, *, dtype: str = "float32", device="cpu", kind: str = "causal_lm", merge_adapter: bool = True
):
    """Load a causal LM (or, with kind='reward', a sequence-classification reward model).

    A palettized checkpoint (see models.palettize) is dequantized to `dtype`. A checkpoint holding a
    LoRA adapter (peft's adapter_config.json) gets it applied: merged into the weights, or with
    merge_adapter=False as a peft model whose base stays as loaded.
    """
    import transformers

    from llmfab.models.architectures import DTYPES
    from llmfab.models.palettize import is_palettized, load_palettized

    folder = resolve_ref(ref)
    if kind == "causal_lm":
        if is_palettized(folder):
            model = load_palettized(folder, DTYPES[dtype])
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
        return _with_adapter(model, folder, merge_adapter).to(device)
    if kind != "reward":
        raise ValueError(f"unknown model kind {kind!r}")
    if is_palettized(folder) or (Path(folder) / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{ref}: a palettized or adapter checkpoint loads as a causal LM only, not a reward model")
    # From a causal LM checkpoint the scalar head is new (initialised from the torch RNG).
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=DTYPES[dtype], num_labels=1)
    if model.config.pad_token_id is None:
        raise ValueError(f"{ref}: a reward model needs pad_token_id in its config (it pools the last non-pad token)")
    return model.to(device)


def _with_adapter(model, folder: str, merge: bool):
    if not (Path(folder) / ADAPTER_CONFIG).is_file():
        return model
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, folder, is_trainable=False)
    return peft_model.merge_and_unload() if merge else peft_model


def load_tokenizer(ref: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_ref(ref))


def save_model(model, tokenizer, store: ObjectStore, meta: dict | None = None) -> str:
    """Write model (safetensors) and tokenizer as one atomic checkpoint at `store`; returns its URI.

    Under torchrun every rank holds the same weights: rank 0 writes while the others wait for it."""
    from llmfab.train.distributed import barrier, is_main_process

    if not is_main_process():
        barrier()
        return store.uri
    with tempfile.TemporaryDirectory(prefix="llmfab-ckpt-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        uri = write_checkpoint(store, tmp, meta)
    barrier()
    return uri
