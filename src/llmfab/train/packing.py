"""Sequence packing with document boundaries.

Documents are tokenized, each followed by EOS, and laid end to end in rows of `seq_len`. Position
ids restart at 0 for every document; transformers turns restarting position ids (with no
attention mask and no cache) into a block-diagonal causal mask, so no token attends across a
document boundary. The first token of each document gets label -100: nothing in its own
document precedes it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch

from llmfab.errors import DataError

IGNORE = -100


def pack_documents(docs: Iterable[Sequence[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack token lists into rows; a document longer than a row continues as a new piece."""
    rows_ids, rows_pos, rows_labels = [], [], []
    ids, pos, labels = [], [], []

    def flush():
        if not ids:
            return
        pad = seq_len - len(ids)
        rows_ids.append(ids + [pad_id] * pad)
        # Padding continues the last position so it forms no new "document" of its own.
        last = pos[-1]
        rows_pos.append(pos + list(range(last + 1, last + 1 + pad)))
        rows_labels.append(labels + [IGNORE] * pad)

    for doc in docs:
        doc = list(doc)
        while doc:
            room = seq_len - len(ids)
            if room < 2:  # a 1-token piece teaches nothing
                flush()
                ids, pos, labels = [], [], []
                room = seq_len
            piece, doc = doc[:room], doc[room:]
            ids += piece
            pos += list(range(len(piece)))
            labels += [IGNORE, *piece[1:]]
    flush()
    return {
        "input_ids": torch.tensor(rows_ids, dtype=torch.long),
        "position_ids": torch.tensor(rows_pos, dtype=torch.long),
        "labels": torch.tensor(rows_labels, dtype=torch.long),
    }


def mixture_sample(
    docs_by_source: dict[str, list[list[int]]], weights: dict[str, float], n_tokens: int, seed: int
) -> list[list[int]]:
    """Draw documents (with replacement once a source runs out) until `n_tokens` are reached;
    a source is picked with probability proportional to its weight times its document count
    (then a document uniformly), so each source's expected token share is its weight times its
    natural share: weight 2.0 means "twice its natural share"."""
    rng = random.Random(seed)
    sources = [s for s in docs_by_source if docs_by_source[s] and weights.get(s, 1.0) > 0]
    if not sources:
        raise DataError("no documents to sample from (all sources empty or weighted 0)")
    unknown = sorted(set(weights) - set(docs_by_source))
    if unknown:
        raise DataError(
            f"mixture names source(s) {', '.join(unknown)} that the data does not have "
            f"(sources: {', '.join(sorted(docs_by_source))})"
        )
    probs = [weights.get(s, 1.0) * len(docs_by_source[s]) for s in sources]
    orders = {s: [] for s in sources}
    out, total = [], 0
    while total < n_tokens:
        src = rng.choices(sources, probs)[0]
        if not orders[src]:
            orders[src] = list(range(len(docs_by_source[src])))
            rng.shuffle(orders[src])
        doc = docs_by_source[src][orders[src].pop()]
        out.append(doc)
        total += len(doc)
    return out
