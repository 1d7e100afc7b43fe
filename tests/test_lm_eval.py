"""lm-evaluation-harness in the evaluate stage, offline: a task defined locally (YAML + JSONL through include_path)
reaches MLflow and the gate (a promotion, a refusal by margin, a refusal by stderr_k); a built-in hub task
(arc_easy) resolves from an offline datasets cache; the testbed's gold reward through lm-eval answers exactly as
the training stages' in-process gold evaluation; harness failures are llmfab errors naming the task and file."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hub_fixtures import save_hub_model
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import pretrain_tiny
from llmfab.cli import app
from llmfab.errors import ConfigError, LlmfabError
from llmfab.evaluation.gold import gold_eval, task_prompts
from llmfab.evaluation.harness import flatten, metric_name
from llmfab.evaluation.measures import greedy_gold_reward
from llmfab.models import load_model, load_tokenizer, save_model
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.tracking import Tracker

DOCS = 20
OFF = dict(prompts=0, heldout_conversations=0, sample_prompts=0, needle_samples=0)  # only the benchmarks
IMPOSSIBLE = "an answer far longer than the two tokens the model may write"
TASK_YAML = """task: my_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question {{{{id}}}}:"
doc_to_target: "{{{{answer}}}}"
process_results: !function scoring.process_results
generation_kwargs: {{until: ["\\n"], max_gen_toks: 2, do_sample: false}}
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""
SCORING = '''def process_results(doc, results):
    """An answer of "*" accepts whatever the model writes; any other must be matched exactly."""
    return {"acc": float(doc["answer"] == "*" or results[0].strip() == doc["answer"])}
'''


def task_folder(folder: Path, accepted: int, docs: int = DOCS) -> Path:
    """`my_task` over `docs` documents of which `accepted` accept any answer and the rest cannot be answered in
    two tokens: acc = accepted / docs whatever the model, its stderr sqrt(p(1-p)/(docs-1))."""
    folder.mkdir(parents=True)
    data = folder / "my_task.jsonl"
    rows = [{"id": i, "answer": "*" if i < accepted else IMPOSSIBLE} for i in range(docs)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "my_task.yaml").write_text(TASK_YAML.format(data=data))
    (folder / "scoring.py").write_text(SCORING)
    return folder


