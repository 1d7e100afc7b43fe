"""The evaluate stage on the tiny testbed: every metric under its family-independent name and in range,
the report in the store and the MLflow table agreeing with the metrics, a model against itself
tying (win rates 1/2, KL 0), missing inputs skipped with a reason, bad config fields named."""

import json
import math
import re
from pathlib import Path

import pytest

from conftest import TINY_MODEL, pretrain_tiny
from llmfab.errors import ConfigError
from llmfab.evaluation.report import win_rate
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.tracking import Tracker

QUICK = dict(
    prompts=6,
    heldout_conversations=12,
    sample_prompts=3,
    samples_per_prompt=2,
    max_new_tokens=8,
    needle_samples=2,
    batch_size=8,
)
SAMPLED = {"rm_score", "rm_score_reference", "win_rate_rm", "win_rate_gold", "kl_to_reference"}
NEEDLE = {"needle_acc", "needle_nll", "needle_margin", "needle_length"}


@pytest.fixture(scope="module")
def models(testbed, tmp_path_factory):
    """A policy, a different (less trained) reference, and a reward model with a trained head."""
    root = tmp_path_factory.mktemp("evaluate")
    policy = pretrain_tiny(testbed, root / "policy", 20).outputs["model"]
    reference = pretrain_tiny(testbed, root / "reference", 6).outputs["model"]
    rm = run_stage(
        "reward_model",
        {"eval_pairs": 8, "train": {"max_steps": 2, "batch_size": 8}},
        {"init": reference, "data": testbed["preferences"]},
        store=open_store(root / "rm"),
        track=False,
        show_progress=False,
    )
    return {"policy": policy, "reference": reference, "rm": rm.outputs["model"]}


def _evaluate(inputs, folder, tracker=None, track=True, **cfg):
    store = open_store(folder)
    return run_stage(
        "evaluate", {**QUICK, **cfg}, inputs, store=store, tracker=tracker, track=track, show_progress=False
    )


def _report(res) -> dict:
    return json.loads(open_store(res.outputs["report"]).get_text("evaluation.json"))


def _columns(tracker, run_id: str, artifact: str, tmp_path) -> dict[str, list]:
    table = json.loads(Path(tracker.client.download_artifacts(run_id, artifact, str(tmp_path))).read_text())
    return {c: [row[i] for row in table["data"]] for i, c in enumerate(table["columns"])}


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 4.0, 0.0]) == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0], [1.0, 2.0])


def test_evaluate_measures_everything_and_reports_it(testbed, models, tmp_path, tracking_uri):
    tracker = Tracker(tracking_uri)
    inputs = {
        "model": models["policy"],
        "reference": models["reference"],
        "reward_model": models["rm"],
        "data": testbed["sft"],
        "prompts": testbed["prompts"],
        "corpus": testbed["text"],
    }
    res = _evaluate(inputs, tmp_path, tracker)
    m = res.metrics
    assert {"heldout_loss", "heldout_ppl", "gold_reward", *SAMPLED, *NEEDLE} <= set(m)
    assert any(k.startswith("gold_reward_") for k in m)
    # Pretrained beats a uniform guess over the vocabulary on the held-out answers.
    assert 0 < m["heldout_loss"] < math.log(TINY_MODEL["vocab_size"])
    assert m["heldout_ppl"] == pytest.approx(math.exp(m["heldout_loss"]))
    for name in ("gold_reward", "win_rate_rm", "win_rate_gold", "needle_acc"):
        assert 0 <= m[name] <= 1, name
    assert m["needle_length"] == TINY_MODEL["max_position_embeddings"]  # the trained context by default
    assert m["needle_nll"] > 0 and math.isfinite(m["kl_to_reference"]) and math.isfinite(m["needle_margin"])

    report = _report(res)
    assert report["skipped"] == {}
    timings = {k for k in m if k == "stage_seconds" or k.startswith("time_")}  # the runner's, not the report's
    assert report["metrics"] == pytest.approx({k: v for k, v in m.items() if k not in timings})
    rows = {r["metric"]: r for r in report["rows"]}
    assert rows["win_rate_rm"]["n"] == QUICK["sample_prompts"] * QUICK["samples_per_prompt"]
    assert rows["heldout_loss"]["on"].startswith("data test split") and rows["heldout_loss"]["n"] > 0

    logged = {a.path for a in tracker.client.list_artifacts(res.run_id)}
    assert "evaluation.json" in logged
    table = json.loads(
        Path(tracker.client.download_artifacts(res.run_id, "evaluation.json", str(tmp_path))).read_text()
    )
    assert table["columns"] == ["metric", "value", "on", "n"]
    assert {r[0]: r[1] for r in table["data"]} == pytest.approx(report["metrics"])
    samples = {a.path for a in tracker.client.list_artifacts(res.run_id, "samples")}
    assert samples == {"samples/gold.json", "samples/sampled.json"}
    col = _columns(tracker, res.run_id, "samples/sampled.json", tmp_path)
    assert col["response"] != col["reference_response"]  # two different models answer differently
    pairs = list(zip(col["rm_score"], col["rm_score_reference"], strict=True))
    assert m["win_rate_rm"] == pytest.approx(sum(a > b for a, b in pairs) / len(pairs))  # no ties between models
    assert m["kl_to_reference"] == pytest.approx(sum(col["kl_to_reference"]) / len(col["kl_to_reference"]), rel=1e-5)
    run = tracker.client.get_run(res.run_id)
    assert run.data.metrics["win_rate_rm"] == pytest.approx(m["win_rate_rm"])


