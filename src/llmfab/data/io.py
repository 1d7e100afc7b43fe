"""Read and write datasets: JSONL, JSON, Parquet or HF `datasets` folders, local, in the object store or
on the Hugging Face hub.

A dataset written by llmfab is a folder (store prefix) with one `<split>.jsonl` per split and a
`dataset.json` describing its kind and counts. Readers also accept a single file, a folder of shards
named the hub's way (`data/train_sft-00000-of-00001.parquet`: the split is the name before the shard
number, any name), a `datasets.save_to_disk` folder (Dataset or DatasetDict), and `hf://ORG/NAME[@REV]` or
`hf://datasets/ORG/NAME` (the hub snapshot, read as such a folder). Splits are never merged: asking for a
split the dataset lacks is a NoSplitError naming the ones it has.

Records are streamed (a corpus is never held in memory), renamed by the `columns` mapping, normalised to
their kind's form (see schemas) and validated; the first bad one raises DataError naming the file and
line (or row).
"""

from __future__ import annotations

import json
import logging
import random
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from llmfab.config.base import field_path
from llmfab.data.options import DataOptions
from llmfab.data.schemas import SCHEMAS, UNION_TAGS
from llmfab.errors import DataError, NoSplitError
from llmfab.storage import ObjectStore, open_store
from llmfab.storage.keys import parse_uri
from llmfab.storage.local import LocalStore

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
NOT_DATA = ("dataset.json", "dataset_infos.json")  # metadata beside the data files
SPLIT_WORDS = ("train", "test", "validation", "valid", "dev", "eval")
SHARD = re.compile(r"^(?P<split>.+?)-\d+-of-\d+(-[0-9a-f]+)?$")  # the hub's <split>-00000-of-00002[-hash]
HOLDOUT_SEED = 0  # one held-out set per dataset, whatever each stage's seed: no stage trains on another's test


