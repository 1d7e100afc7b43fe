"""Object store on a local folder (the default)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmfab.errors import StoreError
from llmfab.storage.base import ObjectStore
from llmfab.storage.keys import join_key, validate_key


class LocalStore(ObjectStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def sub(self, prefix: str) -> LocalStore:
        return LocalStore(self.root / validate_key(prefix))

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put_file(self, key: str, path: str | Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy to a temporary name in the same folder, then rename: readers never see half a file.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_file(self, key: str, path: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise StoreError(f"no object {self.uri_for(key)}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != path.resolve():
            shutil.copyfile(src, path)

    def local_path(self, key: str) -> Path:
        """Where an object lives on disk (local store only: lets readers skip a copy)."""
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise StoreError(f"no object {self.uri_for(key)}")
        return path.stat().st_size

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return iter(())
        keys = (
            join_key(prefix, p.relative_to(base).as_posix())
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".part")
        )
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
