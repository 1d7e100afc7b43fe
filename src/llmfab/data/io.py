"""Read and write datasets: JSONL, Parquet or HF `datasets` folders, local or in the object store.

A dataset written by llmfab is a folder (store prefix) with one `<split>.jsonl` per split and a
`dataset.json` describing its kind and counts. Readers accept that, a single file, a folder of
shards, or a `datasets.save_to_disk` folder. Every record is validated against its kind's schema,
and the first bad one raises DataError naming the file and line (or row).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from llmfab.config.base import field_path
from llmfab.data.schemas import SCHEMAS
from llmfab.errors import DataError, NoSplitError
from llmfab.storage import ObjectStore, open_store
from llmfab.storage.keys import parse_uri
from llmfab.storage.local import LocalStore

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _schema(kind: str):
    if kind not in SCHEMAS:
        raise DataError(f"unknown dataset kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    return SCHEMAS[kind]


def validate_record(record, kind: str, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        return _schema(kind).model_validate(record).model_dump()
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DataError(f"{where}: field '{field_path(tuple(err['loc']))}': {err['msg']}") from None


def _iter_jsonl(path: Path, name: str) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{name}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                yield f"{name}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def _iter_json(path: Path, name: str) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        # A .json file may also be JSON lines (a common mislabel): fall back to that.
        if exc.msg == "Extra data":
            yield from _iter_jsonl(path, name)
            return
        raise DataError(f"{name}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON array of records or JSON lines")
    for i, record in enumerate(data):
        yield f"{name}: record {i}", record


def _iter_parquet(path: Path, name: str) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for record in batch.to_pylist():
            yield f"{name}: row {row}", record
            row += 1


def _iter_hf_dir(path: Path, name: str, split: str | None) -> Iterator[tuple[str, object]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise NoSplitError(f"{name}: dataset has splits {sorted(ds)}; ask for one of them (got {split!r})")
        ds, name = ds[split], f"{name}[{split}]"
    elif split not in (None, "train"):
        raise NoSplitError(f"{name}: an unsplit dataset has no {split!r} split")
    for row, record in enumerate(ds):
        yield f"{name}: row {row}", record


def _iter_file(path: Path, name: str) -> Iterator[tuple[str, object]]:
    if name.endswith(".parquet"):
        return _iter_parquet(path, name)
    if name.endswith(".json"):
        return _iter_json(path, name)
    return _iter_jsonl(path, name)


SPLIT_NAMES = ("train", "test", "validation", "eval")


def _split_of(key: str) -> str | None:
    """The split a file belongs to by name: train.jsonl, test-00000-of-00002.parquet, test/x.jsonl."""
    parts = key.split("/")
    stem = parts[-1].split(".")[0]
    for name in SPLIT_NAMES:
        if stem == name or stem.startswith(f"{name}-") or name in parts[:-1]:
            return name
    return None


def _materialise(store: ObjectStore, keys: list[str], tmp: Path) -> list[tuple[str, Path]]:
    """Local paths for `keys`: in place for a local store, downloaded otherwise."""
    out = []
    for key in keys:
        if isinstance(store, LocalStore):
            out.append((str(store.local_path(key)), store.local_path(key)))
        else:
            store.get_file(key, tmp / key)
            out.append((store.uri_for(key), tmp / key))
    return out


def iter_records(uri: str | Path, kind: str, split: str | None = "train") -> Iterator[dict]:
    """Validated records of `kind` from the dataset at `uri` (file or folder; local or s3://)."""
    _schema(kind)
    text = str(uri)
    with tempfile.TemporaryDirectory(prefix="llmfab-data-") as tmpdir:
        tmp = Path(tmpdir)
        if text.endswith(FILE_SUFFIXES):
            parent, _, fname = text.rstrip("/").rpartition("/")
            if not parent and parse_uri(text).scheme == "file":
                parent = str(Path(text).resolve().parent)
            store, keys = open_store(parent or "."), [fname]
            if not store.exists(fname):
                raise DataError(f"{text}: no such dataset file")
            if split not in (None, "train"):
                raise NoSplitError(f"{text}: a single file has no {split!r} split")
            sources = _materialise(store, keys, tmp)
        else:
            store = open_store(text)
            all_keys = list(store.list())
            if not all_keys:
                raise DataError(f"{text}: no dataset found (empty or missing folder)")
            if any(k in HF_MARKERS or k.endswith(tuple("/" + m for m in HF_MARKERS)) for k in all_keys):
                if isinstance(store, LocalStore):
                    root = store.root
                else:
                    _materialise(store, all_keys, tmp)
                    root = tmp
                for where, record in _iter_hf_dir(root, text, split):
                    yield validate_record(record, kind, where)
                return
            data_keys = [k for k in all_keys if k.endswith(FILE_SUFFIXES) and k != "dataset.json"]
            if split is not None:
                named = [k for k in data_keys if _split_of(k) == split]
                if named:
                    data_keys = named
                elif split != "train" or any(_split_of(k) for k in data_keys):
                    raise NoSplitError(f"{text}: no split {split!r} (files: {', '.join(data_keys)})")
            if not data_keys:
                raise DataError(f"{text}: no .jsonl, .json or .parquet files")
            sources = _materialise(store, data_keys, tmp)
        for name, path in sources:
            for where, record in _iter_file(path, name):
                yield validate_record(record, kind, where)


def read_dataset(uri: str | Path, kind: str, split: str | None = "train", limit: int | None = None) -> list[dict]:
    out = []
    for record in iter_records(uri, kind, split):
        out.append(record)
        if limit is not None and len(out) >= limit:
            break
    return out


def write_dataset(store: ObjectStore, splits: dict[str, list[dict]], kind: str, meta: dict | None = None) -> str:
    """Validate and write `splits` as `<split>.jsonl` files plus `dataset.json`; returns the URI."""
    counts = {}
    for split, records in splits.items():
        lines = []
        for i, record in enumerate(records):
            lines.append(json.dumps(validate_record(record, kind, f"{split} record {i}"), ensure_ascii=False))
        store.put_text(f"{split}.jsonl", "\n".join(lines) + ("\n" if lines else ""))
        counts[split] = len(records)
    info = {"kind": kind, "splits": counts, "meta": meta or {}}
    store.put_text("dataset.json", json.dumps(info, indent=1, sort_keys=True))
    return store.uri