def _schema(kind: str):
    if kind not in SCHEMAS:
        raise DataError(f"unknown dataset kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    return SCHEMAS[kind]


def _rename(record: dict, columns: dict[str, str], where: str) -> dict:
    """The record with each dataset column of `columns` (llmfab field -> column) under its llmfab field."""
    missing = [column for column in columns.values() if column not in record]
    if missing:
        raise DataError(
            f"{where}: no column {missing[0]!r} (columns maps llmfab field -> dataset column: "
            f"{columns}; this row has columns {sorted(record)})"
        )
    out = {k: v for k, v in record.items() if k not in columns.values()}
    out.update({name: record[column] for name, column in columns.items()})
    return out


def validate_record(record, kind: str, where: str, columns: dict[str, str] | None = None) -> dict:
    """`record` normalised to its kind's form (see schemas); DataError naming `where` and the field if invalid."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if columns:
        record = _rename(record, columns, where)
    try:
        return _schema(kind).model_validate(record).model_dump()
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for i, p in enumerate(err["loc"]) if not (i and p in UNION_TAGS))
        msg = err["msg"].removeprefix("Value error, ")
        raise DataError(f"{where}: field '{field_path(loc)}': {msg}") from None


# -- one file's rows, each with where it came from -------------------------------------------------


def _iter_jsonl(path: Path, name: str) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is fine
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
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
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


def _iter_file(path: Path, name: str) -> Iterator[tuple[str, object]]:
    if name.endswith(".parquet"):
        return _iter_parquet(path, name)
    if name.endswith(".json"):
        return _iter_json(path, name)
    return _iter_jsonl(path, name)


def _count_file(path: Path, name: str) -> int:
    """Rows of a file without parsing them where the format allows (held-out sets need the total)."""
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if name.endswith(".jsonl"):
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    return sum(1 for _ in _iter_file(path, name))


# -- a dataset's splits ----------------------------------------------------------------------------


def split_of(key: str, declared: frozenset[str] = frozenset()) -> str | None:
    """The split a data file belongs to by its name, None when the name says none:
    data/train_sft-00000-of-00001.parquet -> train_sft (any name before a shard number),
    test.jsonl -> test, train/part-0.jsonl -> train, train_gen.jsonl -> train_gen (a split word in the name),
    <name>.jsonl -> name when dataset.json declares it."""
    parts = key.split("/")
    stem = parts[-1].split(".")[0]
    if match := SHARD.match(stem):
        return match["split"]
    if stem in declared or stem in SPLIT_WORDS or set(re.split(r"[_\-]", stem)) & set(SPLIT_WORDS):
        return stem
    for folder in reversed(parts[:-1]):
        if folder in SPLIT_WORDS:
            return folder
    return None


@dataclass
class _Splits:
    """A dataset opened for reading: its rows per split name (None: files whose names give no split)."""

    uri: str
    files: dict[str | None, list[tuple[str, Path]]] = field(default_factory=dict)
    hf: dict | None = None  # split -> datasets.Dataset, for a save_to_disk folder

    def _stored(self) -> dict:
        return self.hf if self.hf is not None else self.files

    def named(self) -> list[str]:
        return sorted(s for s in self._stored() if s is not None)

    def has(self, split: str) -> bool:
        return self._key(split) is not False

    def _key(self, split: str):
        """The stored key of `split` (an unsplit dataset is its 'train' split); False when absent."""
        stored = self._stored()
        if split in stored:
            return split
        if split == "train" and None in stored and not self.named():
            return None
        return False

    def require(self, split: str, hint: str = "") -> None:
        if self.has(split):
            return
        if not self.named():
            if self.uri.endswith(FILE_SUFFIXES):
                raise NoSplitError(f"{self.uri}: a single file has no {split!r} split (it is the 'train' split){hint}")
            raise NoSplitError(
                f"{self.uri}: no split {split!r} (its files name no split: it is the 'train' split){hint}"
            )
        raise NoSplitError(f"{self.uri}: no split {split!r}; its splits: {', '.join(self.named())}{hint}")

    def rows(self, split: str | None) -> Iterator[tuple[str, object]]:
        stored = self._stored()
        keys = [self._key(split)] if split is not None else list(stored)
        for key in keys:
            if self.hf is not None:
                name = f"{self.uri}[{key}]" if key is not None else self.uri
                for row, record in enumerate(self.hf[key]):
                    yield f"{name}: row {row}", record
            else:
                for name, path in self.files[key]:
                    yield from _iter_file(path, name)

    def count(self, split: str) -> int:
        key = self._key(split)
        if self.hf is not None:
            return len(self.hf[key])
        return sum(_count_file(path, name) for name, path in self.files[key])


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


def _open(text: str, tmp: Path) -> _Splits:
    from llmfab.hub import is_hub_uri, snapshot

    if is_hub_uri(text):
        return _open_folder(open_store(snapshot(text, repo_type="dataset")), text, tmp)
    if text.endswith(FILE_SUFFIXES):
        parent, _, fname = text.rstrip("/").rpartition("/")
        if not parent and parse_uri(text).scheme == "file":
            parent = str(Path(text).resolve().parent)
        store = open_store(parent or ".")
        if not store.exists(fname):
            raise DataError(f"{text}: no such dataset file")
        return _Splits(text, files={None: _materialise(store, [fname], tmp)})
    return _open_folder(open_store(text), text, tmp)


def _open_folder(store: ObjectStore, text: str, tmp: Path) -> _Splits:
    all_keys = list(store.list())
    if not all_keys:
        raise DataError(f"{text}: no dataset found (empty or missing folder)")
    if any(k in HF_MARKERS or k.endswith(tuple("/" + m for m in HF_MARKERS)) for k in all_keys):
        import datasets

        if isinstance(store, LocalStore):
            root = store.root
        else:
            _materialise(store, all_keys, tmp)
            root = tmp
        ds = datasets.load_from_disk(str(root))
        return _Splits(text, hf=dict(ds) if isinstance(ds, datasets.DatasetDict) else {None: ds})
    declared = frozenset()
    if "dataset.json" in all_keys:
        declared = frozenset(json.loads(store.get_text("dataset.json")).get("splits", {}))
    data_keys = [k for k in all_keys if k.endswith(FILE_SUFFIXES) and k.rpartition("/")[2] not in NOT_DATA]
    if not data_keys:
        raise DataError(f"{text}: no .jsonl, .json or .parquet files")
    by_split: dict[str | None, list[str]] = {}
    for key in data_keys:
        by_split.setdefault(split_of(key, declared), []).append(key)
    if None in by_split and len(by_split) > 1:
        log.warning("%s: ignoring files that name no split: %s", text, ", ".join(by_split.pop(None)))
    return _Splits(text, files={s: _materialise(store, keys, tmp) for s, keys in by_split.items()})


def _held_out(splits: _Splits, train: str, options: DataOptions) -> set[int]:
    """Row indices of `train` held out as the test split: a seeded choice of test_size rows."""
    total = splits.count(train)
    k = options.held_out_count(total)
    log.info("%s: no split %r: holding out %d of the %d %r records", splits.uri, options.test_split, k, total, train)
    return set(random.Random(HOLDOUT_SEED).sample(range(total), k))


def _role_rows(splits: _Splits, role: str, options: DataOptions) -> Iterator[tuple[str, object]]:
    """Rows of role 'train' or 'test' under `options` (see data.options)."""
    train, test = options.train_split, options.test_split
    if splits.has(options.split_for(role)) and (role == "test" or splits.has(test) or not options.test_size):
        return splits.rows(options.split_for(role))
    splits.require(train, " (set train_split)" if role == "train" else "")
    if not options.test_size:
        splits.require(test, " (set test_split, or test_size to hold out part of the train split)")
    held = _held_out(splits, train, options)
    keep = (lambda i: i in held) if role == "test" else (lambda i: i not in held)
    return (row for i, row in enumerate(splits.rows(train)) if keep(i))


def iter_records(
    uri: str | Path, kind: str, split: str | None = "train", options: DataOptions | None = None
) -> Iterator[dict]:
    """Validated records of `kind` from the dataset at `uri` (file or folder; local, s3:// or hf://).

    Without `options`, `split` is a split's name (None: every split). With them it is a role, "train" or
    "test", read as the options say: their split names, their held-out share, their column mapping."""
    _schema(kind)
    columns = options.columns if options else None
    with tempfile.TemporaryDirectory(prefix="llmfab-data-") as tmpdir:
        splits = _open(str(uri), Path(tmpdir))
        if options is not None:
            rows = _role_rows(splits, split or "train", options)
        else:
            if split is not None:
                splits.require(split)
            rows = splits.rows(split)
        for where, record in rows:
            yield validate_record(record, kind, where, columns)


def read_dataset(
    uri: str | Path,
    kind: str,
    split: str | None = "train",
    limit: int | None = None,
    options: DataOptions | None = None,
) -> list[dict]:
    out = []
    for record in iter_records(uri, kind, split, options):
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
