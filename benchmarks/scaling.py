"""Scaling on CPU (issue #9, section 3): pretraining tokens/s against sequence length and model width, with
peak memory.

What is measured is the real pretraining step: a qwen2 model from `build_model(ModelConfig)` trained by the
library's `Trainer` with `lm_loss` (the pretrain stage's loss) on batches laid out as the pretrain stage lays
them out: random-token documents of 32..1024 tokens packed by `pack_documents`, so position ids restart at
every document and transformers applies its document-boundary (block-diagonal causal) mask, as in the stage.
fp32, 2 torch threads, no evaluation, no checkpoints. Every configuration runs in its own child process
(`run_isolated`), so the peak RSS of each row is its own (model, AdamW state, activations, ~0.5 GB of
torch + transformers).

- Sequence length sweep: the recipe's tiny policy width (hidden 128, 4 layers, 4 heads, 2 KV heads,
  intermediate 352, vocab 2048) at seq_len 512..4096 with a fixed number of tokens per optimizer step
  (batch = 2048 / seq_len rows, at least one: 4096 tokens at seq_len 4096), so only the attention's share
  of the work grows.
- Width sweep: hidden 64..512 at seq_len 512, head_dim 32 (heads = hidden / 32, KV heads = heads / 2),
  intermediate = 2.75 x hidden.
- Attention path at the longest sequence: the default (sdpa with the document mask) against sdpa without
  document boundaries (one document per row: sdpa's causal fast path) and eager attention with the mask
  (one timed step: it is ~3x slower). The whole run takes ~2 minutes on 2 idle cores; `quick` ~20 s.

Timing: a step runs from the Trainer asking for its first micro-batch to it asking for the next step's
(the last step ends when `fit` returns), so a step covers data, forward, backward, clipping and the AdamW
update. The first `warmup` steps are left out (lazy allocations, optimizer state); tokens/s uses the median
timed step.

FLOPs (PaLM, arXiv:2204.02311, appendix B): per token 6·N + 12·L·H·Q·T, N the parameters that take part
in a matmul (every weight except the input embedding table; a tied LM head counts once, as the output
projection), L layers, H·Q the attention width (heads x head_dim), T the sequence length. The attention
term counts the full T x T score matrix (not halved for causality, not reduced for document masks), the
usual convention for MFU; RMSNorm, RoPE, softmax and the loss are not counted.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

from benchmarks.common import run_isolated, table

TINY = {"arch": "qwen2", "vocab_size": 2048, "num_layers": 4, "rope_theta": 10000.0}
HEAD_DIM = 32
DOC_LEN = (32, 1024)  # random document lengths (tokens) packed into rows, as the pretrain stage packs a corpus

FULL = {
    "seq_lens": [512, 1024, 2048, 4096],
    "widths": [64, 128, 256, 512],
    "base_width": 128,
    "base_seq": 512,
    "tokens_per_step": 2048,
    "steps": 3,
    "warmup": 1,
    "attention": True,
}
QUICK = {
    "seq_lens": [128, 256],
    "widths": [64, 128],
    "base_width": 128,
    "base_seq": 128,
    "tokens_per_step": 512,
    "steps": 2,
    "warmup": 1,
    "attention": False,
}


# -- shared with benchmarks.gpu ---------------------------------------------------------------------------


def shape(hidden: int, seq_len: int, head_dim: int = HEAD_DIM, **over) -> dict:
    """ModelConfig fields of the tiny qwen2 policy at width `hidden` (head_dim fixed, 2 query heads per KV head,
    intermediate ≈ 2.75 x hidden as in the qwen2 presets)."""
    heads = max(2, hidden // head_dim)
    return {
        **TINY,
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": max(1, heads // 2),
        "intermediate_size": round(2.75 * hidden / 16) * 16,
        "max_position_embeddings": seq_len,
        **over,
    }


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding table, plus the LM head
    (which, when tied, is that same table used as the output projection)."""
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return total - embed.numel() + (head.numel() if head is embed else 0)


