"""Pretrain and DPO step throughput and MFU at the Qwen2-0.5B shape on one GPU (issue #9), in one command:

    python -m benchmarks.gpu --out gpu.json                    # ~0.5B, bf16, well under 8 minutes on an H100
    python -m benchmarks.gpu --device cpu --shape tiny --steps 2  # smoke test, seconds

The model is the qwen2 recipe's `qwen2-0.5b-replica` (or `tiny`) policy shape from `load_recipe`, built by
`build_model` on the device and trained by the library's `Trainer` with precision bf16 (autocast), as the
stages run it:
- pretrain: weights in the preset's dtype (bfloat16 at 0.5B: bf16 weights, gradients and AdamW moments, no
  fp32 master copy), `lm_loss` on rows packed by `pack_documents` (random-token documents of 32..1024
  tokens, so transformers applies its document-boundary mask), and once more with one document per row
  (no document mask: sdpa's plain causal path) to show what the mask costs;
- dpo: weights in float32, as the dpo stage loads its policy (`load_model`'s default), so autocast runs the
  matmuls in bf16 over fp32 master weights; `dpo_loss_fn` on pair batches laid out as `train/pairs.py` lays
  them out (chosen rows then rejected rows, a shared prompt of half the length, response masks) with
  reference log-probs precomputed by `reference_logps` (reported, not timed in the steps).
`--weights bf16|fp32` puts both phases on one weight dtype instead.

Timing: `--warmup` steps, then `--steps` timed ones; a step runs from the Trainer asking for its first
micro-batch to it asking for the next step's, after torch.cuda.synchronize (benchmarks.scaling.StepClock);
the table gives the median timed step. Peak memory is torch.cuda.max_memory_allocated of the phase (on CPU
the process's peak RSS so far). A batch that runs out of memory is halved and the phase retried.

FLOPs (PaLM, arXiv:2204.02311, appendix B): per trained token 6·N + 12·L·H·Q·T, N the parameters in a
matmul (all but the input embedding table; the tied LM head counts once), L layers, H·Q = heads x head_dim,
T the sequence length; the full T x T attention is counted (not halved for causality nor reduced for
document masks), recomputation under --grad-ckpt is not. At 0.5B: N = 494M, 6N ≈ 2.96 GFLOP and the
attention term ≈ 1.06 GFLOP per token at T = 4096. MFU = FLOPs per step / step seconds / peak dense bf16
FLOP/s of the device (by torch.cuda.get_device_name, or --peak-tflops).

Memory at 0.5B (estimated from CPU runs of the same model cut to 1 and 3 layers at 1024 tokens, bf16
autocast; an OOM halves the batch and retries): pretrain ≈ 4 GB of bf16 weights, gradients and AdamW moments
plus ≈ 10.5 GB per 4096-token row (≈ 53 KB of saved activations per token and layer, ≈ 5.2 GB for the
151,936-way logits, their fp32 copy in the loss and its gradient), so the default batch of 4 rows needs
≈ 46 GB; DPO ≈ 8 GB of fp32 weights, gradients and moments plus ≈ 6-7 GB per 2048-token row (2 pairs = 4 rows
≈ 36 GB). Both leave room on an 80 GB H100; --grad-ckpt trades recomputation for the activations.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import resource
import sys
import time

from benchmarks.common import table
from benchmarks.scaling import DOC_LEN, fit_timed, matmul_params, packed_rows, steady, train_flops_per_token

# Peak dense bf16 tensor-core FLOP/s by device name (first match, most specific first).
PEAK_BF16 = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM (H100 80GB HBM3)
    ("A100", 312e12),
)
# Per shape: the recipe preset whose `policy` model it is, and the default run settings.
SHAPES = {
    "0.5b": {"preset": "qwen2-0.5b-replica", "seq_len": 4096, "batch": 4, "dpo_seq_len": 2048, "dpo_batch": 2,
             "warmup": 5, "steps": 20},
    "tiny": {"preset": "tiny", "seq_len": 128, "batch": 2, "dpo_seq_len": 64, "dpo_batch": 2, "warmup": 1,
             "steps": 2},
}  # fmt: skip
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAK_BF16 if key.lower() in device_name.lower()), None)


def policy_config(shape: str, seq_len: int):
    """The recipe preset's policy ModelConfig, with room for `seq_len` positions."""
    from llmfab.config.recipe import load_recipe

    cfg = load_recipe("qwen2", SHAPES[shape]["preset"]).models["policy"]
    return cfg.model_copy(update={"max_position_embeddings": max(cfg.max_position_embeddings, seq_len)})


