"""SFT rows: conversations packed into fixed-length rows with the loss on assistant tokens only.

Examples are never split across rows; position ids restart at each example, so (as in
pretraining, see packing) no token attends to another example.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import partial

import torch

from llmfab.data.chat import IGNORE, encode_chat
from llmfab.data.options import DataOptions
from llmfab.data.tokenized import map_encode
from llmfab.errors import DataError
from llmfab.train.packing import best_fit_decreasing

log = logging.getLogger(__name__)


def _encode_conversation(tokenizer, messages: list[dict]) -> dict[str, list[int]]:
    ids, mask = encode_chat(tokenizer, messages)
    return {"input_ids": ids, "mask": mask}


def encode_conversations(
    tokenizer, conversations: list[list[dict]], max_len: int, where: str = "data", num_proc: int = 1
):
    """(ids, mask) per conversation (tokenized with Dataset.map over `num_proc` processes); ones longer than
    `max_len` are dropped (and counted)."""
    if not conversations:
        raise DataError(f"{where}: no conversations (empty dataset or split)")
    cols = map_encode(conversations, partial(_encode_conversation, tokenizer), num_proc, desc="tokenize chats")
    out, dropped = [], 0
    for ids, mask in zip(cols["input_ids"], cols["mask"], strict=True):
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
    """Rows of input_ids / position_ids / labels, the label of a token itself where its mask is 1 and -100
    elsewhere (prompts, padding), and row_lengths: a row's real tokens (lm_loss repacks rows padding-free).
    Best-fit decreasing fills every row but the last few nearly to `seq_len`
    (far less padding than starting a row whenever the next example does not fit); the rows then come in
    a seeded order, so a batch's rows are not sorted by length."""
    bins = best_fit_decreasing([len(ids) for ids, _ in examples], seq_len)
    random.Random(seed).shuffle(bins)
    out = {"input_ids": [], "position_ids": [], "labels": [], "row_lengths": []}
    for members in bins:
        ids, pos, labels = [], [], []
        for i in members:
            ex_ids, ex_mask = examples[i]
            ids += ex_ids
            pos += list(range(len(ex_ids)))
            labels += [t if m else IGNORE for t, m in zip(ex_ids, ex_mask, strict=True)]
        pad = seq_len - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["position_ids"].append(pos + list(range(pos[-1] + 1, pos[-1] + 1 + pad)))
        out["labels"].append(labels + [IGNORE] * pad)
        out["row_lengths"].append(len(ids))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


@dataclass
class SFTRows:
    """A chat dataset ready for SFT: its train conversations, their packed rows, and held-out rows of
    its test split (what eval_loss is measured on)."""

    conversations: list[list[dict]]
    train: dict[str, torch.Tensor]
    held_out: dict[str, torch.Tensor]
    examples: int
    dropped: int

    def params(self) -> dict[str, int]:
        return {
            "train_examples": self.examples,
            "dropped_too_long": self.dropped,
            "train_rows": len(self.train["input_ids"]),
        }


def load_sft_rows(
    tokenizer,
    uri: str,
    max_len: int,
    *,
    max_examples: int | None = None,
    seed: int = 0,
    held_out: int = 256,
    options: DataOptions | None = None,
) -> SFTRows:
    """The first `max_examples` train conversations of chat dataset `uri`, packed in a seeded order,
    and the first `held_out` test conversations packed for evaluation (splits as `options` say)."""
    from llmfab.data.io import read_dataset

    train = [r["messages"] for r in read_dataset(uri, "chat", "train", max_examples, options)]
    num_proc = options.num_proc if options else 1
    examples, dropped = encode_conversations(tokenizer, train, max_len, uri, num_proc)
    rows = pack_examples(examples, max_len, tokenizer.pad_token_id, seed)
    test = held_out_rows(tokenizer, uri, max_len, held_out, options)
    return SFTRows(train, rows, test, len(examples), dropped)


def held_out_rows(
    tokenizer, uri: str, max_len: int, limit: int = 256, options: DataOptions | None = None
) -> dict[str, torch.Tensor]:
    """The first `limit` test conversations of chat dataset `uri`, packed (SFT's eval_loss rows)."""
    from llmfab.data.io import read_dataset

    test = [r["messages"] for r in read_dataset(uri, "chat", "test", limit, options)]
    num_proc = options.num_proc if options else 1
    examples = encode_conversations(tokenizer, test, max_len, f"{uri} (test)", num_proc)[0]
    return pack_examples(examples, max_len, tokenizer.pad_token_id)
