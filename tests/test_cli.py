import json

import pytest
from typer.testing import CliRunner

from llmfab.cli import app
from llmfab.data.io import read_dataset
from llmfab.models import load_tokenizer
from llmfab.tracking import Tracker

runner = CliRunner()
SMALL = [
    "--set",
    "data.prose_docs=40",
    "--set",
    "data.code_docs=20",
    "--set",
    "data.task_docs=40",
    "--set",
    "data.sft_examples=20",
    "--set",
    "data.prompts=10",
    "--set",
    "data.preference_pairs=20",
    "--set",
    "tokenizer.vocab_size=400",
]


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "stage", "stages", "compile", "recipes", "compile-pipelines", "submit"):
        assert command in result.output


def test_stages_and_recipes_listing():
    assert "prepare_data" in runner.invoke(app, ["stages"]).output
    out = runner.invoke(app, ["recipes"]).output
    assert "qwen2" in out and "llama31" in out


def test_compile_plan(tmp_path):
    out = tmp_path / "plan.yaml"
    result = runner.invoke(app, ["compile", "all", "-o", str(out), "--set", "tokenizer.vocab_size=999"])
    assert result.exit_code == 0, result.output
    import yaml

    plans = list(yaml.safe_load_all(out.read_text()))
    assert [p["family"] for p in plans] == ["afm", "gemma2", "llama31", "qwen2"]
    assert all(p["steps"][1]["config"]["vocab_size"] == 999 for p in plans)
    qwen2 = plans[3]
    assert [s["id"] for s in qwen2["steps"]] == [
        "data",
        "tokenizer",
        "generator",
        "synthetic",
        "pretrain",
        "long_context",
        "sft",
        "dpo",
        "reward",
        "online_dpo",
        "evaluate",
        "register",
        "promote",
    ]
    llama = plans[2]
    assert llama["rounds"] == {"round": 2}  # each round's steps in the plan
    average = next(s for s in llama["steps"] if s["id"] == "round2/average")
    assert average["inputs"]["models"] == "round2/dpo.model"  # a parallel step's outputs: a list input
    dpo = next(s for s in llama["steps"] if s["id"] == "round1/dpo")
    assert dpo["parallel"] == [{"seed": 0}, {"seed": 1}]
    rejection = next(s for s in llama["steps"] if s["id"] == "round2/rejection")
    assert rejection["inputs"]["model"] == "round1/average.model"  # the previous round's model
    assert qwen2["steps"][4]["config"]["model"]["hidden_size"] == 128  # ${models.policy} resolved
    assert qwen2["steps"][-1]["when"] == "register.decision == promote"


def test_bad_override_names_field():
    result = runner.invoke(app, ["run", "qwen2", "--set", "tokenizer.vocab_size=-5"])
    assert result.exit_code == 2
    assert "presets.tiny.config.tokenizer.vocab_size" in result.output


def test_run_family_tracks_nested_runs(tmp_path, tracking_uri):
    store = tmp_path / "store"
    result = runner.invoke(
        app,
        [
            "run",
            "qwen2",
            "--preset",
            "tiny",
            "--store",
            str(store),
            "--run-name",
            "ci-run",
            "--runner",
            "inprocess",
            "--only",
            "tokenizer",
            *SMALL,
        ],
    )
    assert result.exit_code == 0, result.output
    tracker = Tracker(tracking_uri)
    parents = tracker.client.search_runs([tracker.experiment_id], "tags.`llmfab.kind` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in tracker.child_runs(parents[0].info.run_id)}
    assert set(children) == {"data", "tokenizer"}
    tok_uri = children["tokenizer"].data.tags["llmfab.output.tokenizer"]
    assert tok_uri.startswith((store / "runs" / "ci-run" / "tokenizer").as_uri())
    assert len(load_tokenizer(tok_uri)) == 400
    text_uri = children["data"].data.tags["llmfab.output.text"]
    assert len(read_dataset(text_uri, "text")) == 90  # 100 docs, 10% held out


def test_stage_command(tmp_path):
    cfg = tmp_path / "data.yaml"
    cfg.write_text("prose_docs: 10\ncode_docs: 5\ntask_docs: 5\nsft_examples: 5\nprompts: 5\npreference_pairs: 5\n")
    result = runner.invoke(app, ["stage", "prepare_data", "-c", str(cfg), "--output", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    outputs = json.loads(result.stdout)["outputs"]
    assert outputs["text"] == (tmp_path / "o" / "text").as_uri()
    result = runner.invoke(
        app,
        [
            "stage",
            "train_tokenizer",
            "-i",
            f"corpus={outputs['text']}",
            "--set",
            "vocab_size=300",
            "--store",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"]["tokenizer"].startswith((tmp_path / "s" / "stages").as_uri())


@pytest.mark.parametrize(
    "args,message",
    [
        (["stage", "prepare_data", "-c", "missing.yaml"], "missing.yaml: no such config file"),
        (["stage", "train_tokenizer", "-i", "corpus"], "expected NAME=URI"),
        (["stage", "nope"], "unknown stage 'nope'"),
        (["stage", "prepare_data", "--set", "prose_docs=-1"], "prose_docs: Input should be greater than or equal to 0"),
    ],
)
def test_stage_command_errors(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


def test_unknown_only_step_is_an_error():
    result = runner.invoke(app, ["run", "qwen2", "--runner", "inprocess", "--only", "pretrian"])
    assert result.exit_code == 2
    assert "--only pretrian: no such step" in result.output


def test_images_lists_each_targets_image():
    from llmfab.images import GROUPS
    from llmfab.stages import all_stages

    assert "images" in runner.invoke(app, ["--help"]).output
    result = runner.invoke(app, ["images", "--plain", "--registry", "registry.example.com/ml", "--tag", "1.2.3"])
    assert result.exit_code == 0, result.output
    images = dict(line.split() for line in result.output.splitlines())
    shipped = {name for name, spec in all_stages().items() if spec.fn.__module__.startswith("llmfab.stages.")}
    assert set(images) == {*GROUPS, *shipped}
    assert images["sft"] == "registry.example.com/ml/llmfab-sft:1.2.3"
    table = runner.invoke(app, ["images"]).output
    assert "prepare_data" in table and "…" not in table
    assert runner.invoke(app, ["images", "--tag", "not a tag"]).exit_code == 2


def test_promote_rule_takes_a_stderr_multiple():
    from llmfab.cli import _rule
    from llmfab.errors import LlmfabError
    from llmfab.registry.promotion import parse_rules

    rule = parse_rules([_rule("lm_eval.gsm8k.exact_match.strict-match:0.01:higher:2")])[0]
    assert (rule.metric, rule.margin, rule.higher_is_better, rule.stderr_k) == (
        "lm_eval.gsm8k.exact_match.strict-match", 0.01, True, 2.0)  # fmt: skip
    assert parse_rules([_rule("heldout_ppl:1:lower")])[0].stderr_k is None
    with pytest.raises(LlmfabError, match="stderr_k 'x' is not a number"):
        _rule("gold_reward:0.01:higher:x")
