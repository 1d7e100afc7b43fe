"""Where a model or tokenizer comes from: a hub id, an hf:// URI, a local folder or an object-store URI, resolved
to a folder transformers can load. Torch-free, so that the tokenizer module (and the data code that imports it)
stays light."""

from __future__ import annotations

from pathlib import Path

from llmfab.errors import CheckpointError
from llmfab.hub import is_hub_uri, snapshot
from llmfab.storage.checkpoint import MANIFEST, fetch_checkpoint

ADAPTER_CONFIG = "adapter_config.json"  # peft's: a LoRA adapter saved beside (or instead of) the weights
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", ADAPTER_CONFIG)


def resolve_ref(ref: str | Path) -> str:
    """A local folder for a store URI, an hf:// URI (the hub cache's snapshot, see llmfab.hub) or a local
    checkpoint (verified); a plain hub id is returned as is (transformers resolves it under HF_HOME)."""
    text = str(ref)
    if text.startswith(("s3://", "file://")):
        return str(fetch_checkpoint(text))
    if is_hub_uri(text):
        return snapshot(text, "model")
    path = Path(text).expanduser()
    if path.exists():
        if (path / MANIFEST).is_file():
            return str(fetch_checkpoint(path))
        return str(path)
    return text


def loadable_folder(ref: str | Path) -> str:
    """resolve_ref, refusing a local folder that holds neither a checkpoint nor a Hugging Face model or tokenizer
    (e.g. a dataset given as a model) with a message naming it, instead of transformers' guesswork."""
    folder = resolve_ref(ref)
    path = Path(folder)
    if path.is_file():
        raise CheckpointError(f"{ref}: a file, not a model or tokenizer folder (a dataset given as a model?)")
    if not path.exists() and str(ref).startswith(("/", "./", "../", "~")):
        raise CheckpointError(f"{ref}: no such folder")
    if path.is_dir() and not any((path / name).is_file() for name in HF_FILES):
        raise CheckpointError(
            f"{ref}: neither a checkpoint ({MANIFEST}) nor a Hugging Face folder ({', '.join(HF_FILES)})"
        )
    return folder
