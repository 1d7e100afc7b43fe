"""SFT rows: conversations packed into fixed-length rows with the loss on assistant tokens only.

Examples are never split across rows; position ids restart at each example, so (as in
pretraining, see packing) no token attends to another example.
"""

from __future__ import annotations

import logging
import random

import torch

from llmfab.data.chat import IGNORE, encode_chat
from llmfab.errors import DataError

log = logging.getLogger(__name__)


def encode_conversations(tokenizer, conversations: list[list[dict]], max_len: int, where: str = "data"):
    """(ids, mask) per conversation; ones longer than `max_len` are dropped (and counted)."""
    out, dropped = [], 0
    for messages in conversations:
        ids, mask = encode_chat(tokenizer, messages)
        if len(ids) > max_len:
            dropped += 1
            continue
        out.append((ids, mask))
    if dropped:
        log.warning(
            "%s: dropped %d of %d conversations longer than %d tokens", where, dropped, len(conversations), max_len
        )
    if not out:
        raise DataError(f"{where}: every conversation is longer than max_len={max_len} tokens")
    return out, dropped


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, seed: int = 0):
    """First-fit packing in a seeded order: rows of input_ids / position_ids / labels, where the
    label of a token is itself when its mask is 1 and -100 otherwise (prompts, padding)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids, pos, labels = [], [], []
    for i in order:
        ex_ids, ex_mask = examples[i]
        if len(ids) + len(ex_ids) > seq_len:
            rows.append((ids, pos, labels))
            ids, pos, labels = [], [], []
        ids += ex_ids
        pos += list(range(len(ex_ids)))
        labels += [t if m else IGNORE for t, m in zip(ex_ids, ex_mask, strict=True)]
    if ids:
        rows.append((ids, pos, labels))
    out = {"input_ids": [], "position_ids": [], "labels": []}
    for ids, pos, labels in rows:
        pad = seq_len - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["position_ids"].append(pos + list(range(pos[-1] + 1, pos[-1] + 1 + pad)))
        out["labels"].append(labels + [IGNORE] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
