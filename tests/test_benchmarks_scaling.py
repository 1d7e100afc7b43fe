"""Smoke tests of the scaling and GPU benchmarks (issue #9): their structure, fields and formulas, never their
timings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import gpu, scaling
from llmfab.config.model import ModelConfig
from llmfab.models.architectures import build_model


def _finite(*values) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def test_flops_count_every_matmul_weight_once():
    tied = build_model(ModelConfig(**scaling.shape(64, 256)))
    n = sum(p.numel() for p in tied.parameters())
    assert scaling.matmul_params(tied) == n  # the tied table is the LM head's matmul
    cfg = tied.config
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) * 256
    assert scaling.train_flops_per_token(tied, 256) == 6 * n + attn

    untied = build_model(ModelConfig(**scaling.shape(64, 256), tie_word_embeddings=False))
    embed = untied.get_input_embeddings().weight.numel()
    assert scaling.matmul_params(untied) == sum(p.numel() for p in untied.parameters()) - embed


def test_packed_rows_restart_positions_at_documents():
    rows = scaling.packed_rows(3, 64, vocab=100, doc_len=(8, 40))
    assert rows["input_ids"].shape == rows["position_ids"].shape == rows["labels"].shape == (3, 64)
    starts = rows["position_ids"] == 0
    assert int(starts.sum()) > 3  # several documents per row
    assert (rows["labels"][starts] == -100).all()  # a document's first token has nothing to predict it


def test_scaling_quick_run_structure():
    out = scaling.run(quick=True)
    assert len(out["tables"]) == 2 and all(t.count("|") > 10 for t in out["tables"])
    res = out["results"]
    plan = scaling.QUICK
    assert [r["seq_len"] for r in res["by_seq_len"]] == plan["seq_lens"]
    assert [r["hidden"] for r in res["by_width"]] == plan["widths"]
    assert res["attn_implementation"] in ("sdpa", "eager", "flex_attention")
    for r in res["by_seq_len"] + res["by_width"]:
        assert r["batch"] * r["seq_len"] == r["tokens_per_step"]
        assert len(r["step_seconds"]) == plan["steps"]
        assert _finite(r["tokens_per_sec"], r["ms_per_step"], r["gflops_per_sec"], r["peak_rss_mb"])
        assert r["tokens_per_sec"] > 0 and r["peak_rss_mb"] > 0 and r["parameters"] > 0
    params = [r["parameters"] for r in res["by_width"]]
    assert params == sorted(params) and len(set(params)) == len(params)


def test_gpu_script_runs_on_cpu_tiny(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    result = gpu.main(["--device", "cpu", "--shape", "tiny", "--steps", "1", "--peak-tflops", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| phase |" in printed and "MFU" in printed
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["peak_bf16_flops"] == 1e12
    assert [r["phase"] for r in saved["rows"]] == ["pretrain", "pretrain, 1 doc/row", "dpo"]
    for r in saved["rows"]:
        assert r["trained_on"] == "cpu" and len(r["step_seconds"]) == 2  # 1 warm-up + 1 timed
        assert _finite(r["tokens_per_sec"], r["step_ms"], r["tflops_per_sec"], r["mfu"], r["peak_memory_gb"])
        assert r["tokens_per_step"] == r["batch"] * r["seq_len"] * (2 if r["phase"] == "dpo" else 1)
    assert _finite(saved["rows"][2]["ref_logps_tokens_per_sec"])
    assert saved["rows"] == result["rows"]


def test_gpu_script_without_peak_reports_no_mfu(tmp_path):
    result = gpu.main(["--device", "cpu", "--shape", "tiny", "--steps", "1", "--no-dpo"])
    assert [r["mfu"] for r in result["rows"]] == [None, None]
    assert "n/a" in result["table"]


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", None),
    ],
)
def test_peak_flops_by_device_name(name, peak):
    assert gpu.peak_flops(name, None) == peak
    assert gpu.peak_flops(name, 500.0) == 500e12


def test_out_of_memory_halves_the_batch():
    args = gpu.argparse.Namespace(warmup=1, grad_ckpt=False)
    tried = []

    def phase(model, batch):
        tried.append(batch)
        if batch > 1:
            raise torch.OutOfMemoryError("simulated")
        return [1.0, 0.5, 0.5], batch * 32, {}

    row = gpu.run_phase(
        "pretrain",
        lambda: build_model(ModelConfig(**scaling.shape(64, 32))),
        phase,
        4,
        32,
        args,
        gpu.Device("cpu"),
        None,
    )
    assert tried == [4, 2, 1]
    assert row["batch"] == 1 and row["step_ms"] == 500.0 and row["tokens_per_sec"] == 64.0
