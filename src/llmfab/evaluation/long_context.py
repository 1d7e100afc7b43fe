"""Long-context checks: perplexity over rows of a given length, and needle-in-a-haystack
retrieval (a key-value record planted at a chosen depth of a document of records)."""

from __future__ import annotations

import random

import torch

from llmfab.data.io import iter_records
from llmfab.data.tasks import first_int
from llmfab.errors import DataError, NoSplitError
from llmfab.tracking import timing
from llmfab.train.packing import IGNORE


def continuous_rows(docs: list[list[int]], seq_len: int, max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Documents laid end to end, cut into rows of `seq_len` with positions 0..seq_len-1: one
    long context per row (no boundary masking), which is what long-context training needs."""
    stream = [t for d in docs for t in d]
    n_rows = len(stream) // seq_len
    if max_rows is not None:
        n_rows = min(n_rows, max_rows)
    if n_rows == 0:
        raise DataError(f"not enough tokens ({len(stream)}) for one row of {seq_len}")
    ids = torch.tensor(stream[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)
    return {"input_ids": ids, "position_ids": torch.arange(seq_len).expand(n_rows, -1).clone(), "labels": ids.clone()}


def one_per_row(docs: list[list[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Each document (at most `seq_len` tokens) alone in its row, padded; padding is not scored."""
    ids = torch.full((len(docs), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(docs), seq_len), IGNORE, dtype=torch.long)
    for i, doc in enumerate(docs):
        if len(doc) > seq_len:
            raise ValueError(f"document {i} has {len(doc)} tokens, more than a row of {seq_len}")
        ids[i, : len(doc)] = torch.tensor(doc)
        labels[i, : len(doc)] = torch.tensor(doc)
    return {"input_ids": ids, "position_ids": torch.arange(seq_len).expand(len(docs), -1).clone(), "labels": labels}


NEEDLE = "The secret number is {value}. "
QUESTION = "\n\nWhat is the secret number?\n"


def prose_filler(uri: str, split: str) -> list[str]:
    """Haystack paragraphs: the `prose` records of text dataset `uri`'s split (else all its train text)."""
    try:
        texts = [r["text"] for r in iter_records(uri, "text", split) if r["source"] == "prose"]
    except NoSplitError:
        texts = []
    return texts or [r["text"] for r in iter_records(uri, "text", "train")]


def needle_example(tokenizer, length: int, depth: float, rng: random.Random, filler: list[str]):
    """A haystack of `filler` prose of about `length` tokens with one needle sentence at `depth`,
    then the question: (prompt, answer, distractor: a random number of the same form)."""
    value, distractor = rng.randint(1000, 9999), rng.randint(1000, 9999)
    budget = length - len(tokenizer(NEEDLE.format(value=value) + QUESTION + str(value))["input_ids"]) - 2
    if budget < 8:
        raise DataError(f"length {length} leaves no room for a haystack")
    parts, n_tokens = [], 0
    while n_tokens < budget:
        para = rng.choice(filler)
        parts.append(para)
        n_tokens += len(tokenizer(para)["input_ids"]) + 1
    ids = tokenizer("\n".join(parts))["input_ids"][:budget]
    haystack = tokenizer.decode(ids)
    at = haystack.rfind(" ", 0, int(depth * len(haystack))) + 1
    prompt = haystack[:at] + NEEDLE.format(value=value) + haystack[at:] + QUESTION
    return prompt, str(value), str(distractor if distractor != value else value + 1)


def needle_training_docs(tokenizer, length: int, n_docs: int, seed: int, filler: list[str]) -> list[list[int]]:
    """Needle documents of about `length` tokens, needles at random depths, answer appended."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        prompt, answer, _ = needle_example(tokenizer, length, rng.random(), rng, filler)
        docs.append((tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id])[:length])
    return docs


def _answer_nll(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Summed NLL of `answer_ids` after `prompt_ids` (teacher-forced)."""
    ids = torch.tensor([prompt_ids + answer_ids], device=next(model.parameters()).device)
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = IGNORE
    return model(input_ids=ids, labels=labels, use_cache=False).loss.item() * len(answer_ids)


@torch.no_grad()
@timing.timed("score")
def needle_eval(model, tokenizer, length: int, filler: list[str], n_samples: int = 8, seed: int = 1234):
    """At depths spread over a `length`-token haystack: accuracy of the greedy answer, mean NLL
    per answer token, and the retrieval margin NLL(a random number) − NLL(the planted number),
    positive only when the model finds the needle rather than guessing a number."""
    model.eval()
    rng = random.Random(seed)
    correct, nll, tokens, margin = 0, 0.0, 0, 0.0
    for i in range(n_samples):
        prompt, answer, distractor = needle_example(tokenizer, length, (i + 0.5) / n_samples, rng, filler)
        p_ids, a_ids = tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"]
        answer_nll = _answer_nll(model, p_ids, a_ids)
        nll, tokens = nll + answer_nll, tokens + len(a_ids)
        margin += _answer_nll(model, p_ids, tokenizer(distractor)["input_ids"]) - answer_nll
        device = next(model.parameters()).device
        gen = model.generate(
            torch.tensor([p_ids], device=device),
            attention_mask=torch.ones(1, len(p_ids), dtype=torch.long, device=device),
            max_new_tokens=len(a_ids) + 2,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        correct += int(first_int(tokenizer.decode(gen[0, len(p_ids) :], skip_special_tokens=True)) == int(answer))
    return {"needle_acc": correct / n_samples, "needle_nll": nll / max(1, tokens), "needle_margin": margin / n_samples}
