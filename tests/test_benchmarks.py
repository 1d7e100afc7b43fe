"""The benchmark command's own logic (section plumbing, how tables are computed); timings are never asserted.
Throughput and scaling have their own smoke tests (test_benchmarks_throughput, test_benchmarks_scaling)."""

import json

import pytest

from benchmarks import efficacy, overhead
from llmfab.config.recipe import load_recipe


@pytest.mark.parametrize("family", efficacy.FAMILIES)
@pytest.mark.parametrize("factor", [0.04, efficacy.QUICK])
def test_shortened_recipes_are_valid_and_seeded(family, factor):
    full = load_recipe(family, "tiny")
    short = efficacy._recipe(family, 7, factor)
    assert [s.id for s in short.steps] == [s.id for s in full.steps]  # every stage still runs, in order
    for step in short.steps:
        cfg, ref = step.config, full.step(step.id).config
        assert cfg.seed == (ref.seed if step.id in efficacy.UNSEEDED else 7), step.id
        train, ref_train = getattr(cfg, "train", None), getattr(ref, "train", None)
        if train is not None and hasattr(train, "max_steps"):
            assert 1 <= train.max_steps <= ref_train.max_steps, step.id
            assert train.optim.warmup_steps < train.max_steps or train.max_steps == 1, step.id
    assert short.step("data").config == full.step("data").config  # the presets' own testbed


def test_full_scale_runs_the_presets_own_steps():
    full, same = load_recipe("qwen2", "tiny"), efficacy._recipe("qwen2", 0, efficacy.FULL)
    assert same.step("sft").config.train == full.step("sft").config.train


def test_efficacy_tables_replace_their_section_of_the_results_file(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## throughput\nkept\n\n## efficacy\nold\n\n## scaling\nkept too\n")
    efficacy.write_results(["| a |", "| b |"], (0, 1, 2), efficacy.FULL, path)
    text = path.read_text()
    assert "old" not in text and "kept\n" in text and "## scaling\nkept too" in text
    assert "their own steps, seeds 0, 1, 2" in text and "| a |\n\n| b |" in text


def test_overhead_split_adds_up():
    stages = [
        {"step": "pretrain", "stage": "pretrain", "seconds": 10.0, "train": 7.0, "generate": 0.0, "score": 1.0},
        {"step": "sft", "stage": "sft", "seconds": 6.0, "train": 3.0, "generate": 1.0, "score": 0.5},
    ]
    res = overhead.summarize("qwen2", "tiny", "kfp-local", 20.0, stages)
    assert res["in_stages_s"] == 16.0 and res["task_overhead_s"] == 4.0
    assert res["stage_overhead_s"] == pytest.approx(16.0 - 12.5)
    assert res["overhead_share"] == pytest.approx((20.0 - 12.5) / 20.0)
    per_stage, split = overhead.tables(res)
    assert "| pretrain | pretrain | 10.000 | 7.000 | 0.000 | 1.000 | 2.000 |" in per_stage
    assert "0.375" in split  # the overhead share


def test_efficacy_tables_show_mean_and_spread():
    def run(seed, gold):
        metrics = {"sft": {"gold_reward": gold, "gold_reward_before": 0.0, "eval_loss": 1.0 + seed}}
        metrics["evaluate"] = {"gold_reward": gold + 0.1, "heldout_ppl": 3.0, "win_rate_rm": 0.5}
        return {"seed": seed, "steps": {k: {"stage": k, "seconds": 2.0, "metrics": m} for k, m in metrics.items()}}

    res = {"family": "qwen2", "runs": [run(0, 0.2), run(1, 0.4), run(2, 0.6)]}
    per_stage = efficacy.family_table(res)
    assert "| sft | sft | 2.000 ± 1.000 | 0.400 ± 0.200 | – | – | 2 |" in per_stage
    assert "(before sft)" in per_stage
    summary = efficacy.summary_table([res])
    assert "| qwen2 | 0.400 ± 0.200 | 3.000 ± 0.000 | 0.500 ± 0.200 |" in summary and "| 3/3 |" in summary
    res["runs"].append({"seed": 3, "steps": {}, "failed": "rejection_sampling: no answer kept"})
    assert "| 3/4 |" in efficacy.summary_table([res])  # a run a stage stopped is counted, not averaged
    assert "seed 3 stopped: rejection_sampling: no answer kept" in efficacy.family_table(res)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_benchmark_command_quick(tmp_path, monkeypatch):
    """`python -m benchmarks --quick` for the pipeline sections: every family's recipe over two seeds, the
    qwen2 pipeline under kfp.local; the JSON holds what the tables show."""
    from benchmarks.__main__ import main

    monkeypatch.setattr(efficacy, "SEEDS", (0, 1))
    out = tmp_path / "bench.json"
    assert main(["--quick", "--only", "overhead", "efficacy", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    over = report["sections"]["overhead"]["results"]
    assert {r["step"] for r in over["stages"]} >= {"pretrain", "sft", "dpo", "online_dpo", "evaluate"}
    assert 0 < over["overhead_share"] < 1 and over["task_overhead_s"] > 0
    fams = report["sections"]["efficacy"]["results"]["families"]
    assert [f["family"] for f in fams] == list(efficacy.FAMILIES)
    for fam in fams:
        assert [r["seed"] for r in fam["runs"]] == [0, 1]
        for r in fam["runs"]:  # a few steps may leave a stage nothing to learn from: it stops, and says so
            assert r.get("failed") or "gold_reward" in r["steps"]["evaluate"]["metrics"]
