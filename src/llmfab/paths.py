"""Local folders llmfab uses; each honours an environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where object-store downloads are cached: LLMFAB_CACHE, else ~/.cache/llmfab."""
    path = Path(os.environ.get("LLMFAB_CACHE") or Path.home() / ".cache" / "llmfab").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
