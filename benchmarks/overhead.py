"""Orchestration overhead of `llmfab run FAMILY --preset tiny` (issue #9, section 2).

The pipeline runs as users run it (kfp.local, a subprocess per task, MLflow in a sqlite file, the
local store), timed from outside. Each stage logs where its own time went (`stage_seconds` and
`time_{train,generate,score}_s`, see llmfab.tracking.timing), so the wall time splits into
- compute: optimizer steps, sampling, and scoring forward passes (reference log-probs, reward-model
  scores, held-out evaluation) inside the stages;
- stage overhead: the rest of each stage (reading and tokenizing data, building and loading models,
  writing checkpoints, MLflow calls);
- task overhead: what is outside every stage (a process per task, imports, kfp.local's bookkeeping, the
  open-run/close-run/step-value tasks).
Overhead share = (wall - compute) / wall: the issue's "share of wall time spent outside training /
generation steps" (scoring is counted as compute; the table shows it separately).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import child_env, table
from llmfab.tracking.timing import KINDS


def _stage_rows(tracking_uri: str, run_name: str) -> list[dict]:
    """Each stage run of the pipeline run `run_name`, in start order, with its time split."""
    from llmfab.tracking import Tracker

    tracker = Tracker(tracking_uri)
    parents = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"attributes.run_name = '{run_name}'", max_results=1
    )
    if not parents:
        raise RuntimeError(f"no MLflow run named {run_name} in {tracking_uri}")
    rows = []
    for run in sorted(tracker.child_runs(parents[0].info.run_id), key=lambda r: r.info.start_time):
        m = run.data.metrics
        if "stage_seconds" not in m:
            continue
        row = {"step": run.info.run_name, "stage": run.data.tags.get("llmfab.stage", ""), "seconds": m["stage_seconds"]}
        row.update({k: m.get(f"time_{k}_s", 0.0) for k in KINDS})
        rows.append(row)
    return rows


def measure(family: str = "qwen2", preset: str = "tiny", runner: str = "kfp-local", overrides=()) -> dict:
    """Run the family's pipeline once and split its wall time."""
    with tempfile.TemporaryDirectory(prefix="llmfab-bench-overhead-") as tmp:
        tracking = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        cmd = [sys.executable, "-m", "llmfab.cli", "run", family, "--preset", preset, "--runner", runner,
               "--store", str(Path(tmp) / "store"), "--tracking-uri", tracking, "--run-name", "bench"]  # fmt: skip
        for o in overrides:
            cmd += ["--set", o]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=child_env())
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        stages = _stage_rows(tracking, "bench")
    return summarize(family, preset, runner, wall, stages)


def summarize(family: str, preset: str, runner: str, wall: float, stages: list[dict]) -> dict:
    in_stages = sum(r["seconds"] for r in stages)
    compute = {k: sum(r[k] for r in stages) for k in KINDS}
    return {
        "family": family,
        "preset": preset,
        "runner": runner,
        "wall_s": wall,
        "stages": stages,
        "in_stages_s": in_stages,
        "compute_s": compute,
        "stage_overhead_s": in_stages - sum(compute.values()),
        "task_overhead_s": wall - in_stages,
        "overhead_share": (wall - sum(compute.values())) / wall,
    }


def tables(res: dict) -> list[str]:
    rows = [
        [r["step"], r["stage"], r["seconds"], r["train"], r["generate"], r["score"],
         r["seconds"] - sum(r[k] for k in KINDS)]
        for r in res["stages"]
    ]  # fmt: skip
    c = res["compute_s"]
    rows.append(["**all stages**", "", res["in_stages_s"], c["train"], c["generate"], c["score"],
                 res["stage_overhead_s"]])  # fmt: skip
    per_stage = table(
        ["step", "stage", "stage s", "train s", "generate s", "score s", "stage overhead s"],
        rows,
        f"Per-stage time of `llmfab run {res['family']} --preset {res['preset']}` ({res['runner']})",
    )
    n = len(res["stages"])
    wall = res["wall_s"]
    split = table(
        ["part", "seconds", "share of wall"],
        [
            ["compute (train + generate + score)", sum(c.values()), sum(c.values()) / wall],
            ["stage overhead (data, models, checkpoints, MLflow in the stage)", res["stage_overhead_s"],
             res["stage_overhead_s"] / wall],
            [f"task overhead (outside the {n} stages: processes, imports, kfp, run bookkeeping)",
             res["task_overhead_s"], res["task_overhead_s"] / wall],
            ["**wall**", wall, 1.0],
            ["**overhead share** (target ≤ 0.15, #24)", wall - sum(c.values()), res["overhead_share"]],
        ],
        "Where the pipeline's wall time goes",
    )  # fmt: skip
    return [per_stage, split]


def run(quick: bool = False) -> dict:
    overrides = QUICK_OVERRIDES if quick else ()
    res = measure("qwen2", "tiny", overrides=overrides)
    return {"tables": tables(res), "results": res}


# A smoke-sized qwen2 run: every step, a few optimizer steps each.
QUICK_OVERRIDES = (
    "data.prose_docs=100", "data.code_docs=50", "data.task_docs=100", "data.sft_examples=100",
    "data.prompts=60", "data.preference_pairs=100", "tokenizer.report=null", "tokenizer.vocab_size=512",
    "models.policy.vocab_size=512", "models.generator.vocab_size=512",
    "generator.train.max_steps=2", "synthetic.n_docs=4", "synthetic.max_new_tokens=8",
    "pretrain.train.max_steps=2", "pretrain.train.checkpoint_every=0",
    "long_context.train.max_steps=2", "long_context.train.checkpoint_every=0",
    "sft.train.max_steps=2", "dpo.train.max_steps=2", "reward.train.max_steps=2",
    "online_dpo.episodes=1", "online_dpo.prompts_per_episode=8", "online_dpo.train.max_steps=1",
    "online_dpo.keep_truncated=true",  # a 2-step model rarely ends an answer: keep cut-off ones to pair
    "evaluate.prompts=4", "evaluate.heldout_conversations=4", "evaluate.sample_prompts=2", "evaluate.needle_samples=1",
)  # fmt: skip
