"""Smoke test of the throughput benchmark (ours vs TRL): the structure of `run(quick=True)` and that both
sides did the same work in their timed windows. Never asserts on timings."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.throughput import BATCH, QUICK, SEQ_LEN, run


@pytest.mark.slow  # three child processes, TRL's imports included: ~40-60 s on 2 cores
def test_quick_run_structure_and_equal_work():
    out = run(quick=True)
    main, detail = out["tables"]
    assert "| ours |" in detail and "| trl |" in detail
    for label in ("SFT, packed (TRL SFTTrainer)", "DPO (TRL DPOTrainer", "Reward model (TRL RewardTrainer)"):
        assert label in main
    assert "ours/TRL" in main and "peak RSS" in main
    json.dumps(out["results"])  # the results are JSON-able

    rows = out["results"]["rows"]
    assert set(rows) == {"sft", "dpo", "reward_model"}  # quick mode skips TRL's precompute variant
    window_steps = QUICK["steps"]["sft"] - QUICK["warmup"]
    for key, row in rows.items():
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert math.isfinite(row["best_ratio"]) and row["best_ratio"] > 0
        assert row["ours"] > 0 and row["trl"] > 0
        for side in ("ours", "trl"):
            assert row[f"{side}_peak_rss_mb"] >= row[f"{side}_train_peak_rss_mb"] > 0
        windows = row["ours_windows"] + row["trl_windows"]
        assert len(windows) == 2 * QUICK["repeats"]
        for w in windows:
            assert 0 < w["tokens"] <= w["positions"]
        if key == "sft":
            # Both sides fill `BATCH` packed rows of at most SEQ_LEN tokens a step, a few conversations each.
            for w in windows:
                assert w["tokens"] <= window_steps * BATCH * SEQ_LEN
                assert w["conversations"] >= window_steps * BATCH
        else:
            assert all(w["pairs"] == window_steps * BATCH for w in windows)
    # SFT's denominator: the bare-loop limit, measured in the same run on full rows of the same model.
    assert rows["sft"]["limit"] > 0 and rows["sft"]["of_limit"] == pytest.approx(
        rows["sft"]["ours"] / rows["sft"]["limit"]
    )
    assert "SFT against the bare-loop limit" in main
    limit = [r for r in out["results"]["runs"] if r["task"] == "sft_limit"]
    assert len(limit) == QUICK["repeats"] and all(
        r["tokens"] == r["positions"] == window_steps * BATCH * SEQ_LEN for r in limit
    )
    # DPO is charged its reference log-probs over exactly the pairs a run consumes.
    dpo_ours = [r for r in out["results"]["runs"] if r["task"] == "dpo" and r["side"] == "ours"]
    assert dpo_ours and all(r["ref_pairs"] == QUICK["steps"]["dpo"] * BATCH for r in dpo_ours)
