"""The tiny testbed's datasets, built from the corpus and the verifiable tasks."""

from __future__ import annotations

import random

from llmfab.data.tasks import Example, get_task


def sample_examples(tasks: list[str], n: int, rng: random.Random) -> list[Example]:
    """`n` examples spread evenly over `tasks` (round robin), each drawn from `rng`."""
    return [get_task(tasks[i % len(tasks)]).sample(rng) for i in range(n)]


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


def split(records: list[dict], eval_fraction: float) -> dict[str, list[dict]]:
    n_eval = round(len(records) * eval_fraction)
    return {"train": records[n_eval:], "test": records[:n_eval]}
