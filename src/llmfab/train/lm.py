"""Causal-LM pieces: tokenising a text dataset, the packed LM loss, held-out evaluation."""

from __future__ import annotations

import logging
import math
import random

import torch
import torch.nn.functional as F

from llmfab.data.io import iter_records
from llmfab.data.options import DataOptions
from llmfab.errors import DataError, NoSplitError
from llmfab.tracking import timing
from llmfab.train.head_positions import fits_budget, target_logps_at
from llmfab.train.packing import IGNORE, mixture_sample, pack_documents, repack_documents
from llmfab.train.trainer import SummedLoss

log = logging.getLogger(__name__)


def tokenize_texts(tokenizer, texts: list[str], batch: int = 256) -> list[list[int]]:
    """Token ids of each text followed by EOS (the document separator)."""
    out = []
    for i in range(0, len(texts), batch):
        ids = tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]
        out.extend([*x, tokenizer.eos_token_id] for x in ids)
    return out


def load_corpus(
    uris: str | list[str],
    tokenizer,
    split: str,
    sources: list[str] | None = None,
    options: DataOptions | None = None,
):
    """Tokenised documents of one or more text datasets, grouped by `source` (the mixture component).
    With `options`, `split` is a role (see data.options)."""
    texts: dict[str, list[str]] = {}
    for uri in [uris] if isinstance(uris, str) else uris:
        for record in iter_records(uri, "text", split, options):
            if sources is None or record["source"] in sources:
                texts.setdefault(record["source"], []).append(record["text"])
    return {src: tokenize_texts(tokenizer, docs) for src, docs in sorted(texts.items())}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens a causal-LM batch learns to predict: labels other than -100, past the first position."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_t −log p(x_t | x_<t) over the positions t ≥ 1 whose label is not -100 (logits and labels (B, T))."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def lm_forward(model, batch: dict[str, torch.Tensor]):
    """The model's outputs on a packed batch; position ids carry the document boundaries (see packing)."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, targets): the flattened (B·T) positions t whose next label is a target (not -100), and those
    labels; position t predicts label t + 1 of its row, the last position of a row predicts nothing."""
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = labels[:, 1:]
    flat = nxt.flatten()
    index = (flat != IGNORE).nonzero().squeeze(-1)
    return index, flat[index]


# Above this share of positions carrying loss (documents: all but each piece's first token and the
# padding), selecting them for the head saves little and costs a copy: the full logits are computed,
# as long as they fit head_positions.LOGITS_BUDGET.
HEAD_ON_ALL_ABOVE = 0.5


def _lm_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    # token_nll_sum's sum, with the head and the log-softmax on the target positions only (head_positions),
    # a chunk at a time where their logits would be many (LOGITS_BUDGET),
    # and rows that know their padding (`row_lengths`) repacked padding-free (packing.repack_documents).
    index, targets = loss_positions(batch["labels"])
    documents = "row_lengths" not in batch and len(index) > HEAD_ON_ALL_ABOVE * batch["labels"].numel()
    if documents and fits_budget(model, batch["labels"].numel()):
        return token_nll_sum(lm_forward(model, batch).logits, batch["labels"]), {}
    ids, pos = batch["input_ids"], batch["position_ids"]
    if "row_lengths" in batch:
        ids, pos, where = repack_documents(ids, pos, batch["row_lengths"])
        index = where[index]
    return -target_logps_at(model, index, targets, input_ids=ids, position_ids=pos).sum(), {}


# Next-token loss summed over target tokens; the Trainer divides by the step's target tokens.
lm_loss = SummedLoss(_lm_loss_sum, target_tokens)