def test_a_model_against_itself_ties(testbed, models, tmp_path, tracking_uri):
    tracker = Tracker(tracking_uri)
    inputs = {
        "model": models["policy"],
        "reference": models["policy"],
        "reward_model": models["rm"],
        "prompts": testbed["prompts"],
    }
    res = _evaluate(inputs, tmp_path, tracker, sample_prompts=4, max_new_tokens=12)
    m = res.metrics
    assert m["win_rate_rm"] == 0.5 and m["win_rate_gold"] == 0.5
    assert m["rm_score"] == pytest.approx(m["rm_score_reference"])
    assert abs(m["kl_to_reference"]) < 1e-5
    col = _columns(tracker, res.run_id, "samples/sampled.json", tmp_path)
    assert col["response"] == col["reference_response"]  # same seed, same answers
    assert any(col["response"])  # ...and not trivially (all empty)
    skipped = _report(res)["skipped"]
    assert set(skipped) == {"heldout_loss", "heldout_ppl", *NEEDLE}
    assert "`data`" in skipped["heldout_loss"] and "`corpus`" in skipped["needle_acc"]


def test_missing_inputs_are_skipped_with_reasons(testbed, models, tmp_path):
    inputs = {"model": models["policy"], "data": testbed["sft"], "corpus": testbed["text"]}
    res = _evaluate(inputs, tmp_path, needle_length=96)
    m = res.metrics
    # Gold prompts fall back to the chat data's test split; no RM, no reference: nothing sampled.
    assert {"heldout_loss", "gold_reward", "needle_acc"} <= set(m) and not SAMPLED & set(m)
    assert m["needle_length"] == 96
    skipped = _report(res)["skipped"]
    assert set(skipped) == SAMPLED
    assert skipped["rm_score"] == "no `reward_model` input"
    assert skipped["win_rate_rm"] == "no `reward_model` input and no `reference` input"

    only = _evaluate({"model": models["policy"]}, tmp_path / "only", track=False)
    assert _report(only)["metrics"] == {} and len(_report(only)["skipped"]) == len(SAMPLED) + 2 + 1 + len(NEEDLE)


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"samples_per_prompt": 0}, "samples_per_prompt"),
        ({"promts": 5}, "promts"),
        ({"temperature": -1}, "temperature"),
    ],
)
def test_bad_config_names_the_field(cfg, field):
    with pytest.raises(ConfigError, match=field):
        run_stage("evaluate", cfg, {"model": "unused"}, track=False)


