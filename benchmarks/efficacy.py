"""What each stage of each family's pipeline achieves on the tiny testbed, over several seeds (issue #9,
section 4).

Each family's recipe runs in process (the same stages and order as its Kubeflow pipeline) at the tiny
preset with two kinds of overrides:
- LEARNABLE: the testbed's tasks a 128-wide model can learn to answer for unseen prompts (single-digit
  arithmetic, "repeat the word n times"; the tiny preset's full task mix leaves every family at gold 0)
  and enough held-out prompts (200) for the gold reward to move in steps of 0.005;
- SHORTER: fewer optimizer steps and samples, so that 4 families x 3 seeds fit the benchmark's budget.
Only the seed changes between a family's runs (every stage's `seed`: initialisation, data order,
sampling); the dataset is the same testbed for all runs, and each family's tokenizer is trained once.
The metrics are those the stages log themselves: held-out loss, gold reward (greedy, held-out prompts),
reward-model accuracy (held-out pairs), needle retrieval; the final `evaluate` adds win rates and KL.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from benchmarks.common import run_isolated, table

FAMILIES = ("qwen2", "afm", "gemma2", "llama31")
SEEDS = (0, 1, 2)
UNSEEDED = {"data", "tokenizer"}  # the testbed and the tokenizer are shared by every seed

LEARNABLE = (
    "data.tasks=[arithmetic,format]",
    "data.format_kinds=[repeat]",
    "data.max_operand=9",
    "data.prompts=2000",
    "data.preference_pairs=3000",
)

# A stage's optimizer steps and sample counts, scaled: SHORTER for the efficacy runs (the tiny preset takes
# 5-9 minutes a run), QUICK for the smoke test (a few steps each: the plumbing, not efficacy).
SHORTER = 0.4
QUICK = 0.02
COUNTS = ("n_docs", "episodes", "prompts_per_episode", "max_prompts", "max_examples")
QUANTA = ("inner_steps", "average_last", "steps_per_rollout")  # max_steps must stay a multiple of these


def shrink(family: str, factor: float, floor: int = 4) -> list[str]:
    """Overrides that scale every step's `train.max_steps` (at least `floor`, or the preset's value if lower;
    warm-up and checkpoint intervals follow) and its sample counts by `factor`."""
    import yaml

    from llmfab.config.recipe import recipe_path

    config = yaml.safe_load(recipe_path(family).read_text())["presets"]["tiny"]["config"]
    out = []
    for step, cfg in config.items():
        if not isinstance(cfg, dict):
            continue
        train = cfg.get("train") or (cfg.get("sft") or {}).get("train")  # rejection sampling nests its SFT
        if train and "max_steps" in train:
            where = f"{step}.train" if "train" in cfg else f"{step}.sft.train"
            quantum = next((cfg[q] for q in QUANTA if q in cfg), 1)
            steps = max(min(train["max_steps"], floor), round(train["max_steps"] * factor))
            steps = max(quantum, steps // quantum * quantum)
            out.append(f"{where}.max_steps={steps}")
            out.append(
                f"{where}.optim.warmup_steps={min((train.get('optim') or {}).get('warmup_steps', 0), steps // 4)}"
            )
            if train.get("checkpoint_every"):
                out.append(f"{where}.checkpoint_every={max(quantum, steps // 2 // quantum * quantum)}")
        out += [f"{step}.{k}={max(2, round(cfg[k] * factor))}" for k in COUNTS if k in cfg]
    return out


# A model trained a few steps cannot pass Llama's needle gate on context length, nor give answers the verifier
# tells apart: the smoke test does not gate, and ranks by the reward model.
QUICK_EXTRA = {"llama31": ("context.gate=false", "preferences.annotator=reward_model")}


def _overrides(family: str, seed: int, step_ids: list[str], quick: bool) -> list[str]:
    overrides = [
        *LEARNABLE,
        *shrink(family, QUICK if quick else SHORTER),
        *(QUICK_EXTRA.get(family, ()) if quick else ()),
    ]
    return overrides + [f"{s}.seed={seed}" for s in step_ids if s not in UNSEEDED]


def _recipe(family: str, seed: int, quick: bool):
    from llmfab.config.recipe import load_recipe

    step_ids = [s.id for s in load_recipe(family, "tiny").steps]
    return load_recipe(family, "tiny", _overrides(family, seed, step_ids, quick))


def prepare(root: str, quick: bool) -> dict:
    """The testbed every run trains and is measured on (one dataset: the families' tiny presets agree)."""
    from llmfab.stages.runner import run_stage
    from llmfab.storage import open_store

    configs = {f: _recipe(f, 0, quick).step("data").config for f in FAMILIES}
    if len({c.model_dump_json() for c in configs.values()}) != 1:
        raise RuntimeError("the families' data steps differ; the efficacy benchmark assumes one testbed")
    res = run_stage("prepare_data", configs["qwen2"], {}, store=open_store(root).sub("data"), track=False)
    return {"data": res.outputs, "seconds": res.seconds}


def run_family(family: str, seeds: list[int], data: dict, root: str, quick: bool) -> dict:
    """The family's recipe once per seed, in this process, tracked in `root`'s MLflow file."""
    from llmfab.recipe_runner import run_recipe

    reuse, runs = {"data": data}, []
    for seed in seeds:
        recipe = _recipe(family, seed, quick)
        res = run_recipe(
            recipe,
            store_uri=str(Path(root) / "store"),
            tracking_uri=f"sqlite:///{Path(root) / 'mlflow.db'}",
            experiment="llmfab-efficacy",
            run_name=f"{family}-seed{seed}",
            show_progress=False,
            reuse=reuse,
        )
        if "tokenizer" in res.steps:  # trained by the first seed's run, reused by the others
            reuse["tokenizer"] = res.steps["tokenizer"].outputs
        steps = {
            name: {"stage": recipe.step(name.split("/")[0]).stage, "seconds": r.seconds, "metrics": r.metrics}
            for name, r in res.steps.items()
        }
        runs.append({"seed": seed, "steps": steps})
    return {"family": family, "runs": runs}


# Columns of the per-stage table: the first metric a stage logs among the candidates.
COLUMNS = {
    "held-out loss": ("heldout_loss", "after_loss_new", "eval_loss"),
    "gold reward": ("gold_reward",),
    "RM accuracy": ("eval_accuracy",),
    "needle acc": ("needle_acc", "after_needle_acc_new"),
}
SUMMARY = ("heldout_ppl", "gold_reward", "win_rate_rm", "win_rate_gold", "kl_to_reference", "needle_acc")


def _spread(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def _pick(metrics: dict, candidates: tuple[str, ...]) -> float | None:
    return next((metrics[k] for k in candidates if k in metrics), None)


def family_table(res: dict) -> str:
    runs = res["runs"]
    rows = []
    first_gold = True
    for name, step in runs[0]["steps"].items():
        cells = [
            _spread([v for r in runs if (v := _pick(r["steps"][name]["metrics"], names)) is not None])
            for names in COLUMNS.values()
        ]
        if all(c == "–" for c in cells):
            continue
        if first_gold and "gold_reward_before" in step["metrics"]:  # the untuned model, once
            before = [r["steps"][name]["metrics"]["gold_reward_before"] for r in runs]
            rows.append(["(before " + name + ")", "", "–", _spread(before), "–", "–", ""])
            first_gold = False
        secs = statistics.fmean(r["steps"][name]["seconds"] for r in runs)
        rows.append([name, step["stage"], *cells, f"{secs:.0f}"])
    n = len(runs)
    return table(
        ["step", "stage", *COLUMNS, "s/run"], rows, f"{res['family']}: after each stage, mean ± sd over {n} seeds"
    )


def summary_table(results: list[dict]) -> str:
    rows = []
    for res in results:
        runs = res["runs"]
        final = [r["steps"]["evaluate"]["metrics"] for r in runs]
        sft = [r["steps"]["sft"]["metrics"].get("gold_reward") for r in runs if "sft" in r["steps"]]
        minutes = statistics.fmean(sum(s["seconds"] for s in r["steps"].values()) for r in runs) / 60
        rows.append(
            [res["family"], _spread([g for g in sft if g is not None])]
            + [_spread([m[k] for m in final if k in m]) for k in SUMMARY]
            + [f"{minutes:.1f}"]
        )
    return table(
        ["family", "SFT gold", *(f"final {k}" for k in SUMMARY), "min/run"],
        rows,
        "Final model (evaluate stage, against the SFT model) per family, mean ± sd over seeds",
    )


def run(quick: bool = False, families: tuple[str, ...] = FAMILIES, seeds: tuple[int, ...] | None = None) -> dict:
    seeds = seeds or SEEDS
    with tempfile.TemporaryDirectory(prefix="llmfab-bench-efficacy-") as root:
        shared = run_isolated("benchmarks.efficacy:prepare", {"root": root, "quick": quick}, threads=2)
        results = [
            run_isolated(
                "benchmarks.efficacy:run_family",
                {"family": f, "seeds": list(seeds), "data": shared["data"], "root": root, "quick": quick},
                threads=2,
            )
            for f in families
        ]
    tables = [summary_table(results)] + [family_table(r) for r in results]
    overrides = {"learnable": LEARNABLE, "shorter": SHORTER}
    return {"tables": tables, "results": {"families": results, "overrides": overrides}}
