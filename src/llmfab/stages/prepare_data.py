"""prepare_data: the tiny testbed's corpora and task datasets, deterministic by seed."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from llmfab.data import testbed
from llmfab.data.corpus import code_documents, prose_documents
from llmfab.data.io import write_dataset
from llmfab.stages.base import StageConfig, StageContext, stage

TaskName = Literal["arithmetic", "format", "kv_retrieval"]


class PrepareDataConfig(StageConfig):
    tasks: list[TaskName] = Field(default_factory=lambda: ["arithmetic", "format", "kv_retrieval"], min_length=1)
    prose_docs: int = Field(2000, ge=0)
    code_docs: int = Field(1000, ge=0)
    task_docs: int = Field(2000, ge=0, description="task examples rendered as plain text for pre-training")
    max_doc_chars: int = Field(2000, ge=100)
    sft_examples: int = Field(2000, ge=0)
    prompts: int = Field(500, ge=0)
    preference_pairs: int = Field(2000, ge=0)
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)


@stage(
    "prepare_data",
    PrepareDataConfig,
    outputs={
        "text": "pre-training text (prose, code, task demos), train/test",
        "sft": "chat records answering the tasks, train/test",
        "prompts": "task prompts with gold-reward metadata, train/test",
        "preferences": "preference pairs with gold labels and AFM levels, train/test",
    },
)
def run(config: PrepareDataConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Generate the tiny testbed: stdlib prose/code corpora and verifiable-task datasets."""
    rng = random.Random(config.seed)
    # Each dataset draws from its own stream so changing one count does not reshuffle the others.
    streams = {name: random.Random(rng.getrandbits(64)) for name in ("text", "sft", "prompts", "preferences")}

    text = [
        {"text": d, "source": "prose"} for d in prose_documents(config.prose_docs, config.seed, config.max_doc_chars)
    ]
    text += [{"text": d, "source": "code"} for d in code_documents(config.code_docs, config.seed, config.max_doc_chars)]
    text += [testbed.task_text(ex) for ex in testbed.sample_examples(config.tasks, config.task_docs, streams["text"])]
    streams["text"].shuffle(text)

    sft = [testbed.chat_record(ex) for ex in testbed.sample_examples(config.tasks, config.sft_examples, streams["sft"])]
    prompts = [
        testbed.prompt_record(ex) for ex in testbed.sample_examples(config.tasks, config.prompts, streams["prompts"])
    ]
    pref_rng = streams["preferences"]
    prefs = [
        testbed.preference_record(ex, pref_rng)
        for ex in testbed.sample_examples(config.tasks, config.preference_pairs, pref_rng)
    ]

    outputs, counts = {}, {}
    for name, kind, records in (
        ("text", "text", text),
        ("sft", "chat", sft),
        ("prompts", "prompt", prompts),
        ("preferences", "preference", prefs),
    ):
        splits = testbed.split(records, config.eval_fraction)
        outputs[name] = write_dataset(ctx.output(name), splits, kind, meta={"seed": config.seed, "tasks": config.tasks})
        counts.update({f"{name}_{s}_records": len(r) for s, r in splits.items()})
    counts["text_chars"] = sum(len(r["text"]) for r in text)
    ctx.log_metrics(counts)
    return outputs