def stderr(p: float, n: int = DOCS) -> float:
    return math.sqrt(p * (1 - p) / (n - 1))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Four tiny Qwen2 store checkpoints, each with one weight nudged (four model versions)."""
    root = tmp_path_factory.mktemp("lm_eval_models")
    base = save_hub_model("qwen2", root / "base")
    out = []
    for i in range(4):
        model, tokenizer = load_model(base), load_tokenizer(base)
        with torch.no_grad():
            next(model.parameters()).add_(1e-3 * (i + 1))
        out.append(save_model(model, tokenizer, open_store(root / f"m{i}"), {}))
    return out


def _evaluate(model: str, task_dir: Path, folder: Path, tracker=None, **lm_eval):
    cfg = {**OFF, "lm_eval": {"tasks": ["my_task"], "include_path": str(task_dir), **lm_eval}}
    store = open_store(folder)
    return run_stage("evaluate", cfg, {"model": model}, store=store, tracker=tracker, show_progress=False)


def test_result_keys_become_metric_names():
    assert metric_name("gsm8k", "exact_match,none") == "lm_eval.gsm8k.exact_match"
    assert metric_name("gsm8k", "exact_match_stderr,strict-match") == "lm_eval.gsm8k.exact_match.strict-match_stderr"
    assert metric_name("gsm8k", "alias") is None
    results = {
        "results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "f1,none": float("nan")}},
        "groups": {"g": {"acc,none": 0.25, "acc_stderr,none": 0.1}},
    }
    assert flatten(results) == {"lm_eval.t.acc": 0.5, "lm_eval.g.acc": 0.25, "lm_eval.g.acc_stderr": 0.1}


def test_a_local_task_reaches_mlflow_and_the_gate_rules_on_it(models, tmp_path, tracking_uri):
    tracker = Tracker(tracking_uri)
    client = MlflowClient(tracking_uri)
    rule = {"metric": "lm_eval.my_task.acc", "margin": 0.01, "stderr_k": 2}
    register = {"name": "benchmarked", "log_model": "uri", "gate": [rule]}

    def evaluate_and_register(i: int, accepted: int):
        res = _evaluate(models[i], task_folder(tmp_path / f"tasks{i}", accepted), tmp_path / f"eval{i}", tracker)
        reg = run_stage(
            "register",
            register,
            {"model": models[i], "report": res.outputs["report"]},
            store=open_store(tmp_path / f"reg{i}"),
            tracker=tracker,
            show_progress=False,
        )
        return res, reg

    first, reg = evaluate_and_register(0, 10)  # acc 0.5: the first champion
    m = first.metrics
    assert m["lm_eval.my_task.acc"] == pytest.approx(0.5)
    assert m["lm_eval.my_task.acc_stderr"] == pytest.approx(stderr(0.5))
    logged = client.get_run(first.run_id).data.metrics
    assert logged["lm_eval.my_task.acc"] == pytest.approx(0.5) and "lm_eval.my_task.acc_stderr" in logged
    report = open_store(first.outputs["report"])
    rows = {r["metric"]: r for r in json.loads(report.get_text("evaluation.json"))["rows"]}
    assert rows["lm_eval.my_task.acc"]["n"] == DOCS and "my_task" in rows["lm_eval.my_task.acc"]["on"]
    harness = json.loads(report.get_text("lm_eval/benchmarks/results.json"))
    assert harness["results"]["my_task"]["acc,none"] == pytest.approx(0.5)
    samples = [json.loads(line) for line in report.get_text("lm_eval/benchmarks/samples_my_task.jsonl").splitlines()]
    assert len(samples) == DOCS and sum(s["acc"] for s in samples) == 10
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "lm_eval/benchmarks")}
    assert artifacts == {"lm_eval/benchmarks/results.json", "lm_eval/benchmarks/samples_my_task.jsonl"}
    assert reg.values == {"decision": "promote"}  # no champion yet
    run_stage("promote", {}, {"registration": reg.outputs["registration"]}, store=open_store(tmp_path / "p0"))
    description = client.get_model_version("benchmarked", "1").description
    assert f"my_task acc 0.5 ± {stderr(0.5):.2g}" in description

    # 0.9 vs 0.5: a gain of 0.4 beats 2 × sqrt(0.115² + 0.069²) = 0.27.
    _, reg = evaluate_and_register(1, 18)
    assert reg.values == {"decision": "promote"}
    run_stage("promote", {}, {"registration": reg.outputs["registration"]}, store=open_store(tmp_path / "p1"))
    assert str(client.get_model_version_by_alias("benchmarked", "champion").version) == "2"

    # 0.95 vs 0.9: beyond the margin, within the noise (2 × sqrt(0.05² + 0.069²) = 0.17): refused.
    _, reg = evaluate_and_register(2, 19)
    assert reg.values == {"decision": "keep"}
    (reason,) = json.loads(client.get_model_version("benchmarked", "3").tags["llmfab.gate.reasons"])
    bound = 2 * math.sqrt(stderr(0.95) ** 2 + stderr(0.9) ** 2)
    assert "gain +0.05 > margin 0.01" in reason and "<= 2 × sqrt(" in reason and f"= {bound:.6g}" in reason

    # 0.6 vs 0.9: worse, refused by the margin.
    _, reg = evaluate_and_register(3, 12)
    assert reg.values == {"decision": "keep"}
    (reason,) = json.loads(client.get_model_version("benchmarked", "4").tags["llmfab.gate.reasons"])
    assert "gain -0.3 <= margin 0.01" in reason
    assert str(client.get_model_version_by_alias("benchmarked", "champion").version) == "2"


def test_the_command_line_runs_a_local_task(models, tmp_path):
    tasks = task_folder(tmp_path / "tasks", 5)
    args = ["stage", "evaluate", "-i", f"model={models[0]}", "--output", str(tmp_path / "out")]
    for key, value in {**OFF, "lm_eval.tasks": "[my_task]", "lm_eval.include_path": tasks, "lm_eval.limit": 10}.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report" / "evaluation.json").read_text())
    assert report["metrics"]["lm_eval.my_task.acc"] == pytest.approx(0.5)  # the first 10 documents: 5 accept all
    assert {r["n"] for r in report["rows"]} == {10}


def test_harness_failures_name_the_task_and_file(models, tmp_path, tracking_uri):
    tracker = Tracker(tracking_uri)
    tasks = task_folder(tmp_path / "tasks", 5)
    with pytest.raises(ConfigError, match=r"lm_eval.tasks: 'no_such_task': not a task, group or tag of"):
        _evaluate(models[0], tasks, tmp_path / "unknown", tracker, tasks=["no_such_task"])

    broken = tmp_path / "broken"
    shutil.copytree(tasks, broken)
    (broken / "my_task.yaml").write_text("task: my_task\ndataset_path: [json\n")
    with pytest.raises(ConfigError, match=rf"'my_task'.*could not be read:\n  {broken / 'my_task.yaml'}: "):
        _evaluate(models[0], broken, tmp_path / "malformed", tracker)

    missing = tmp_path / "missing"
    shutil.copytree(tasks, missing)
    (missing / "my_task.yaml").write_text(TASK_YAML.format(data=missing / "gone.jsonl"))
    named = rf"lm_eval task 'my_task' \({missing / 'my_task.yaml'}\): cannot be loaded: .*gone\.jsonl"
    with pytest.raises(LlmfabError, match=named):
        _evaluate(models[0], missing, tmp_path / "no_data", tracker)

    # The command line shows the message, not a traceback; no evaluation metric reached MLflow.
    args = ["stage", "evaluate", "-i", f"model={models[0]}", "--output", str(tmp_path / "cli")]
    args += ["--set", "lm_eval.tasks=[my_task]", "--set", f"lm_eval.include_path={missing}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "cannot be loaded" in result.output and "Traceback" not in result.output
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not any(k.startswith("lm_eval.") for r in runs for k in r.data.metrics)


def test_vllm_backend_needs_vllm_and_a_gpu(models, tmp_path):
    with pytest.raises(ConfigError, match=r"lm_eval\.backend: vllm: "):
        _evaluate(models[0], task_folder(tmp_path / "tasks", 5), tmp_path / "out", backend="vllm")


def arc_easy_cache(cache: Path, rows: list[dict], commit: str = "c" * 40) -> None:
    """allenai/ai2_arc's ARC-Easy in a datasets cache (HF_DATASETS_CACHE) as an online load_dataset leaves it:
    prepared Arrow files under allenai___ai2_arc/ARC-Easy/0.0.0/<commit>/, which datasets reads offline."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split in ("train", "validation", "test"):
        files[split] = str(cache.parent / f"arc-{split}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(files[split])
    builder = Parquet(
        cache_dir=str(cache), dataset_name="ai2_arc", config_name="ARC-Easy", hash=commit, data_files=files
    )
    builder.download_and_prepare()
    # A hub load names the folder <namespace>___<name>/<config>; a local builder names it <name>/<config>-<hash>.
    (cache / "allenai___ai2_arc").mkdir()
    prepared = next((cache / "ai2_arc").iterdir())
    shutil.move(str(prepared), str(cache / "allenai___ai2_arc" / "ARC-Easy"))


def test_a_hub_task_resolves_from_an_offline_datasets_cache(models, tmp_path, monkeypatch):
    import datasets.config

    cache = tmp_path / "hf_datasets"
    rows = [
        {
            "id": f"q{i}",
            "question": f"Which number follows {i}?",
            "choices": {"text": [str(i + 1), str(i + 5), str(i + 9)], "label": ["A", "B", "C"]},
            "answerKey": "A",
        }
        for i in range(6)
    ]
    arc_easy_cache(cache, rows)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    res = run_stage(
        "evaluate",
        {**OFF, "lm_eval": {"tasks": ["arc_easy"], "limit": 4}},
        {"model": models[0]},
        store=open_store(tmp_path / "out"),
        track=False,
        show_progress=False,
    )
    m = res.metrics
    assert {"lm_eval.arc_easy.acc", "lm_eval.arc_easy.acc_stderr", "lm_eval.arc_easy.acc_norm"} <= set(m)
    samples = open_store(res.outputs["report"]).get_text("lm_eval/benchmarks/samples_arc_easy.jsonl").splitlines()
    docs = [json.loads(line)["doc"] for line in samples]
    assert [d["id"] for d in docs] == ["q0", "q1", "q2", "q3"]  # our cached rows, the first `limit` of them
    assert m["lm_eval.arc_easy.acc"] == pytest.approx(sum(json.loads(s)["acc"] for s in samples) / 4)


def test_the_testbed_through_lm_eval_answers_as_the_in_process_gold_eval(testbed, tmp_path):
    """One evaluation path: the same greedy answers and gold rewards as the training stages' gold evaluation."""
    model_uri = pretrain_tiny(testbed, tmp_path / "m", 4).outputs["model"]
    model, tokenizer = load_model(model_uri).eval(), load_tokenizer(model_uri)
    records = task_prompts(testbed["prompts"], "prompt", "test", 12)
    # batch 1: no padding, so both paths see the same logits
    metrics, rows = gold_eval(model, tokenizer, records, max_new_tokens=6, batch_size=1)
    measured = greedy_gold_reward(model, tokenizer, records, "prompts", max_new_tokens=6, batch_size=1, seed=0)
    assert measured.samples["response"] == rows["response"]
    assert measured.samples["gold_reward"] == rows["gold_reward"]
    for name, value in metrics.items():
        assert measured.metrics[name] == pytest.approx(value), name
    assert measured.n["gold_reward"] == len(records)
    rewards = rows["gold_reward"]
    assert measured.metrics["gold_reward_stderr"] == pytest.approx(
        stderr(sum(rewards) / len(rewards), len(rewards)), abs=1e-9
    )
