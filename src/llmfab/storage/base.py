"""The object-store interface every stage writes through: a local folder or S3."""

from __future__ import annotations

import abc
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmfab.storage.keys import join_key, validate_key


class ObjectStore(abc.ABC):
    """A flat key/value store of files under a root URI. Keys are relative, '/'-separated."""

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The root of this store as a URI (file:///... or s3://bucket/prefix)."""

    @abc.abstractmethod
    def sub(self, prefix: str) -> ObjectStore:
        """A store rooted at `prefix` below this one."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | Path) -> None:
        """Upload a local file; the object appears whole or not at all."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | Path) -> None:
        """Download an object to a local path (parents created)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """All keys below `prefix`, recursively, relative to this store's root, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error."""

    def uri_for(self, key: str = "") -> str:
        return self.uri if not key else f"{self.uri.rstrip('/')}/{validate_key(key)}"

    def put_bytes(self, key: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "blob"
            path.write_bytes(data)
            self.put_file(key, path)

    def get_bytes(self, key: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "blob"
            self.get_file(key, path)
            return path.read_bytes()

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_dir(self, prefix: str, local_dir: str | Path) -> list[str]:
        """Upload every file under `local_dir` below `prefix`; returns the relative names."""
        local_dir = Path(local_dir)
        names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        for name in names:
            self.put_file(join_key(prefix, name), local_dir / name)
        return names

    def get_dir(self, prefix: str, local_dir: str | Path) -> list[str]:
        local_dir = Path(local_dir)
        names = []
        for key in self.list(prefix):
            name = key[len(prefix.strip("/")) + 1 :] if prefix else key
            self.get_file(key, local_dir / name)
            names.append(name)
        return names

    def delete_prefix(self, prefix: str) -> None:
        for key in list(self.list(prefix)):
            self.delete(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
