"""Object-store keys and URIs: one parser, one validator."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from llmfab.errors import StoreError

_BAD_CHARS = re.compile(r"[\x00-\x1f\\]")


def validate_key(key: str) -> str:
    """Return a normalised relative key or raise: no absolute paths, no '..', no empty parts."""
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid object key {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise StoreError(f"invalid object key {key!r}: absolute paths are not allowed")
    if _BAD_CHARS.search(key):
        raise StoreError(f"invalid object key {key!r}: control characters and backslashes are not allowed")
    parts = key.rstrip("/").split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise StoreError(f"invalid object key {key!r}: empty, '.' or '..' path segments are not allowed")
    return "/".join(parts)


def join_key(*parts: str) -> str:
    return validate_key("/".join(p.strip("/") for p in parts if p and p.strip("/")))


@dataclass(frozen=True)
class StoreURI:
    """A parsed location: scheme 'file' (root is a local directory) or 's3' (root is bucket[/prefix])."""

    scheme: str
    root: str  # local directory, or "bucket" / "bucket/prefix" for s3

    def __str__(self) -> str:
        if self.scheme == "file":
            return Path(self.root).as_uri()
        return f"s3://{self.root}"


def parse_uri(uri: str | Path) -> StoreURI:
    """Parse 'file:///abs', a plain local path, or 's3://bucket/prefix'."""
    text = str(uri)
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise StoreError(f"invalid S3 URI {text!r}: missing bucket name")
        prefix = parsed.path.strip("/")
        if prefix:
            validate_key(prefix)
        return StoreURI("s3", f"{parsed.netloc}/{prefix}" if prefix else parsed.netloc)
    if text.startswith("file://"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"unsupported store URI {text!r}: file:// URIs name this host only")
        # Path.as_uri() percent-encodes (spaces, '#', non-ASCII): decode on the way back.
        return StoreURI("file", str(Path(unquote(parsed.path)).resolve()))
    if "://" in text:
        raise StoreError(f"unsupported store URI {text!r}: use a local path, file:// or s3://")
    return StoreURI("file", str(Path(text).expanduser().resolve()))
