"""Synthetic data: model-written pre-training text (Qwen2) and long-context Q&A with facts
planted at random depths (AFM)."""

from __future__ import annotations

import random

from pydantic import Field

from llmfab.data.io import iter_records, write_dataset
from llmfab.data.options import DataOptions
from llmfab.data.tasks import WORDS
from llmfab.data.testbed import split
from llmfab.errors import DataError
from llmfab.generation import generate
from llmfab.models import load_model, load_tokenizer
from llmfab.stages.base import StageConfig, StageContext, stage


class SynthesizeTextConfig(DataOptions, StageConfig):
    n_docs: int = Field(200, gt=0)
    prompt_chars: int = Field(80, gt=0, description="a corpus document's opening used as the prompt")
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    min_tokens: int = Field(16, ge=1, description="drop completions shorter than this")
    min_distinct_ratio: float = Field(0.3, ge=0, le=1, description="drop degenerate, repetitive completions")
    eval_fraction: float = Field(0.1, ge=0, lt=1)


def keep_generation(tokenizer, text: str, config: SynthesizeTextConfig) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) >= config.min_tokens and len(set(ids)) / len(ids) >= config.min_distinct_ratio


@stage(
    "synthesize_text",
    SynthesizeTextConfig,
    inputs={"model": "generator model checkpoint (with tokenizer)", "corpus": "text dataset whose openings prompt"},
    outputs={"text": "synthetic text dataset (source: synthetic)"},
)
def synthesize_text(config: SynthesizeTextConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Model-written pre-training text, filtered for length, repetition and duplicates."""
    model, tokenizer = load_model(inputs["model"]), load_tokenizer(inputs["model"])
    openings = [r["text"][: config.prompt_chars] for r in iter_records(inputs["corpus"], "text", "train", config)]
    rng = random.Random(config.seed)
    prompts = [rng.choice(openings) for _ in range(config.n_docs)]
    completions = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
    )
    docs, seen = [], set()
    for prompt, completion in zip(prompts, completions, strict=True):
        text = prompt + completion
        if completion not in seen and keep_generation(tokenizer, completion, config):
            seen.add(completion)
            docs.append({"text": text, "source": "synthetic"})
    if not docs:
        raise DataError(
            f"all {len(prompts)} generations were filtered out (min_tokens={config.min_tokens}, "
            f"min_distinct_ratio={config.min_distinct_ratio})"
        )
    ctx.log_metrics({"generated": len(prompts), "kept": len(docs), "kept_fraction": len(docs) / len(prompts)})
    if ctx.run is not None:
        ctx.run.log_table({"prompt": prompts[:20], "completion": completions[:20]}, "samples.json")
    return {
        "text": write_dataset(
            ctx.output("text"), split(docs, config.eval_fraction), "text", meta={"generator": inputs["model"]}
        )
    }


class LongQAConfig(DataOptions, StageConfig):
    n_docs: int = Field(200, gt=0)
    doc_chars: int = Field(2000, gt=0, description="length of each haystack document in characters")
    facts_per_doc: int = Field(3, gt=0)
    eval_fraction: float = Field(0.1, ge=0, lt=1)


def plant_facts(filler: list[str], n_chars: int, n_facts: int, rng: random.Random) -> tuple[str, list[dict]]:
    """A document of corpus paragraphs with `n_facts` facts inserted at random depths."""
    text = ""
    while len(text) < n_chars:
        text += rng.choice(filler) + "\n\n"
    text = text[:n_chars]
    facts = []
    for _ in range(n_facts):
        subject, code = f"{rng.choice(WORDS)} {rng.choice(WORDS)}", rng.randint(100, 999)
        depth = rng.random()
        facts.append(
            {"subject": subject, "answer": code, "depth": depth, "at": text.rfind(" ", 0, int(depth * len(text))) + 1}
        )
    # Insert from the back so earlier offsets stay valid and no fact lands inside another.
    for fact in sorted(facts, key=lambda f: f["at"], reverse=True):
        at = fact.pop("at")
        text = text[:at] + f"The secret number of the {fact['subject']} is {fact['answer']}. " + text[at:]
    return text, facts


@stage(
    "synthesize_long_qa",
    LongQAConfig,
    inputs={"corpus": "text dataset supplying the haystack prose"},
    outputs={"sft": "chat records: long document + question -> answer", "text": "the same as long text documents"},
)
def synthesize_long_qa(config: LongQAConfig, inputs: dict[str, str], ctx: StageContext) -> dict[str, str]:
    """Long-context Q&A: facts planted at random depths of long documents, with questions."""
    filler = [r["text"] for r in iter_records(inputs["corpus"], "text", "train", config) if r["source"] == "prose"]
    if not filler:
        raise DataError(f"{inputs['corpus']}: no records with source 'prose' to build documents from")
    rng = random.Random(config.seed)
    chats, texts = [], []
    for _ in range(config.n_docs):
        doc, facts = plant_facts(filler, config.doc_chars, config.facts_per_doc, rng)
        fact = rng.choice(facts)
        question = f"{doc}\n\nWhat is the secret number of the {fact['subject']}?"
        meta = {"answer": fact["answer"], "depth": fact["depth"]}
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": str(fact["answer"])},
                ],
                "task": "long_qa",
                "meta": meta,
            }
        )
        texts.append({"text": f"{question}\n{fact['answer']}", "source": "long_qa"})
    ctx.log_metrics({"docs": len(chats), "mean_chars": sum(len(t["text"]) for t in texts) / len(texts)})
    return {
        "sft": write_dataset(ctx.output("sft"), split(chats, config.eval_fraction), "chat"),
        "text": write_dataset(ctx.output("text"), split(texts, config.eval_fraction), "text"),
    }
