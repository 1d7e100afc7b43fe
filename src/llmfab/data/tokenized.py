"""Tokenizing records with `datasets.Dataset.map`: parallel over `num_proc` processes and cached by fingerprint
(of the values, the function and its tokenizer) under llmfab's cache folder, so a rerun on the same data with
the same tokenizer reads the token ids back instead of tokenizing again.

Values travel as JSON text: messages of one conversation may carry keys others lack (tool_calls, name),
and an Arrow struct column would give every message every key (None where absent), which chat templates
read as present.
"""

from __future__ import annotations

import json
from collections.abc import Callable


def _apply(encode: Callable, example: dict) -> dict:
    return encode(json.loads(example["value"]))


def map_encode(values: list, encode: Callable[[object], dict], num_proc: int = 1, desc: str = "tokenize") -> dict:
    """Columns (name -> list, one entry per value, in order) of `encode(value)` for every value; `encode` returns
    a dict of lists of ints (input ids, masks). Make it picklable (a module-level function or a partial of one)
    for num_proc > 1."""
    from functools import partial

    import datasets

    if not values:
        return {}
    from datasets.fingerprint import Hasher

    from llmfab.paths import cache_dir

    ds = datasets.Dataset.from_dict({"value": [json.dumps(v, ensure_ascii=False, default=str) for v in values]})
    fn = partial(_apply, encode)
    fingerprint = Hasher.hash([ds._fingerprint, fn])  # the values' own fingerprint (a hash of their table)
    folder = cache_dir() / "tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    procs = min(num_proc, len(values))
    out = ds.map(
        fn,
        remove_columns=["value"],
        num_proc=procs if procs > 1 else None,
        desc=desc,
        new_fingerprint=fingerprint,
        cache_file_name=str(folder / f"{fingerprint}.arrow"),
    )
    return out.to_dict()
