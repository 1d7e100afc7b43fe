"""Gold task reward: generate answers to held-out task prompts and score them with the tasks'
verifiable rewards (the testbed's ground truth, which no stage trains on directly)."""

from __future__ import annotations

import logging
from collections import defaultdict

from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.data.io import iter_records
from llmfab.data.options import DataOptions
from llmfab.data.schemas import last_text
from llmfab.data.tasks import TASKS, gold_reward
from llmfab.errors import DataError

log = logging.getLogger(__name__)
SKIPPED = "skipped: no testbed tasks"  # the gold_eval param of a stage whose data the gold reward cannot score


class NoGoldTasks(DataError):
    """The dataset has records, none of a task the testbed's gold reward knows (data from elsewhere)."""


def task_prompts(
    uri: str,
    kind: str,
    split: str = "test",
    limit: int | None = None,
    *,
    gold_only: bool = True,
    options: DataOptions | None = None,
) -> list[dict]:
    """{prompt, task, meta} of the records of a prompt, preference or chat dataset whose task has
    a gold reward (with gold_only=False, of every record); a chat record's prompt is its last user turn.
    With `options`, `split` is a role (see data.options)."""
    out, seen = [], 0
    for record in iter_records(uri, kind, split, options):
        seen += 1
        if gold_only and record.get("task") not in TASKS:
            continue
        if kind == "chat":
            users = [m for m in record["messages"] if m["role"] == "user"]
            prompt = users[-1]["content"] if users else None
        else:
            prompt = record["prompt"]
        if prompt:
            out.append({"prompt": prompt, "task": record["task"], "meta": record.get("meta") or {}})
        if limit and len(out) >= limit:
            break
    if not out and seen:
        raise NoGoldTasks(f"{uri}: no records with a gold-reward task (a testbed task) in split {split!r}")
    if not out:
        raise DataError(f"{uri}: no records in split {split!r}")
    return out


def score_gold(records: list[dict], responses: list[str]) -> list[float]:
    return [gold_reward(r["task"], r["meta"], resp) for r, resp in zip(records, responses, strict=True)]


def gold_eval(model, tokenizer, records: list[dict], *, max_new_tokens: int = 32, batch_size: int = 32, seed: int = 0):
    """Greedy answers to `records`; returns (metrics, sample rows). Metrics: mean gold reward
    overall and per task, mean response length in tokens."""
    from llmfab.generation import generate_chat

    responses = [
        r[0]
        for r in generate_chat(
            model,
            tokenizer,
            [r["prompt"] for r in records],
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
        )
    ]
    rewards = score_gold(records, responses)
    by_task = defaultdict(list)
    for record, reward in zip(records, rewards, strict=True):
        by_task[record["task"]].append(reward)
    metrics = {"gold_reward": sum(rewards) / len(rewards)}
    metrics.update({f"gold_reward_{task}": sum(v) / len(v) for task, v in sorted(by_task.items())})
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    metrics["response_tokens"] = sum(lengths) / len(lengths)
    rows = {
        "task": [r["task"] for r in records],
        "prompt": [last_text(r["prompt"])[-200:] for r in records],
        "response": responses,
        "gold_reward": rewards,
    }
    return metrics, rows


class GoldEvalConfig(StrictModel):
    """How a stage measures its policy on the verifiable tasks (before and after training)."""

    prompts: int = Field(
        256, ge=0, description="held-out task prompts to answer greedily (one moves the score < 0.5 points); 0: off"
    )
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(32, gt=0)


def eval_records(
    config: GoldEvalConfig, inputs: dict[str, str], fallback: tuple[str, str], options: DataOptions | None = None
) -> list[dict]:
    """The prompts a stage evaluates on: its `eval_prompts` input's test split, else the test split
    of its own data (`fallback` = (input name, dataset kind), read as `options` say). [] when that data has
    no testbed tasks (a dataset from elsewhere): the gold reward cannot score it, and the stage says so."""
    if not config.prompts:
        return []
    try:
        if "eval_prompts" in inputs:
            return task_prompts(inputs["eval_prompts"], "prompt", "test", config.prompts)
        name, kind = fallback
        return task_prompts(inputs[name], kind, "test", config.prompts, options=options)
    except NoGoldTasks as exc:
        log.warning("%s: gold-reward evaluation skipped", exc)
        return []


def log_gold_eval(model, tokenizer, records: list[dict], config: GoldEvalConfig, ctx, suffix: str = "") -> dict:
    """Run gold_eval and log its metrics (named `gold_reward{suffix}`, ...) and its samples table."""
    if not records:
        if config.prompts:
            log.warning("gold-reward evaluation %s", SKIPPED)
            ctx.log_params({"gold_eval": SKIPPED})
        return {}
    metrics, rows = gold_eval(
        model, tokenizer, records, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size
    )
    metrics = {f"{k}{suffix}": v for k, v in metrics.items()}
    ctx.log_metrics(metrics)
    ctx.log_table(rows, f"samples/gold_eval{suffix or '_after'}.json")
    return metrics
