"""The tiny testbed's datasets, built from the corpus and the verifiable tasks."""

from __future__ import annotations

import random
from collections import Counter

from llmfab.data.tasks import Arithmetic, Example, FormatFollowing, KVRetrieval, WordList, get_task, item_key
from llmfab.errors import DataError


def sample_examples(
    tasks: list[str],
    n: int,
    rng: random.Random,
    *,
    max_operand: int = 50,
    kv_pairs: int = 8,
    format_kinds: tuple[str, ...] = FormatFollowing.KINDS,
    max_repeat: int = 5,
    list_kinds: tuple[str, ...] = WordList.KINDS,
    max_items: int = 5,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[Example]:
    """`n` examples spread evenly over `tasks` (round robin), each drawn from `rng`, none of whose
    items is in `exclude`; the difficulty knobs size the arithmetic operands, the repeat counts
    and the key-value documents."""
    samplers = {
        "arithmetic": Arithmetic(max_operand),
        "kv_retrieval": KVRetrieval(kv_pairs),
        "format": FormatFollowing(tuple(format_kinds), max_repeat),
        "wordlist": WordList(tuple(list_kinds), max_items),
    }
    out = []
    for task in (tasks[i % len(tasks)] for i in range(n)):
        sampler = samplers.get(task, get_task(task))
        for _ in range(1000):
            ex = sampler.sample(rng)
            if ex.key not in exclude:
                break
        else:
            raise DataError(f"task {task!r}: every item drawn is held out; raise the task's difficulty knobs")
        out.append(ex)
    return out


def distinct_examples(tasks: list[str], n: int, rng: random.Random, **knobs) -> list[Example]:
    """`n` examples of `n` different items (evenly over `tasks`): a held-out set in which one item
    counts once."""
    out: list[Example] = []
    seen: set[str] = set()
    for _ in range(100):
        if len(out) >= n:
            break
        for ex in sample_examples(tasks, n, rng, **knobs):
            if ex.key not in seen and len(out) < n:
                seen.add(ex.key)
                out.append(ex)
    if len(out) < n:
        raise DataError(f"only {len(out)} distinct items in tasks {tasks} with these knobs; {n} held out asked for")
    return out


def demonstration(ex: Example, rng: random.Random, error_rate: float) -> Example:
    """What an annotator writes for `ex`: the reference, or with probability error_rate x 2 x
    difficulty (error_rate on average, none on the easiest items) the task's typical mistake. Human
    demonstrations are wrong more often on hard items, and in the same way (miscounting, say): a model
    that imitates them learns the mistake, which a verifier or a reward model can then correct."""
    if error_rate and rng.random() < min(0.95, 2 * error_rate * ex.difficulty):
        return Example(ex.task, ex.prompt, get_task(ex.task).slip(ex), ex.meta)
    return ex


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
    """The record's prompt (or the text itself)."""
    if "messages" in record:
        return record["messages"][0]["content"]
    return record.get("prompt", record.get("text", ""))


def key_of(record: dict) -> str:
    """What must not appear on both sides of a split: a task record's item (in any phrasing), else its prompt."""
    if record.get("task"):
        return item_key(record["task"], record.get("meta") or {}, prompt_of(record))
    return prompt_of(record)


def split(records: list[dict], eval_fraction: float) -> dict[str, list[dict]]:
    """About `eval_fraction` of the records held out, whole items at a time: an item that is in
    the test split never appears in train, in any phrasing (the tasks repeat items)."""
    n_eval = round(len(records) * eval_fraction)
    sizes = Counter(key_of(r) for r in records)
    held: set[str] = set()
    count = 0
    for key in sizes:  # first-seen order, so the split is deterministic
        if count >= n_eval:
            break
        held.add(key)
        count += sizes[key]
    return {
        "train": [r for r in records if key_of(r) not in held],
        "test": [r for r in records if key_of(r) in held],
    }
