"""prepare_data: the tiny testbed's corpora and task datasets, deterministic by seed."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from llmfab.data import testbed
from llmfab.data.corpus import code_documents, prose_documents
from llmfab.data.io import write_dataset
from llmfab.data.tasks import gold_reward
from llmfab.stages.base import StageConfig, StageContext, stage

TaskName = Literal["arithmetic", "format", "wordlist", "kv_retrieval"]


class PrepareDataConfig(StageConfig):
    tasks: list[TaskName] = Field(default_factory=lambda: ["arithmetic", "format", "kv_retrieval"], min_length=1)
    prose_docs: int = Field(2000, ge=0)
    code_docs: int = Field(1000, ge=0)
    task_docs: int = Field(2000, ge=0, description="task examples rendered as plain text for pre-training")
    max_doc_chars: int = Field(2000, ge=100)
    fact_docs: int = Field(
        0,
        ge=0,
        description="pre-training documents of arithmetic facts as equations ('3 + 4 = 7') over every operand "
        "pair: knowledge the base model holds and post-training must elicit; no held-out question appears",
    )
    sft_examples: int = Field(2000, ge=0)
    demo_error_rate: float = Field(
        0.2,
        ge=0.0,
        le=0.5,
        description="mean share of SFT demonstrations whose answer is wrong (as human data is); errors grow with "
        "an item's difficulty, none on the easiest",
    )
    prompts: int = Field(500, ge=0, description="training prompts (RL, rejection sampling, preference rounds)")
    heldout_prompts: int = Field(
        256,
        ge=0,
        description="distinct held-out items (the prompts' test split, where gold reward is measured); no stage "
        "sees them in any phrasing",
    )
    preference_pairs: int = Field(2000, ge=0)
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held-out share of the SFT, preference and text data")
    max_operand: int = Field(50, ge=1, description="arithmetic operands are drawn from 0..max_operand")
    max_repeat: int = Field(5, ge=2, description="the format task's repeat counts are drawn from 2..max_repeat")
    list_kinds: list[Literal["last", "reverse"]] = Field(default_factory=lambda: ["last", "reverse"], min_length=1)
    max_items: int = Field(5, ge=2, le=10, description="wordlist lists have 2..max_items words")
    kv_pairs: int = Field(8, ge=1, description="records per key-value retrieval document")
    format_kinds: list[Literal["repeat", "upper", "reverse"]] = Field(
        default_factory=lambda: ["repeat", "upper", "reverse"],
        min_length=1,
        description="format tasks; upper/reverse of a held-out word are out of reach for tiny models",
    )


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
    knobs = {
        "max_operand": config.max_operand,
        "kv_pairs": config.kv_pairs,
        "format_kinds": config.format_kinds,
        "max_repeat": config.max_repeat,
        "list_kinds": config.list_kinds,
        "max_items": config.max_items,
    }
    # Each dataset draws from its own stream so changing one count does not reshuffle the others.
    names = ("text", "sft", "prompts", "preferences", "facts", "heldout", "demo_errors")
    streams = {name: random.Random(rng.getrandbits(64)) for name in names}

    # The gold reward's held-out items first: every other dataset draws around them.
    heldout = testbed.distinct_examples(config.tasks, config.heldout_prompts, streams["heldout"], **knobs)
    unseen = {ex.key for ex in heldout}
    sft_examples = testbed.sample_examples(config.tasks, config.sft_examples, streams["sft"], exclude=unseen, **knobs)
    demos_written = [testbed.demonstration(ex, streams["demo_errors"], config.demo_error_rate) for ex in sft_examples]
    sft = [testbed.chat_record(ex) for ex in demos_written]
    prompt_examples = testbed.sample_examples(config.tasks, config.prompts, streams["prompts"], exclude=unseen, **knobs)
    pref_rng = streams["preferences"]
    pref_examples = testbed.sample_examples(config.tasks, config.preference_pairs, pref_rng, exclude=unseen, **knobs)
    prefs = [testbed.preference_record(ex, pref_rng) for ex in pref_examples]
    splits = {
        name: testbed.split(records, config.eval_fraction) for name, records in (("sft", sft), ("preferences", prefs))
    }
    splits["prompts"] = {
        "train": [testbed.prompt_record(ex) for ex in prompt_examples],
        "test": [testbed.prompt_record(ex) for ex in heldout],
    }
    # An item that any evaluation split asks is never trained on, in any phrasing: not in another
    # dataset's train split, not in pre-training demos.
    held_out = {testbed.key_of(r) for s in splits.values() for r in s["test"]}
    for s in splits.values():
        s["train"] = [r for r in s["train"] if testbed.key_of(r) not in held_out]
    candidates = testbed.sample_examples(config.tasks, config.task_docs * 2, streams["text"], **knobs)
    demos = [ex for ex in candidates if ex.key not in held_out][: config.task_docs]
    prose = prose_documents(config.prose_docs, config.seed, config.max_doc_chars)
    code = code_documents(config.code_docs, config.seed, config.max_doc_chars)
    text = [{"text": d, "source": "prose"} for d in prose] + [{"text": d, "source": "code"} for d in code]
    text += [testbed.task_text(ex) for ex in demos]
    text += testbed.fact_documents(config.fact_docs, config.max_operand, streams["facts"])
    streams["text"].shuffle(text)
    splits["text"] = testbed.split(text, config.eval_fraction)

    outputs, counts = {}, {}
    for name, kind in (("text", "text"), ("sft", "chat"), ("prompts", "prompt"), ("preferences", "preference")):
        meta = {"seed": config.seed, "tasks": config.tasks}
        outputs[name] = write_dataset(ctx.output(name), splits[name], kind, meta=meta)
        counts.update({f"{name}_{s}_records": len(r) for s, r in splits[name].items()})
    counts["text_chars"] = sum(len(r["text"]) for r in text)
    # How good the written demonstrations are: the gold reward an imitator of them would get.
    if sft:
        counts["sft_demo_gold"] = sum(gold_reward(ex.task, ex.meta, ex.answer) for ex in demos_written) / len(
            demos_written
        )
    ctx.log_metrics(counts)
    return outputs
