"""Sequence packing with document boundaries.

Documents are tokenized, each followed by EOS, and laid end to end in rows of `seq_len`. Position
ids restart at 0 for every document; transformers turns restarting position ids (with no
attention mask and no cache) into a block-diagonal causal mask, so no token attends across a
document boundary. The first token of each document gets label -100: nothing in its own
document precedes it.
"""

from __future__ import annotations

import bisect
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


def best_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices of `lengths` (each ≤ width) in bins of at most `width`: longest first, each into the bin it
    fills most (O(n log n) lookups). Every bin but the last few comes out nearly full."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            bins.append([])
            room, b = width, len(bins) - 1
        else:
            room, b = free.pop(at)
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def pack_padded(ids: torch.Tensor, lengths: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded sequences `ids` (N, T) of `lengths` laid padding-free into rows of width T (best-fit
    decreasing), position ids restarting at every sequence (see the module docstring: none attends to
    another). Returns input_ids / position_ids (R, T) and `offsets` (N,): where sequence i starts in the
    flattened rows, so its token t sits at offsets[i] + t of input_ids.flatten(). A row's padding
    continues its last sequence's positions, after every real token of that row."""
    width, device = ids.shape[1], ids.device
    sizes = [int(n) for n in lengths]
    bins = best_fit_decreasing(sizes, width)
    out_ids = torch.full((len(bins), width), pad_id, dtype=ids.dtype, device=device)
    out_pos = torch.zeros((len(bins), width), dtype=torch.long, device=device)
    offsets = torch.zeros(len(lengths), dtype=torch.long)
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            n = sizes[i]
            out_ids[r, at : at + n] = ids[i, :n]
            out_pos[r, at : at + n] = torch.arange(n, device=device)
            offsets[i] = r * width + at
            at += n
        last = sizes[members[-1]]  # the row's padding continues its last sequence's positions
        out_pos[r, at:] = torch.arange(last, last + width - at, device=device)
    return {"input_ids": out_ids, "position_ids": out_pos, "offsets": offsets}


def repack_documents(
    input_ids: torch.Tensor, position_ids: torch.Tensor, row_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The documents of packed rows (B, T) whose first `row_lengths` tokens are real (the rest padding), laid
    again padding-free into rows as wide as the longest document (best-fit decreasing): a batch whose rows
    are a third padding (examples too long to share a row) runs on that many fewer positions, and its
    attention on narrower rows. Returns (input_ids, position_ids) of the new rows and `where` (B·T,): the
    new flattened position of each old one (-1 for padding). A document is a run of positions from 0 (see
    the module docstring); its tokens keep their position ids, so the model computes the same."""
    b, t = input_ids.shape
    device = input_ids.device
    flat_pos = position_ids.flatten()
    valid = (torch.arange(t, device=device) < row_lengths.to(device)[:, None]).flatten()
    doc_of = torch.cumsum((flat_pos == 0) & valid, 0) - 1  # padding keeps its row's last document
    sizes = torch.bincount(doc_of[valid]).tolist()
    width = max(sizes)
    bins = best_fit_decreasing(sizes, width)
    doc_start = torch.zeros(len(sizes), dtype=torch.long)
    tails = []  # (row, first free column, last document's length)
    for r, members in enumerate(bins):
        at = 0
        for d in members:
            doc_start[d] = r * width + at
            at += sizes[d]
        tails.append((r, at, sizes[members[-1]]))
    where = torch.full((b * t,), -1, dtype=torch.long, device=device)
    where[valid] = doc_start.to(device)[doc_of[valid]] + flat_pos[valid]
    new_ids = torch.zeros(len(bins) * width, dtype=input_ids.dtype, device=device)
    new_pos = torch.zeros(len(bins) * width, dtype=torch.long, device=device)
    new_ids[where[valid]] = input_ids.flatten()[valid]
    new_pos[where[valid]] = flat_pos[valid]
    new_pos = new_pos.view(len(bins), width)
    for r, at, last in tails:  # a row's padding continues its last document, as pack_documents pads
        new_pos[r, at:] = torch.arange(last, last + width - at, device=device)
    return new_ids.view(len(bins), width), new_pos, where
