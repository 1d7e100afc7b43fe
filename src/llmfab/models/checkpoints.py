"""Load models and tokenizers from a hub id, a local folder or an object-store URI; save them as
atomic checkpoints (HF format files + manifest)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from llmfab.storage import ObjectStore
from llmfab.storage.checkpoint import MANIFEST, fetch_checkpoint, write_checkpoint


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


def load_model(ref: str | Path, *, dtype: str = "float32", device="cpu", kind: str = "causal_lm"):
    """Load a causal LM (or, with kind='reward', a sequence-classification reward model)."""
    import transformers

    from llmfab.models.architectures import DTYPES

    if kind == "causal_lm":
        return transformers.AutoModelForCausalLM.from_pretrained(resolve_ref(ref), dtype=DTYPES[dtype]).to(device)
    if kind != "reward":
        raise ValueError(f"unknown model kind {kind!r}")
    # From a causal LM checkpoint the scalar head is new (initialised from the torch RNG).
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        resolve_ref(ref), dtype=DTYPES[dtype], num_labels=1
    )
    if model.config.pad_token_id is None:
        raise ValueError(f"{ref}: a reward model needs pad_token_id in its config (it pools the last non-pad token)")
    return model.to(device)


def load_tokenizer(ref: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_ref(ref))


def save_model(model, tokenizer, store: ObjectStore, meta: dict | None = None) -> str:
    """Write model (safetensors) and tokenizer as one atomic checkpoint at `store`; returns its URI."""
    with tempfile.TemporaryDirectory(prefix="llmfab-ckpt-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return write_checkpoint(store, tmp, meta)