def train_flops_per_token(model, seq_len: int) -> float:
    """6·N + 12·L·H·Q·T (see the module docstring)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 6.0 * matmul_params(model) + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len


class StepClock:
    """Wraps a Trainer's `batch_for_step`: marks the start of every optimizer step (its first micro-batch),
    after `sync` (e.g. torch.cuda.synchronize) so queued device work of the previous step is counted."""

    def __init__(self, batch_for_step: Callable, sync: Callable[[], None] | None = None):
        self.batch_for_step, self.sync, self.marks = batch_for_step, sync or (lambda: None), []

    def __call__(self, step: int, micro: int):
        if micro == 0:
            self.sync()
            self.marks.append(time.perf_counter())
        return self.batch_for_step(step, micro)

    def stop(self) -> list[float]:
        """Seconds of each step (call once `fit` has returned)."""
        self.sync()
        self.marks.append(time.perf_counter())
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def fit_timed(model, loss_fn, batch_for_step, *, steps: int, batch_size: int, precision: str = "fp32", sync=None):
    """Train `steps` optimizer steps with the library's Trainer (a throwaway store, no tracking, no
    checkpoints); returns (seconds per step, the trainer)."""
    from llmfab.stages.base import StageContext
    from llmfab.storage import open_store
    from llmfab.train.config import OptimConfig, TrainConfig
    from llmfab.train.trainer import Trainer

    config = TrainConfig(
        max_steps=steps, batch_size=batch_size, precision=precision, log_every=steps, optim=OptimConfig(warmup_steps=0)
    )
    with tempfile.TemporaryDirectory(prefix="llmfab-bench-") as tmp:
        ctx = StageContext("bench", open_store(tmp), run=None, show_progress=False)
        trainer = Trainer(model, config, ctx, loss_fn)
        clock = StepClock(batch_for_step, sync)
        trainer.fit(clock)
        return clock.stop(), trainer


def packed_rows(rows: int, seq_len: int, vocab: int, seed: int = 0, doc_len: tuple[int, int] = DOC_LEN) -> dict:
    """`rows` packed rows of random-token documents (input_ids, position_ids, labels), as the pretrain stage
    packs a corpus: position ids restart at every document, its first token carries no label."""
    import torch

    from llmfab.train.packing import pack_documents

    gen = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < rows * seq_len:
        n = int(torch.randint(doc_len[0], doc_len[1] + 1, (1,), generator=gen))
        docs.append(torch.randint(1, vocab, (n,), generator=gen).tolist())
        total += n
    packed = pack_documents(docs, seq_len, pad_id=0)
    if len(packed["input_ids"]) < rows:  # documents cut at row ends can leave a row short of `rows`
        return packed_rows(rows + 1, seq_len, vocab, seed, doc_len)
    return {k: v[:rows] for k, v in packed.items()}


def steady(step_seconds: list[float], warmup: int) -> float:
    """Median seconds of the steps after the warm-up ones."""
    timed = step_seconds[warmup:] or step_seconds[-1:]
    return statistics.median(timed)


# -- one configuration (runs in a child process) ------------------------------------------------------------


def measure(
    hidden: int,
    seq_len: int,
    tokens_per_step: int,
    steps: int,
    warmup: int,
    attn: str | None = None,
    documents: bool = True,
) -> dict:
    """Pretraining steps of the tiny qwen2 at width `hidden` and `seq_len`; `attn` overrides the attention
    implementation (None: what transformers picks), `documents=False` gives every row one document."""
    import logging

    import torch

    from llmfab.config.model import ModelConfig
    from llmfab.models.architectures import build_model
    from llmfab.train.lm import lm_loss, step_batch

    logging.disable(logging.WARNING)
    model = build_model(ModelConfig(**shape(hidden, seq_len)), seed=0)
    default_attn = model.config._attn_implementation
    if attn is not None:
        model.set_attn_implementation(attn)
    batch = max(1, tokens_per_step // seq_len)
    rows = packed_rows(
        batch * steps, seq_len, model.config.vocab_size, doc_len=DOC_LEN if documents else (seq_len,) * 2
    )
    if not documents:
        rows["position_ids"] = torch.arange(seq_len).expand(len(rows["input_ids"]), -1).contiguous()
    step_s, _ = fit_timed(
        model, lm_loss, lambda step, micro: step_batch(rows, step, micro, batch, 1), steps=steps, batch_size=batch
    )
    sec = steady(step_s, warmup)
    tokens = batch * seq_len
    flops = train_flops_per_token(model, seq_len)
    return {
        "hidden": hidden,
        "seq_len": seq_len,
        "batch": batch,
        "tokens_per_step": tokens,
        "layers": model.config.num_hidden_layers,
        "heads": model.config.num_attention_heads,
        "kv_heads": model.config.num_key_value_heads,
        "intermediate": model.config.intermediate_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "matmul_parameters": matmul_params(model),
        "documents_per_row": float((rows["position_ids"] == 0).sum()) / len(rows["input_ids"]),
        "attn_implementation": model.config._attn_implementation,
        "default_attn_implementation": default_attn,
        "step_seconds": step_s,
        "warmup": warmup,
        "ms_per_step": 1000 * sec,
        "tokens_per_sec": tokens / sec,
        "flops_per_token": flops,
        "gflops_per_sec": flops * tokens / sec / 1e9,
        "threads": torch.get_num_threads(),
    }


# -- the sweeps -----------------------------------------------------------------------------------------------


def run(quick: bool = False) -> dict:
    plan = QUICK if quick else FULL
    common = {k: plan[k] for k in ("tokens_per_step", "steps", "warmup")}
    done: dict[tuple, dict] = {}

    def get(hidden: int, seq_len: int, **variant) -> dict:
        key = (hidden, seq_len, *sorted(variant.items()))
        if key not in done:
            done[key] = run_isolated(
                "benchmarks.scaling:measure", {"hidden": hidden, "seq_len": seq_len, **common, **variant}, threads=2
            )
        return done[key]

    by_seq = [get(plan["base_width"], s) for s in plan["seq_lens"]]
    by_width = [get(h, plan["base_seq"]) for h in plan["widths"]]
    longest = max(plan["seq_lens"])
    attention = []
    if plan["attention"]:
        attention = [
            ("sdpa, document mask (default)", get(plan["base_width"], longest)),
            ("sdpa, no document boundaries", get(plan["base_width"], longest, documents=False)),
            # eager is ~3x slower at this length: one timed step keeps the whole run near two minutes
            ("eager, document mask", get(plan["base_width"], longest, attn="eager", steps=plan["warmup"] + 1)),
        ]

    ref = by_seq[0]["tokens_per_sec"]
    seq_table = table(
        ["seq_len", "batch", "docs/row", "tokens/s", "ms/step", "GFLOP/s", "peak RSS MB", "tokens/s vs first"],
        [
            [r["seq_len"], r["batch"], r["documents_per_row"], r["tokens_per_sec"], r["ms_per_step"],
             r["gflops_per_sec"], r["peak_rss_mb"], r["tokens_per_sec"] / ref]
            for r in by_seq
        ],
        f"Pretraining step vs sequence length (hidden {plan['base_width']}, {plan['tokens_per_step']} tokens/step, "
        f"attention {by_seq[0]['attn_implementation']}, {by_seq[0]['threads']} threads, fp32)",
    )  # fmt: skip
    width_table = table(
        ["hidden", "heads/kv", "intermediate", "parameters", "matmul params", "tokens/s", "ms/step", "GFLOP/s",
         "peak RSS MB"],
        [
            [r["hidden"], f"{r['heads']}/{r['kv_heads']}", r["intermediate"], f"{r['parameters']:,}",
             f"{r['matmul_parameters']:,}", r["tokens_per_sec"], r["ms_per_step"], r["gflops_per_sec"],
             r["peak_rss_mb"]]
            for r in by_width
        ],
        f"Pretraining step vs width (seq_len {plan['base_seq']}, {plan['tokens_per_step']} tokens/step, "
        f"4 layers, head_dim {HEAD_DIM}); GFLOP/s = (6·N + 12·L·H·Q·T) x tokens/s",
    )  # fmt: skip
    tables = [seq_table, width_table]
    if attention:
        base = attention[0][1]["tokens_per_sec"]
        tables.append(
            table(
                ["attention", "tokens/s", "ms/step", "peak RSS MB", "tokens/s vs default"],
                [
                    [name, r["tokens_per_sec"], r["ms_per_step"], r["peak_rss_mb"], r["tokens_per_sec"] / base]
                    for name, r in attention
                ],
                f"Attention path at seq_len {longest} (hidden {plan['base_width']}, batch {attention[0][1]['batch']})",
            )
        )
    return {
        "tables": tables,
        "results": {
            "by_seq_len": by_seq,
            "by_width": by_width,
            "attention": {name: r for name, r in attention},
            "attn_implementation": by_seq[0]["default_attn_implementation"],
            "flops_formula": "per token 6*N_matmul + 12*L*H*Q*T (PaLM appendix B; full TxT attention)",
            "plan": plan,
        },
    }


if __name__ == "__main__":
    import sys

    for t in run(quick="--quick" in sys.argv)["tables"]:
        print(t, end="\n\n")
