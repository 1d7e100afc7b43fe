"""What a URI holds, by content: a checkpoint (hashed through its manifest), data (a prefix or a single object,
hashed by its bytes) or something no store holds (a hub id: external, unhashed). Equal content gives equal
hashes wherever it is stored; the registry's lineage, the data version and MLflow dataset digests use it."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from llmfab.errors import LlmfabError
from llmfab.storage import open_store
from llmfab.storage.checkpoint import read_manifest, sha256_file
from llmfab.storage.local import LocalStore

CHECKPOINT, DATA, EXTERNAL = "checkpoint", "data", "external"


def checkpoint_hash(manifest: dict) -> str:
    """One sha256 over a checkpoint's file hashes: equal for equal content wherever it is stored."""
    files = {name: entry["sha256"] for name, entry in sorted(manifest["files"].items())}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def files_hash(store, keys: list[str]) -> str:
    """One sha256 over the (key, bytes) of `keys` in `store`."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="llmfab-hash-") as tmp:
        for key in sorted(keys):
            if isinstance(store, LocalStore):
                file_hash = sha256_file(store.local_path(key))
            else:  # one object at a time, so a large dataset never needs its whole size on disk
                path = Path(tmp) / "blob"
                store.get_file(key, path)
                file_hash = sha256_file(path)
                path.unlink()
            digest.update(f"{key}\0{file_hash}\n".encode())
    return digest.hexdigest()


def content_hash(uri: str) -> tuple[str, str | None]:
    """(kind, sha256) of what `uri` holds: CHECKPOINT, DATA, or EXTERNAL with no hash."""
    try:
        store = open_store(uri)
        try:
            return CHECKPOINT, checkpoint_hash(read_manifest(store))
        except LlmfabError:
            pass
        keys = list(store.list())
        if keys:
            return DATA, files_hash(store, keys)
        parent, _, name = uri.rstrip("/").rpartition("/")
        if parent and name:
            parent_store = open_store(parent)
            if parent_store.exists(name):
                return DATA, files_hash(parent_store, [name])
    except (LlmfabError, OSError, ValueError):
        pass
    return EXTERNAL, None
