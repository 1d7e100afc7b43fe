"""Long-context checks: perplexity over rows of a given length, and needle-in-a-haystack
retrieval (a key-value record planted at a chosen depth of a document of records)."""

from __future__ import annotations

import random

import torch

from llmfab.data.tasks import KVRetrieval, first_int
from llmfab.train.packing import IGNORE


def continuous_rows(docs: list[list[int]], seq_len: int, max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Documents laid end to end, cut into rows of `seq_len` with positions 0..seq_len-1: one
    long context per row (no boundary masking), which is what long-context training needs."""
    stream = [t for d in docs for t in d]
    n_rows = len(stream) // seq_len
    if max_rows is not None:
        n_rows = min(n_rows, max_rows)
    if n_rows == 0:
        raise ValueError(f"not enough tokens ({len(stream)}) for one row of {seq_len}")
    ids = torch.tensor(stream[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)
    return {"input_ids": ids, "position_ids": torch.arange(seq_len).expand(n_rows, -1).clone(), "labels": ids.clone()}


def needle_example(tokenizer, length: int, depth: float, rng: random.Random) -> tuple[str, str, str]:
    """A records document that fills about `length` tokens with the asked-for key at `depth`:
    (prompt, answer, a distractor: another record's value from the same document)."""
    task = KVRetrieval()
    probe = task.sample(random.Random(0), n_pairs=20)
    per_pair = max(1, len(tokenizer(probe.prompt)["input_ids"]) // 20)
    n_pairs = max(2, int(length * 0.92) // per_pair)
    while True:
        ex = task.sample(rng, n_pairs=n_pairs, depth=depth)
        prompt = f"{ex.prompt}\n"
        if len(tokenizer(prompt + ex.answer)["input_ids"]) <= length or n_pairs <= 2:
            return prompt, ex.answer, str(ex.meta["distractors"][0])
        n_pairs = max(2, int(n_pairs * 0.9))


def needle_training_docs(tokenizer, length: int, n_docs: int, seed: int) -> list[list[int]]:
    """Retrieval documents of about `length` tokens, needles at random depths, answer appended."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        prompt, answer, _ = needle_example(tokenizer, length, rng.random(), rng)
        docs.append(tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id])
    return docs


def _answer_nll(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Summed NLL of `answer_ids` after `prompt_ids` (teacher-forced)."""
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = IGNORE
    return model(input_ids=ids, labels=labels, use_cache=False).loss.item() * len(answer_ids)


@torch.no_grad()
def needle_eval(model, tokenizer, length: int, n_samples: int = 8, seed: int = 1234) -> dict[str, float]:
    """At depths spread over a `length`-token document: accuracy of the greedy answer, mean NLL
    per answer token, and the retrieval margin: NLL(another record's value) − NLL(the asked
    value), positive only when the model finds the asked record rather than guessing a value."""
    model.eval()
    rng = random.Random(seed)
    correct, nll, tokens, margin = 0, 0.0, 0, 0.0
    for i in range(n_samples):
        prompt, answer, distractor = needle_example(tokenizer, length, (i + 0.5) / n_samples, rng)
        p_ids, a_ids = tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"]
        answer_nll = _answer_nll(model, p_ids, a_ids)
        nll, tokens = nll + answer_nll, tokens + len(a_ids)
        margin += _answer_nll(model, p_ids, tokenizer(distractor)["input_ids"]) - answer_nll
        gen = model.generate(
            torch.tensor([p_ids]),
            attention_mask=torch.ones(1, len(p_ids), dtype=torch.long),
            max_new_tokens=len(a_ids) + 2,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        correct += int(first_int(tokenizer.decode(gen[0, len(p_ids) :], skip_special_tokens=True)) == int(answer))
    return {"needle_acc": correct / n_samples, "needle_nll": nll / max(1, tokens), "needle_margin": margin / n_samples}