@torch.no_grad()
@timing.timed("score")
def eval_lm_loss(model, packed: dict[str, torch.Tensor], batch_size: int = 8) -> float:
    """Token-weighted mean loss over packed rows."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(packed["input_ids"]), batch_size):
        rows = {k: v[i : i + batch_size].to(device) for k, v in packed.items()}
        n = target_tokens(rows)
        if n:
            total += lm_loss(model, rows)[0].item()
            count += n
    if not count:
        raise DataError("held-out rows contain no tokens to score")
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def pack_eval(docs_by_source: dict[str, list[list[int]]], seq_len: int, pad_id: int, max_rows: int, seed: int = 0):
    """Held-out rows drawn from every source (documents shuffled with a fixed seed)."""
    docs = [d for src in sorted(docs_by_source) for d in docs_by_source[src]]
    if not docs:
        raise DataError("no held-out documents to evaluate on")
    random.Random(seed).shuffle(docs)
    packed = pack_documents(docs, seq_len, pad_id)
    return {k: v[:max_rows] for k, v in packed.items()}


def corpus_splits(
    uris: str | list[str],
    tokenizer,
    sources: list[str] | None = None,
    eval_fraction: float = 0.05,
    options: DataOptions | None = None,
):
    """(train, held-out) documents by source. With `options`, their splits and held-out share (see
    data.options); without, a dataset lacking a 'test' split (one file, say) gives the first
    `eval_fraction` of its documents per source to held-out instead."""
    train: dict[str, list[list[int]]] = {}
    test: dict[str, list[list[int]]] = {}
    for uri in [uris] if isinstance(uris, str) else uris:
        own_train = load_corpus(uri, tokenizer, "train", sources, options)
        try:
            own_test = load_corpus(uri, tokenizer, "test", sources, options)
        except NoSplitError:
            if options is not None:
                raise  # the options held out what they could: test_size=0 and no test split
            log.warning("%s has no test split: holding out %.0f%% of its documents", uri, 100 * eval_fraction)
            own_test = {}
            for src, docs in own_train.items():
                n = min(len(docs) - 1, max(1, round(len(docs) * eval_fraction))) if len(docs) > 1 else 0
                own_test[src], own_train[src] = docs[:n], docs[n:]
        for target, part in ((train, own_train), (test, own_test)):
            for src, docs in part.items():
                target.setdefault(src, []).extend(docs)
    return train, test


def step_batch(rows: dict[str, torch.Tensor], step: int, micro: int, batch_size: int, per_step: int):
    """Micro-batch `micro` of optimizer step `step` (`per_step` micro-batches a step, all ranks
    together): a pure function of its arguments, so a resumed run sees the same batches."""
    start = ((step * per_step + micro) * batch_size) % len(next(iter(rows.values())))
    return {k: v[start : start + batch_size] for k, v in rows.items()}


class PackedCorpus:
    """A text dataset tokenised, mixed, packed and cut to exactly the rows a run consumes, plus a
    held-out slice; `batch_for_step` is deterministic so a resumed run sees the same batches."""

    def __init__(
        self,
        corpus_uri: str,
        tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        grad_accum: int,
        max_steps: int,
        mixture: dict[str, float],
        sources: list[str] | None,
        eval_rows: int,
        seed: int,
        options: DataOptions | None = None,
    ):
        from llmfab.train.distributed import micro_batches_per_step

        # Every rank builds the same rows; each takes its own micro-batches of every step.
        self.batch_size, self.per_step = batch_size, micro_batches_per_step(grad_accum)
        rows_needed = max_steps * self.per_step * batch_size
        train_docs, test_docs = corpus_splits(corpus_uri, tokenizer, sources, options=options)
        if not any(train_docs.values()):
            names = corpus_uri if isinstance(corpus_uri, str) else ", ".join(corpus_uri)
            only = f" of sources {', '.join(sources)}" if sources else ""
            raise DataError(f"{names}: no text records{only} in split 'train' (empty dataset)")
        docs = mixture_sample(train_docs, mixture, rows_needed * seq_len, seed)
        self.train = {k: v[:rows_needed] for k, v in pack_documents(docs, seq_len, tokenizer.pad_token_id).items()}
        self.held_out = pack_eval(test_docs, seq_len, tokenizer.pad_token_id, eval_rows, seed)

    def batch_for_step(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        return step_batch(self.train, step, micro, self.batch_size, self.per_step)

    def evaluate(self, model) -> dict[str, float]:
        loss = eval_lm_loss(model, self.held_out, self.batch_size)
        return {"eval_loss": loss, "eval_ppl": perplexity(loss)}
