"""The tiny testbed's datasets, built from the corpus and the verifiable tasks."""

from __future__ import annotations

import random
from collections import Counter

from llmfab.data.tasks import Arithmetic, Example, FormatFollowing, KVRetrieval, get_task


def sample_examples(
    tasks: list[str],
    n: int,
    rng: random.Random,
    *,
    max_operand: int = 50,
    kv_pairs: int = 8,
    format_kinds: tuple[str, ...] = FormatFollowing.KINDS,
) -> list[Example]:
    """`n` examples spread evenly over `tasks` (round robin), each drawn from `rng`; the difficulty
    knobs size the arithmetic operands and the key-value documents."""
    samplers = {
        "arithmetic": Arithmetic(max_operand),
        "kv_retrieval": KVRetrieval(kv_pairs),
        "format": FormatFollowing(tuple(format_kinds)),
    }
    return [samplers.get(t, get_task(t)).sample(rng) for t in (tasks[i % len(tasks)] for i in range(n))]


def chat_record(ex: Example) -> dict:
    messages = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}]
    return {"messages": messages, "task": ex.task, "meta": ex.meta}


def prompt_record(ex: Example) -> dict:
    return {"prompt": ex.prompt, "task": ex.task, "meta": ex.meta}


def preference_record(ex: Example, rng: random.Random) -> dict:
    rejected, level = get_task(ex.task).corrupt(rng, ex)
    return {
        "prompt": ex.prompt,
        "chosen": ex.answer,
        "rejected": rejected,
        "level": level,
        "task": ex.task,
        "meta": ex.meta,
    }


def task_text(ex: Example) -> dict:
    """A task example as plain pre-training text, so the base model has seen the formats."""
    return {"text": f"{ex.prompt}\n{ex.answer}", "source": "tasks"}


def fact_documents(n: int, max_operand: int, rng: random.Random, per_doc: int = 8) -> list[dict]:
    """`n` documents of `per_doc` arithmetic facts each, as equations rather than questions: the
    facts behind held-out questions are known, the questions themselves are never shown."""
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(per_doc):
            a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice("+-")
            lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}")
        docs.append({"text": "\n".join(lines), "source": "facts"})
    return docs


def prompt_of(record: dict) -> str:
    """What must not appear on both sides of a split: the prompt (or the text itself)."""
    if "messages" in record:
        return record["messages"][0]["content"]
    return record.get("prompt", record.get("text", ""))


def split(records: list[dict], eval_fraction: float) -> dict[str, list[dict]]:
    """About `eval_fraction` of the records held out, whole prompts at a time: a prompt that is
    in the test split never appears in train (the tasks repeat prompts)."""
    n_eval = round(len(records) * eval_fraction)
    sizes = Counter(prompt_of(r) for r in records)
    held: set[str] = set()
    count = 0
    for key in sizes:  # first-seen order, so the split is deterministic
        if count >= n_eval:
            break
        held.add(key)
        count += sizes[key]
    return {
        "train": [r for r in records if prompt_of(r) not in held],
        "test": [r for r in records if prompt_of(r) in held],
    }
