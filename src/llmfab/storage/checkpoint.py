"""Atomic checkpoints: files first, a manifest with sizes and sha256 last.

A checkpoint is a prefix in an object store. It counts only once MANIFEST.json is there, and a
reader checks every file against it, so a crash mid-upload leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from llmfab.errors import CheckpointError
from llmfab.paths import cache_dir
from llmfab.storage import open_store
from llmfab.storage.base import ObjectStore
from llmfab.storage.local import LocalStore

MANIFEST = "MANIFEST.json"
FORMAT = "llmfab-checkpoint/1"
_STEP = re.compile(r"^step-(\d+)$")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def file_entry(path: str | Path) -> dict:
    """A file's manifest entry (size and sha256)."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def write_checkpoint(
    store: ObjectStore, local_dir: str | Path, meta: dict | None = None, uploaded: dict[str, dict] | None = None
) -> str:
    """Upload `local_dir` as a checkpoint rooted at `store`; returns its URI. `uploaded`: files other writers (the
    other ranks' ZeRO shards) already put under `store`, by name, with their file_entry: listed in the manifest
    too, and kept. Whoever writes them deletes the old MANIFEST before they do."""
    local_dir = Path(local_dir)
    names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    uploaded = dict(uploaded or {})
    if MANIFEST in names or MANIFEST in uploaded:
        raise CheckpointError(f"{local_dir}: a checkpoint folder may not contain its own {MANIFEST}")
    if set(names) & set(uploaded):
        raise CheckpointError(f"{local_dir}: {sorted(set(names) & set(uploaded))} written twice")
    # Invalidate any previous checkpoint here first, then drop files the new one does not have.
    store.delete(MANIFEST)
    for stale in set(store.list()) - set(names) - set(uploaded):
        store.delete(stale)
    files = dict(uploaded)
    for name in names:
        path = local_dir / name
        files[name] = file_entry(path)
        store.put_file(name, path)
    manifest = {"format": FORMAT, "created": time.time(), "files": files, "meta": meta or {}}
    store.put_text(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return store.uri


def read_manifest(store: ObjectStore) -> dict:
    """The checkpoint's manifest; raises CheckpointError when missing or malformed."""
    if not store.exists(MANIFEST):
        raise CheckpointError(f"{store.uri}: not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(store.get_text(MANIFEST))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{store.uri}/{MANIFEST}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{store.uri}/{MANIFEST}: unknown format {found!r}")
    for name, entry in manifest["files"].items():
        if not (
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"{store.uri}/{MANIFEST}: files.{name}: needs an integer size and a sha256")
    return manifest


def is_checkpoint(store: ObjectStore) -> bool:
    try:
        read_manifest(store)
    except CheckpointError:
        return False
    return True


def verify_checkpoint(store: ObjectStore) -> dict:
    """The manifest of a checkpoint whose files are all there: a local one has every file's sha256 checked, a
    remote one its sizes (no download). Raises CheckpointError otherwise: what may be registered or linked."""
    manifest = read_manifest(store)
    if isinstance(store, LocalStore):
        fetch_checkpoint(store)  # verifies in place, no copy
        return manifest
    for name, entry in manifest["files"].items():
        if not store.exists(name):
            raise CheckpointError(f"{store.uri_for(name)}: listed in {MANIFEST} but missing")
        if store.size(name) != entry["size"]:
            raise CheckpointError(f"{store.uri_for(name)}: size {store.size(name)} does not match manifest")
    return manifest


def _verify_file(uri: str, path: Path, entry: dict) -> None:
    size = path.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(f"{uri}: size {size} does not match manifest ({entry['size']})")
    if sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"{uri}: sha256 does not match manifest")


def fetch_checkpoint(source: str | Path | ObjectStore, dest: str | Path | None = None) -> Path:
    """A verified local folder holding the checkpoint at `source` (URI, path or store).

    A local-store checkpoint is verified in place (no copy unless `dest` is given); a remote one is
    downloaded into `dest` or the cache, keyed by the manifest's hash so a re-fetch is free.
    """
    store = source if isinstance(source, ObjectStore) else open_store(source)
    manifest = read_manifest(store)
    files = manifest["files"]
    if isinstance(store, LocalStore) and dest is None:
        for name, entry in files.items():
            path = store.local_path(name)
            if not path.is_file():
                raise CheckpointError(f"{store.uri_for(name)}: listed in {MANIFEST} but missing")
            _verify_file(store.uri_for(name), path, entry)
        return store.root
    if dest is None:
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:24]
        dest = cache_dir() / "checkpoints" / digest
        if (dest / MANIFEST).is_file():
            return dest
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A private staging folder: concurrent fetches (several ranks on a node) never share one.
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    for name, entry in files.items():
        if not store.exists(name):
            raise CheckpointError(f"{store.uri_for(name)}: listed in {MANIFEST} but missing")
        store.get_file(name, partial / name)
        _verify_file(store.uri_for(name), partial / name, entry)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if (dest / MANIFEST).is_file() and json.loads((dest / MANIFEST).read_text()) == manifest:
        shutil.rmtree(partial)  # another process finished the same fetch first: keep theirs
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def delete_checkpoint(store: ObjectStore) -> None:
    """Remove a checkpoint, its manifest first so it is never seen complete but partial."""
    store.delete(MANIFEST)
    store.delete_prefix("")


def list_step_checkpoints(store: ObjectStore) -> list[tuple[int, str]]:
    """Complete `step-N` checkpoints directly under `store`, oldest first, as (step, name)."""
    steps = set()
    for key in store.list():
        head, _, tail = key.partition("/")
        match = _STEP.match(head)
        if match and tail == MANIFEST:
            steps.add((int(match.group(1)), head))
    return sorted(s for s in steps if is_checkpoint(store.sub(s[1])))


def latest_step_checkpoint(store: ObjectStore) -> tuple[int, ObjectStore] | None:
    """The newest complete `step-N` checkpoint under `store`, for resuming."""
    found = list_step_checkpoints(store)
    if not found:
        return None
    step, name = found[-1]
    return step, store.sub(name)
