"""Object store (local folder or S3) and atomic checkpoints on top of it."""

from __future__ import annotations

import os
from pathlib import Path

from llmfab.storage.base import ObjectStore
from llmfab.storage.keys import join_key, parse_uri, validate_key
from llmfab.storage.local import LocalStore

DEFAULT_STORE = "./llmfab-store"


def default_store_uri() -> str:
    """LLMFAB_STORE, else a folder in the working directory."""
    return os.environ.get("LLMFAB_STORE") or DEFAULT_STORE


def open_store(uri: str | Path | None = None, **s3_options) -> ObjectStore:
    """Open the store rooted at `uri`: a local path, file://..., or s3://bucket/prefix."""
    parsed = parse_uri(uri if uri is not None else default_store_uri())
    if parsed.scheme == "s3":
        from llmfab.storage.s3 import S3Store

        bucket, _, prefix = parsed.root.partition("/")
        return S3Store(bucket, prefix, **s3_options)
    return LocalStore(parsed.root)


__all__ = ["LocalStore", "ObjectStore", "default_store_uri", "join_key", "open_store", "validate_key"]