# -- the measurements one by one (evaluation.measures) ------------------------------------------
def test_heldout_perplexity_counts_assistant_tokens(testbed, models):
    from llmfab.evaluation.measures import heldout_perplexity
    from llmfab.models import load_model, load_tokenizer

    tok, model = load_tokenizer(models["policy"]), load_model(models["policy"]).eval()
    got = heldout_perplexity(model, tok, testbed["sft"], max_len=256, conversations=4, batch_size=4)
    assert set(got.metrics) == {"heldout_loss", "heldout_ppl"} and got.samples is None
    assert got.metrics["heldout_ppl"] == pytest.approx(math.exp(got.metrics["heldout_loss"]))
    assert re.fullmatch(r"data test split: assistant tokens of [1-4] conversations", got.on) and got.n > 4


def test_greedy_gold_reward_counts_prompts_per_task(testbed, models):
    from llmfab.evaluation.gold import task_prompts
    from llmfab.evaluation.measures import greedy_gold_reward
    from llmfab.models import load_model, load_tokenizer

    tok, model = load_tokenizer(models["policy"]), load_model(models["policy"]).eval()
    records = task_prompts(testbed["prompts"], "prompt", "test", 4)
    got = greedy_gold_reward(model, tok, records, "prompts test split", max_new_tokens=6, batch_size=4, seed=0)
    tasks = {f"gold_reward_{r['task']}" for r in records}
    assert set(got.metrics) == set(got.n)
    assert {"gold_reward", "gold_reward_stderr", "response_tokens", *tasks} <= set(got.metrics)
    assert all(k.endswith("_stderr") for k in set(got.metrics) - {"gold_reward", "response_tokens", *tasks})
    assert got.n["gold_reward"] == got.n["response_tokens"] == 4 == sum(got.n[t] for t in tasks)
    assert got.on == "prompts test split, greedy"
    assert got.metrics["gold_reward"] == pytest.approx(sum(got.samples["gold_reward"]) / 4)


def test_sampled_comparison_measures_what_its_models_allow(testbed, models):
    from llmfab.evaluation.gold import task_prompts
    from llmfab.evaluation.measures import sampled_comparison
    from llmfab.models import load_model, load_tokenizer

    tok, model = load_tokenizer(models["policy"]), load_model(models["policy"]).eval()
    rm = load_model(models["rm"], kind="reward").eval()
    reference = load_model(models["reference"]).eval()
    records = task_prompts(testbed["prompts"], "prompt", "test", 2)
    sampling = dict(n=2, temperature=1.0, max_new_tokens=6, seed=0, batch_size=4)
    by_rm = sampled_comparison(model, tok, records, "prompts test split", reward_model=rm, **sampling)
    assert set(by_rm.metrics) == {"rm_score"} and by_rm.n == 4
    assert by_rm.on == "prompts test split, 2 samples per prompt at T=1.0"
    by_ref = sampled_comparison(model, tok, records, "prompts test split", reference=reference, **sampling)
    assert set(by_ref.metrics) == {"kl_to_reference", "win_rate_gold"}
    both = sampled_comparison(model, tok, records, "on", reference=reference, reward_model=rm, **sampling)
    assert set(both.metrics) == SAMPLED and len(both.samples["response"]) == 4
    assert both.metrics["rm_score"] == by_rm.metrics["rm_score"]  # the same seeded answers
    assert both.metrics["kl_to_reference"] == by_ref.metrics["kl_to_reference"]


def test_needle_retrieval_reports_its_length(testbed, models):
    from llmfab.evaluation.measures import needle_retrieval
    from llmfab.models import load_model, load_tokenizer

    tok, model = load_tokenizer(models["policy"]), load_model(models["policy"]).eval()
    got = needle_retrieval(model, tok, testbed["text"], length=96, samples=2, seed=0)
    assert set(got.metrics) == NEEDLE and got.metrics["needle_length"] == 96
    assert 0 <= got.metrics["needle_acc"] <= 1 and got.metrics["needle_nll"] > 0
    assert got.n == 2 and got.on == "corpus test prose, depths spread evenly" and got.samples is None