class Device:
    """What differs between a CUDA device and the CPU: synchronisation, peak memory, its name."""

    def __init__(self, name: str):
        import torch

        self.torch, self.name = torch, name
        self.cuda = torch.device(name).type == "cuda"
        self.label = torch.cuda.get_device_name(torch.device(name)) if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_memory_gb(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB, the process so far

    def total_memory_gb(self) -> float | None:
        return (
            self.torch.cuda.get_device_properties(self.torch.device(self.name)).total_memory / 1e9
            if self.cuda
            else None
        )


def build(cfg, dtype: str, device: Device, grad_ckpt: bool):
    from llmfab.models.architectures import build_model

    model = build_model(cfg.model_copy(update={"dtype": dtype}), seed=0, device=device.name)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def pretrain_phase(model, seq_len: int, batch: int, steps: int, warmup: int, device: Device, documents: bool):
    """Timed pretrain steps (lm_loss on packed rows): (seconds per step, tokens per step, extra numbers)."""
    import torch

    from llmfab.train.lm import lm_loss, step_batch

    doc_len = DOC_LEN if documents else (seq_len, seq_len)
    rows = packed_rows(batch * (warmup + steps), seq_len, model.config.vocab_size, doc_len=doc_len)
    if not documents:  # one document per row: no restart in position ids, so no document mask
        rows["position_ids"] = torch.arange(seq_len).expand(len(rows["input_ids"]), -1).contiguous()
    step_s, _ = fit_timed(
        model,
        lm_loss,
        lambda step, micro: step_batch(rows, step, micro, batch, 1),
        steps=warmup + steps,
        batch_size=batch,
        precision="bf16",
        sync=device.sync,
    )
    return step_s, batch * seq_len, {}


def pair_rows(pairs: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """`pairs` preference pairs as encode_pairs returns them: a shared prompt of seq_len // 2 random tokens,
    chosen and rejected responses filling the rest, response masks over the responses."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    prompt_len = seq_len // 2
    prompt = torch.randint(1, vocab, (pairs, prompt_len), generator=gen)
    chosen = torch.cat([prompt, torch.randint(1, vocab, (pairs, seq_len - prompt_len), generator=gen)], 1)
    rejected = torch.cat([prompt, torch.randint(1, vocab, (pairs, seq_len - prompt_len), generator=gen)], 1)
    mask = torch.zeros(pairs, seq_len, dtype=torch.long)
    mask[:, prompt_len:] = 1
    return {
        "chosen_ids": chosen,
        "chosen_mask": mask,
        "chosen_full_mask": mask.clone(),
        "rejected_ids": rejected,
        "rejected_mask": mask.clone(),
        "chosen_length": torch.full((pairs,), seq_len),
        "rejected_length": torch.full((pairs,), seq_len),
        "margin": torch.zeros(pairs),
        "label": torch.ones(pairs),
    }


def dpo_phase(model, seq_len: int, batch: int, steps: int, warmup: int, device: Device):
    """Reference log-probs (timed apart), then timed DPO steps with the library's dpo_loss_fn."""
    from llmfab.train.dpo import DPOLossConfig, dpo_loss_fn
    from llmfab.train.pairs import pair_batch, reference_logps

    rows = pair_rows(batch * (warmup + steps), seq_len, model.config.vocab_size)
    device.sync()
    start = time.perf_counter()
    # The dpo stage's call: the reference (here the policy's own initial weights) over every pair, in batches
    # of train.batch_size pairs, as it stands (no autocast).
    rows["ref_chosen"], rows["ref_rejected"] = reference_logps(model, rows, batch)
    device.sync()
    ref_s = time.perf_counter() - start
    step_s, _ = fit_timed(
        model,
        dpo_loss_fn(DPOLossConfig(beta=0.1)),
        lambda step, micro: pair_batch(rows, step, micro, batch, 1),
        steps=warmup + steps,
        batch_size=batch,
        precision="bf16",
        sync=device.sync,
    )
    ref_tokens = 2 * len(rows["chosen_ids"]) * seq_len
    return step_s, 2 * batch * seq_len, {"ref_logps_seconds": ref_s, "ref_logps_tokens_per_sec": ref_tokens / ref_s}


def run_phase(name: str, make_model, phase, batch: int, seq_len: int, args, device: Device, peak: float | None):
    """Build the model, run `phase`, halving the batch on out-of-memory; one result row."""
    import torch

    while True:
        device.reset()
        model = make_model()
        oom = False
        try:
            step_s, tokens, extra = phase(model, batch)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            oom = True
        if oom:  # outside the except block, so the traceback's frames (and their tensors) are gone
            del model
            print(f"[{name}] out of memory at batch {batch}; retrying with {batch // 2}", file=sys.stderr, flush=True)
            batch //= 2
            continue
        break
    sec = steady(step_s, args.warmup)
    flops = train_flops_per_token(model, seq_len) * tokens
    row = {
        "phase": name,
        "weights": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "grad_ckpt": args.grad_ckpt,
        "seq_len": seq_len,
        "batch": batch,
        "tokens_per_step": tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "matmul_parameters": matmul_params(model),
        "flops_per_step": flops,
        "step_seconds": step_s,
        "step_ms": 1000 * sec,
        "tokens_per_sec": tokens / sec,
        "tflops_per_sec": flops / sec / 1e12,
        "mfu": flops / sec / peak if peak else None,
        "peak_memory_gb": device.peak_memory_gb(),
        "trained_on": str(next(model.parameters()).device),
        **extra,
    }
    del model
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--steps", type=int, help="timed steps per phase (0.5b: 20, tiny: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (0.5b: 5, tiny: 1)")
    parser.add_argument("--seq-len", type=int, help="pretrain row length (0.5b: 4096)")
    parser.add_argument("--batch", type=int, help="pretrain rows per step (0.5b: 4)")
    parser.add_argument("--dpo-seq-len", type=int, help="chosen / rejected length, prompt half of it (0.5b: 2048)")
    parser.add_argument("--dpo-batch", type=int, help="pairs per step (0.5b: 2)")
    parser.add_argument("--weights", choices=("stage", "bf16", "fp32"), default="stage",
                        help="stage: pretrain in the preset's dtype, DPO in fp32, as the stages load them")  # fmt: skip
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (off by default)")
    parser.add_argument("--no-dpo", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default: by device name)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    defaults = SHAPES[args.shape]
    for key in ("steps", "warmup", "seq_len", "batch", "dpo_seq_len", "dpo_batch"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    import logging

    import torch
    import transformers

    logging.disable(logging.WARNING)
    device = Device(args.device)
    peak = peak_flops(device.label, args.peak_tflops)
    started = time.perf_counter()
    cfg = policy_config(args.shape, max(args.seq_len, args.dpo_seq_len))
    pre_dtype = cfg.dtype if args.weights == "stage" else DTYPE_NAMES[args.weights]
    dpo_dtype = "float32" if args.weights == "stage" else DTYPE_NAMES[args.weights]

    def pretrain(documents: bool):
        return lambda model, batch: pretrain_phase(
            model, args.seq_len, batch, args.steps, args.warmup, device, documents
        )

    def pretrain_model():
        return build(cfg, pre_dtype, device, args.grad_ckpt)

    rows = [
        run_phase("pretrain", pretrain_model, pretrain(True), args.batch, args.seq_len, args, device, peak),
        run_phase("pretrain, 1 doc/row", pretrain_model, pretrain(False), args.batch, args.seq_len, args, device, peak),
    ]
    if not args.no_dpo:
        rows.append(
            run_phase(
                "dpo",
                lambda: build(cfg, dpo_dtype, device, args.grad_ckpt),
                lambda model, batch: dpo_phase(model, args.dpo_seq_len, batch, args.steps, args.warmup, device),
                args.dpo_batch,
                args.dpo_seq_len,
                args,
                device,
                peak,
            )
        )
    result = {
        "device": device.label,
        "device_memory_gb": device.total_memory_gb(),
        "peak_bf16_flops": peak,
        "shape": args.shape,
        "model": cfg.model_dump(mode="json"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "flops_formula": "per token 6*N_matmul + 12*L*H*Q*T (PaLM appendix B; full TxT attention)",
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    result["table"] = format_table(result)
    print(result["table"], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def format_table(result: dict) -> str:
    def opt(v, fmt):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)

    rows = [
        [r["phase"], r["weights"], r["seq_len"], r["batch"], r["tokens_per_step"], r["tokens_per_sec"], r["step_ms"],
         f"{r['tflops_per_sec']:.3g}", opt(r["mfu"], "{:.1%}"), r["peak_memory_gb"]]
        for r in result["rows"]
    ]  # fmt: skip
    mem = "peak GPU GB" if result["device_memory_gb"] else "peak RSS GB"
    peak = result["peak_bf16_flops"]
    title = (
        f"{result['shape']} ({result['rows'][0]['parameters'] / 1e6:,.0f}M parameters) on {result['device']}, bf16 "
        f"autocast, attention {result['rows'][0]['attn_implementation']}, median of {result['steps']} steps after "
        f"{result['warmup']} warm-up; MFU against {opt(peak and peak / 1e12, '{:.1f}')} TFLOP/s"
    )
    headers = ["phase", "weights", "seq", "batch", "tokens/step", "tokens/s", "step ms", "TFLOP/s", "MFU", mem]
    lines = [table(headers, rows, title)]
    for r in result["rows"]:
        if "ref_logps_seconds" in r:
            lines.append(
                f"\nDPO reference log-probs (precomputed, not in the steps): {r['ref_logps_seconds']:.1f} s, "
                f"{r['ref_logps_tokens_per_sec']:,.0f} tokens/s"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
