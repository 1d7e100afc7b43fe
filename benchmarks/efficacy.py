"""What each stage of each family's pipeline achieves on the tiny testbed, over several seeds.

Each family's recipe runs in process (the same stages and order as its Kubeflow pipeline) at the tiny
preset, by default with its own step counts (`--efficacy-scale S` runs a share S of every stage's
optimizer steps and samples, `shrink`). Only the seed changes between a family's runs (every stage's
`seed`: initialisation, data order, sampling); the dataset is the presets' testbed (built once, shared),
the tokenizer is deterministic. Runs go two at a time, each in its own single-threaded process.
The metrics are those the stages log themselves: held-out loss, gold reward (greedy, the 256 held-out
items), reward-model accuracy (held-out pairs), needle retrieval; the final `evaluate` adds win rates and
KL to the SFT model. The tables also go to benchmarks/RESULTS.md (`write_results`).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import run_isolated, table

FAMILIES = ("qwen2", "afm", "gemma2", "llama31")
SEEDS = (0, 1, 2)
UNSEEDED = {"data", "tokenizer"}  # the testbed is shared by every run; the tokenizer is deterministic
COST = {"gemma2": 3, "afm": 2, "llama31": 2, "qwen2": 1}  # relative run time, to balance the workers

# Not measured here: the tokenizer's multilingual report (a BPE trained per vocabulary size).
UNMEASURED = ("tokenizer.report=null",)

# A stage's optimizer steps and sample counts, scaled: FULL for the efficacy runs (the tiny preset's own),
# QUICK for the smoke test (a few steps each: the plumbing, not efficacy).
FULL = 1.0
QUICK = 0.02
COUNTS = ("n_docs", "episodes", "prompts_per_episode", "max_prompts", "max_examples")
# Long-context Q&A documents vary in length: fewer of them may leave none that fits the context stage.
KEEP = {("long_qa", "n_docs")}
QUANTA = ("inner_steps", "average_last", "steps_per_rollout", "episodes")  # max_steps stays a multiple of these


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
        counts = {k: max(2, round(cfg[k] * factor)) for k in COUNTS if k in cfg and (step, k) not in KEEP}
        out += [f"{step}.{k}={v}" for k, v in counts.items()]
        train = cfg.get("train") or (cfg.get("sft") or {}).get("train")  # rejection sampling nests its SFT
        if train and "max_steps" in train:
            where = f"{step}.train" if "train" in cfg else f"{step}.sft.train"
            quantum = next((({**cfg, **counts})[q] for q in QUANTA if q in cfg), 1)
            steps = max(min(train["max_steps"], floor), round(train["max_steps"] * factor))
            steps = max(quantum, steps // quantum * quantum)
            out.append(f"{where}.max_steps={steps}")
            warmup = (train.get("optim") or {}).get("warmup_steps", 0)
            out.append(f"{where}.optim.warmup_steps={min(warmup, steps // 4)}")
            if train.get("checkpoint_every"):
                out.append(f"{where}.checkpoint_every={max(quantum, steps // 2 // quantum * quantum)}")
    return out


# A model trained on a share of the preset's steps cannot pass Llama's needle gate on context length (the stage
# stops the pipeline, as it should), and its answers are often all wrong, so the verifier cannot rank them:
# below the preset's own steps the context stage runs ungated and the reward model ranks the answers.
REDUCED_EXTRA = {"llama31": ("context.gate=false", "preferences.annotator=reward_model")}


def _overrides(family: str, seed: int, step_ids: list[str], scale: float) -> list[str]:
    overrides = [*UNMEASURED, *(shrink(family, scale) if scale != FULL else ())]
    overrides += REDUCED_EXTRA.get(family, ()) if scale < 1 else ()
    return overrides + [f"{s}.seed={seed}" for s in step_ids if s not in UNSEEDED]


def _recipe(family: str, seed: int, scale: float):
    from llmfab.config.recipe import load_recipe

    step_ids = list(dict.fromkeys(s.base_id for s in load_recipe(family, "tiny").steps))  # a round's step once
    return load_recipe(family, "tiny", _overrides(family, seed, step_ids, scale))


def prepare(root: str, scale: float) -> dict:
    """The testbed every run trains and is measured on (one dataset: the families' tiny presets agree)."""
    from llmfab.stages.runner import run_stage
    from llmfab.storage import open_store

    configs = {f: _recipe(f, 0, scale).step("data").config for f in FAMILIES}
    if len({c.model_dump_json() for c in configs.values()}) != 1:
        raise RuntimeError("the families' data steps differ; the efficacy benchmark assumes one testbed")
    res = run_stage("prepare_data", configs["qwen2"], {}, store=open_store(root).sub("data"), track=False)
    return {"data": res.outputs, "seconds": res.seconds}


def run_seed(family: str, seed: int, data: dict, root: str, scale: float) -> dict:
    """The family's recipe with `seed`, in this process, tracked in its own MLflow file under `root`."""
    from llmfab.errors import LlmfabError
    from llmfab.runs import InProcess
    from llmfab.runs.plan import plan_recipe

    recipe = _recipe(family, seed, scale)
    plan = plan_recipe(
        recipe,
        store_uri=str(Path(root) / "store"),
        tracking_uri=f"sqlite:///{Path(root) / family}-{seed}.db",  # a file per run: runs go concurrently
        experiment="llmfab-efficacy",
        run_name=f"{family}-seed{seed}",
    )
    try:
        res = InProcess(reuse={"data": data}, show_progress=False).run(plan)
    except LlmfabError as exc:  # a stage refused to go on (e.g. no finished answer to learn from): a result too
        return {"seed": seed, "steps": {}, "failed": str(exc).splitlines()[0][:300]}
    stages = {name: step.stage for step in recipe.steps for name, _ in step.runs()}
    steps = {name: {"stage": stages[name], "seconds": r.seconds, "metrics": r.metrics} for name, r in res.steps.items()}
    return {"seed": seed, "steps": steps}


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
    failed = [f"seed {r['seed']} stopped: {r['failed']}" for r in res["runs"] if r.get("failed")]
    runs = [r for r in res["runs"] if not r.get("failed")]
    if not runs:
        return f"### {res['family']}: every run stopped\n\n" + "\n".join(failed)
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
    title = f"{res['family']}: after each stage, mean ± sd over {len(runs)} seeds"
    return table(["step", "stage", *COLUMNS, "s/run"], rows, title) + "".join(f"\n\n{f}" for f in failed)


def summary_table(results: list[dict]) -> str:
    rows = []
    for res in results:
        runs = [r for r in res["runs"] if not r.get("failed")]
        final = [r["steps"]["evaluate"]["metrics"] for r in runs]
        sft = [r["steps"]["sft"]["metrics"].get("gold_reward") for r in runs if "sft" in r["steps"]]
        minutes = statistics.fmean(sum(s["seconds"] for s in r["steps"].values()) for r in runs) / 60 if runs else 0
        rows.append(
            [res["family"], _spread([g for g in sft if g is not None])]
            + [_spread([m[k] for m in final if k in m]) for k in SUMMARY]
            + [f"{minutes:.1f}" if runs else "–", f"{len(runs)}/{len(res['runs'])}"]
        )
    return table(
        ["family", "SFT gold", *(f"final {k}" for k in SUMMARY), "min/run", "runs completed"],
        rows,
        "Final model (evaluate stage, against the SFT model) per family, mean ± sd over seeds",
    )


def run(
    quick: bool = False,
    families: tuple[str, ...] = FAMILIES,
    seeds: tuple[int, ...] | None = None,
    scale: float | None = None,
    workers: int | None = None,
) -> dict:
    """`scale`: the share of the tiny preset's steps and samples each stage runs (default FULL)."""
    seeds, scale = seeds or SEEDS, scale or (QUICK if quick else FULL)
    with tempfile.TemporaryDirectory(prefix="llmfab-bench-efficacy-") as root:
        shared = run_isolated("benchmarks.efficacy:prepare", {"root": root, "scale": scale}, threads=1)

        def one(job: tuple[str, int]) -> dict:
            family, seed = job
            kwargs = {"family": family, "seed": seed, "data": shared["data"], "root": root, "scale": scale}
            return run_isolated("benchmarks.efficacy:run_seed", kwargs, threads=1)

        # One single-threaded process per core: the tiny models gain nothing from a second intra-op thread
        # here (3.4k tokens/s with one or two), so two runs at a time go ~2x faster than one with two.
        # The slowest families start first, so the two workers finish together.
        jobs = sorted(((f, s) for f in families for s in seeds), key=lambda j: COST.get(j[0], 1), reverse=True)
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            done = dict(zip(jobs, pool.map(one, jobs), strict=True))
        results = [{"family": f, "runs": [done[(f, s)] for s in seeds]} for f in families]
    tables = [summary_table(results)] + [family_table(r) for r in results]
    overrides = {"scale": scale, "shrink": {f: shrink(f, scale) for f in families}}
    if not quick:
        write_results(tables, seeds, scale)
    return {"tables": tables, "results": {"families": results, "overrides": overrides}}


RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## efficacy"


def write_results(tables: list[str], seeds: tuple[int, ...], scale: float, path: Path = RESULTS) -> None:
    """Replace RESULTS.md's efficacy section (from its heading to the next `## `) with this run's tables."""
    import time

    body = (
        f"{SECTION}\n\nThe tiny presets, {'their own steps' if scale == FULL else f'{scale:g} of their steps'}, "
        f"seeds {', '.join(map(str, seeds))} ({time.strftime('%Y-%m-%d')}; `python -m benchmarks --only efficacy`).\n\n"
        + "\n\n".join(tables)
        + "\n"
    )
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(SECTION)
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + body)
        return
    end = text.find("\n## ", start + len(SECTION))
    path.write_text(text[:start] + body + (text[end + 1 :] if end >= 0 else ""))
