"""The evaluate stage's measurements, one function each: held-out perplexity, the gold reward on the testbed's
tasks and the public benchmarks (both through lm-evaluation-harness), sampled answers compared with a reference
(reward-model score, win rates, KL) and needle retrieval. Each returns a Measured under the report's metric
names, whatever the model family."""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llmfab.data.schemas import last_text
from llmfab.evaluation import harness
from llmfab.evaluation.long_context import needle_eval, prose_filler
from llmfab.evaluation.report import compare_sampled, heldout_loss


@dataclass
class Measured:
    """One measurement: its metrics, what they were measured on and over how many items (one count, or
    one per metric name), and its table of samples (None when it keeps none): a Report row per metric."""

    metrics: dict[str, float]
    on: str
    n: int | dict[str, int]
    samples: dict[str, list] | None = None
    harness: dict = field(default_factory=dict)  # lm-eval's own result dict, when the harness measured it


def heldout_perplexity(
    model, tokenizer, data: str, *, max_len: int, conversations: int, batch_size: int, options=None
) -> Measured:
    """heldout_loss = −(1/T) Σ_t log π(y_t | y_<t) over the T assistant tokens of chat dataset `data`'s first
    `conversations` test conversations (packed rows of `max_len`); heldout_ppl = exp(heldout_loss).
    Counted in scored tokens. `options` (DataOptions) name its test split."""
    metrics, convs, tokens = heldout_loss(model, tokenizer, data, max_len, conversations, batch_size, options)
    return Measured(metrics, f"data test split: assistant tokens of {convs} conversations", tokens)


def greedy_gold_reward(
    model, tokenizer, records: list[dict], on: str, *, max_new_tokens: int, batch_size: int, seed: int
) -> Measured:
    """gold_reward = (1/N) Σ_i gold(task_i, y_i) for y_i the greedy answer (through the chat template, ending at
    the turn's end) to prompt i, the task's verifiable reward; gold_reward_stderr = its standard error
    sqrt(Σ_i (g_i − ḡ)² / (N(N−1))); gold_reward_<task> (and its _stderr) the same per task; response_tokens =
    mean |y_i|. Run as lm-eval task `llmfab_testbed` (the names drop its `lm_eval.llmfab_testbed.` prefix: the
    testbed's metrics keep their names). Counted in prompts."""
    from llmfab.data.chat import stop_token_ids

    settings = harness.HarnessConfig(tasks=[harness.TESTBED_TASK], batch_size=batch_size, apply_chat_template=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec = harness.testbed_task(harness.write_testbed_file(records, Path(tmp) / "test.jsonl"), max_new_tokens)
        manager = harness.task_manager([], None)
        harness.check_loadable(manager, [spec])
        with harness.stopping_at(model, stop_token_ids(tokenizer)):
            results = harness.evaluate(harness.hf_model(model, tokenizer, batch_size), [spec], manager, settings, seed)
    flat = harness.flatten(results)
    prefix = f"{harness.PREFIX}{harness.TESTBED_TASK}."
    metrics = {name[len(prefix) :]: value for name, value in flat.items()}  # gold_reward, gold_reward_<task>, ...
    samples = sorted(results["samples"][harness.TESTBED_TASK], key=lambda s: s["doc_id"])
    responses = [s["filtered_resps"][0].strip() for s in samples]
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    metrics["response_tokens"] = sum(lengths) / len(lengths)
    rows = {
        "task": [s["doc"]["task"] for s in samples],
        "prompt": [last_text(s["doc"]["prompt"])[-200:] for s in samples],
        "response": responses,
        "gold_reward": [s["gold_reward"] for s in samples],
    }
    per_task = Counter(r["task"] for r in records)
    counts = {f"gold_reward_{t}": c for t, c in per_task.items()} | {"gold_reward": len(records)}
    counts |= {f"{name}_stderr": n for name, n in counts.items()} | {"response_tokens": len(records)}
    return Measured(metrics, f"{on}, greedy", {k: counts[k] for k in metrics}, rows, results)


def benchmarks(model, tokenizer, folder: str, config: harness.HarnessConfig, manager, seed: int) -> Measured:
    """The lm-eval tasks of `config` (found by `manager`, see harness.task_manager) on the model: lm-eval's HF
    backend around `model`, or vLLM on checkpoint `folder`. Every metric and its standard error as
    `lm_eval.<task>.<metric>[.<filter>]` (see harness). Counted in documents per task."""
    if config.backend == "vllm":
        lm = harness.vllm_model(folder, config.batch_size)
    else:
        lm = harness.hf_model(model, tokenizer, config.batch_size)
    results = harness.evaluate(lm, list(config.tasks), manager, config, seed)
    flat = harness.flatten(results)
    about = f"lm-evaluation-harness {', '.join(config.tasks)}" + (f", limit {config.limit}" if config.limit else "")
    shots = "" if config.num_fewshot is None else f", {config.num_fewshot}-shot"
    return Measured(flat, about + shots, harness.counts_by_metric(flat, results), None, results)


def harness_files(results: dict) -> dict[str, str]:
    """The harness's results JSON and per-task samples (JSONL) as {file name: text}."""
    files = {"results.json": harness.results_json(results)}
    for task, samples in (results.get("samples") or {}).items():
        files[f"samples_{task}.jsonl"] = harness.samples_jsonl(samples)
    return files


def sampled_comparison(
    model,
    tokenizer,
    records: list[dict],
    on: str,
    *,
    reference=None,
    reward_model=None,
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
) -> Measured:
    """Over n answers y ~ π (and y_ref ~ π_ref, same seed) per prompt x, at temperature T:
    rm_score = E[r(x, y)], rm_score_reference = E[r(x, y_ref)],
    win_rate_rm = P(r(x, y) > r(x, y_ref)) + ½·P(r(x, y) = r(x, y_ref)), win_rate_gold the same with the
    gold reward (over prompts with a gold-reward task), kl_to_reference = E_{y~π}[log π(y|x) − log π_ref(y|x)].
    The RM metrics need `reward_model`, the rest `reference`. Counted in sampled answers."""
    metrics, rows = compare_sampled(
        model,
        tokenizer,
        records,
        reference=reference,
        reward_model=reward_model,
        n=n,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
    )
    return Measured(metrics, f"{on}, {n} samples per prompt at T={temperature}", len(records) * n, rows)


def needle_retrieval(model, tokenizer, corpus: str, *, length: int, samples: int, seed: int) -> Measured:
    """One number planted at `samples` depths spread over a `length`-token haystack of text dataset `corpus`'s
    test prose: needle_acc = P(greedy answer = planted number), needle_nll = NLL per answer token,
    needle_margin = E[NLL(random number) − NLL(planted number)] (> 0: retrieved, not guessed), and
    needle_length. Counted in depths probed."""
    filler = prose_filler(corpus, "test")
    metrics = needle_eval(model, tokenizer, length, filler, samples, seed=seed)
    return Measured({**metrics, "needle_length": length}, "corpus test prose, depths spread evenly", samples)
