"""Recipe control flow: `parallel` steps (KFP ParallelFor + Collected) and `when` conditions (KFP If) on a stage's
values, validated at load time and run the same way in process."""

from pathlib import Path

import pytest

from llmfab.config.recipe import load_recipe, run_name_of, variant_name
from llmfab.errors import ConfigError
from llmfab.runs import InProcess, KfpLocal, plan_run
from llmfab.runs.plan import plan_recipe
from llmfab.stages.base import StageConfig, stage
from llmfab.tracking import Tracker


class CoinConfig(StageConfig):
    side: str = "heads"


@stage("coin_for_tests", CoinConfig, inputs={"model": "any checkpoint"}, values={"side": "heads or tails"})
def coin(config, inputs, ctx):
    """A stage with a value (as register's `decision`): the side it was told to show."""
    ctx.log_metrics({"flipped": 1.0})
    return {"side": config.side}


HEAD = """
family: flow
steps:
  - {id: data, stage: prepare_data}
  - {id: tokenizer, stage: train_tokenizer, inputs: {corpus: data.text}}
  - {id: pre, stage: pretrain, inputs: {corpus: data.text, tokenizer: tokenizer.tokenizer},
     parallel: [{seed: 0}, {seed: 1, train: {max_steps: 3}}]}
"""
PRESET = """
presets:
  tiny:
    models:
      m: {arch: llama, vocab_size: 300, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1,
          intermediate_size: 64, max_position_embeddings: 64}
    config:
      data: {prose_docs: 30, code_docs: 10, task_docs: 30, sft_examples: 10, prompts: 10, preference_pairs: 10}
      tokenizer: {vocab_size: 300}
      pre: {model: "${models.m}", seq_len: 64, train: {max_steps: 2, batch_size: 2}}
"""


def _recipe(tmp_path, steps: str, preset: str = PRESET):
    path = tmp_path / "flow.yaml"
    path.write_text(HEAD + steps + preset)
    return path


def test_parallel_items_configure_each_run(tmp_path):
    path = _recipe(tmp_path, "  - {id: avg, stage: average, inputs: {models: pre.model}}\n")
    step = load_recipe(path).step("pre")
    assert [c.seed for c in step.variant_configs] == [0, 1]
    assert [c.train.max_steps for c in step.variant_configs] == [2, 3]  # an item's nested field, merged
    assert step.variant_configs[1].model.hidden_size == 32  # the rest of the preset's config kept
    assert step.config_for({"seed": 1, "train": {"max_steps": 3}}).train.max_steps == 3
    assert run_name_of("pre", {"seed": 1, "a": 2}) == "pre/a-2_seed-1"
    assert variant_name({"seed": 1, "train": {"max_steps": 3}}) == "seed-1_train.max_steps-3"
    with pytest.raises(ConfigError, match="no parallel item"):
        step.config_for({"seed": 7})


@pytest.mark.parametrize(
    "steps, message",
    [
        ("  - {id: c, stage: coin_for_tests, inputs: {model: pre.model}}\n", "runs in parallel"),
        ("  - {id: avg, stage: average, inputs: {models: [pre.model, pre.model]}}\n", "give it alone"),
        (
            "  - {id: avg, stage: average, inputs: {models: pre.model}}\n"
            "  - {id: c, stage: coin_for_tests, inputs: {model: avg.model}}\n"
            "  - {id: d, stage: coin_for_tests, inputs: {model: avg.model}, when: c.side = heads}\n",
            "expected 'STEP.VALUE == TEXT'",
        ),
        (
            "  - {id: avg, stage: average, inputs: {models: pre.model}}\n"
            "  - {id: c, stage: coin_for_tests, inputs: {model: avg.model}}\n"
            "  - {id: d, stage: coin_for_tests, inputs: {model: avg.model}, when: c.colour == red}\n",
            "has values side, not 'colour'",
        ),
        (
            "  - {id: avg, stage: average, inputs: {models: pre.model}}\n"
            "  - {id: d, stage: coin_for_tests, inputs: {model: avg.model}, when: later.side == heads}\n"
            "  - {id: later, stage: coin_for_tests, inputs: {model: avg.model}}\n",
            "no earlier step 'later'",
        ),
        (
            "  - {id: avg, stage: average, inputs: {models: pre.model}}\n"
            "  - {id: c, stage: coin_for_tests, inputs: {model: avg.model}}\n"
            "  - {id: d, stage: average, inputs: {models: [avg.model]}, when: c.side == heads}\n"
            "  - {id: e, stage: coin_for_tests, inputs: {model: d.model}}\n",
            "runs only when c.side == heads; so must this one",
        ),
    ],
)
def test_control_flow_errors_name_the_step(tmp_path, steps, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_recipe(_recipe(tmp_path, steps))
    assert "flow.yaml" in str(info.value)


def test_parallel_item_is_validated_like_config(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text(HEAD.replace("{seed: 1, train: {max_steps: 3}}", "{seed: 1, train: {max_stepz: 3}}") + PRESET)
    with pytest.raises(ConfigError, match=r"steps\[2\]\.parallel\[1\]\.train\.max_stepz"):
        load_recipe(path)


def test_in_process_runner_runs_items_collects_outputs_and_skips_false_conditions(tmp_path, tracking_uri):
    steps = (
        "  - {id: avg, stage: average, inputs: {models: pre.model}}\n"
        "  - {id: c, stage: coin_for_tests, inputs: {model: avg.model}}\n"
        "  - {id: on_heads, stage: coin_for_tests, inputs: {model: avg.model}, when: c.side == heads}\n"
        "  - {id: on_tails, stage: coin_for_tests, inputs: {model: avg.model}, when: c.side == tails}\n"
    )
    recipe = load_recipe(_recipe(tmp_path, steps))
    plan = plan_recipe(recipe, store_uri=str(tmp_path / "store"), tracking_uri=tracking_uri)
    result = InProcess(show_progress=False).run(plan)
    seed_1 = "pre/seed-1_train.max_steps-3"
    assert list(result.steps) == ["data", "tokenizer", "pre/seed-0", seed_1, "avg", "c", "on_heads"]
    assert result.steps[seed_1].metrics["train_loss"] > 0
    assert result.steps["pre/seed-0"].outputs["model"] == f"{result.store_uri}/pre/seed-0/model"
    assert result.steps["c"].values == {"side": "heads"}
    tracker = Tracker(tracking_uri)
    children = {r.info.run_name: r for r in tracker.child_runs(result.run_id)}
    assert children["avg"].data.tags["llmfab.input.models"] == str(
        [f"{result.store_uri}/pre/seed-0/model", f"{result.store_uri}/pre/seed-1_train.max_steps-3/model"]
    )
    assert children["c"].data.tags["llmfab.value.side"] == "heads"
    assert children[seed_1].data.params["train.max_steps"] == "3"  # the item's config, as its run records it
    assert children["pre/seed-0"].data.params["train.max_steps"] == "2"
    parent = tracker.client.get_run(result.run_id)
    assert parent.data.tags["llmfab.skipped.on_tails"] == "c.side == tails is false"
    assert "on_tails" not in children


# Rounds: `tune` continues the previous round's model (round 1: the average of `pre`), `c` reads this round's.
ROUNDS = """
  - {id: avg, stage: average, inputs: {models: pre.model}}
  - rounds:
      id: round
      steps:
        - {id: tune, stage: pretrain,
           inputs: {corpus: data.text, tokenizer: tokenizer.tokenizer, init: prev.tune.model | avg.model}}
        - {id: c, stage: coin_for_tests, inputs: {model: tune.model}}
  - {id: final, stage: coin_for_tests, inputs: {model: round.tune.model}}
"""
ROUNDS_PRESET = PRESET.replace("    config:\n", "    rounds: {round: 2}\n    config:\n") + (
    '      tune: {seq_len: 64, seed: "${round}", train: {max_steps: 2, batch_size: 2}}\n'
)


def test_rounds_run_each_step_once_per_round_reading_the_previous_round(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, ROUNDS, ROUNDS_PRESET))
    ids = [s.id for s in recipe.steps]
    assert ids[3:] == ["avg", "round1/tune", "round1/c", "round2/tune", "round2/c", "final"]
    assert recipe.step("round1/tune").inputs["init"] == "avg.model"  # round 1: the fallback
    assert recipe.step("round2/tune").inputs["init"] == "round1/tune.model"  # then the previous round's
    assert recipe.step("round2/c").inputs["model"] == "round2/tune.model"  # its own round's step
    assert recipe.step("final").inputs["model"] == "round2/tune.model"  # after the block: the last round's
    assert [recipe.step(f"round{n}/tune").config.seed for n in (1, 2)] == [1, 2]  # ${round}
    assert recipe.step("round2/tune").round.name == "round2" and recipe.step("round2/tune").base_id == "tune"
    assert recipe.round_counts() == {"round": 2} and recipe.plan()["rounds"] == {"round": 2}
    three = load_recipe(tmp_path / "flow.yaml", overrides=["rounds.round=3", "tune.train.max_steps=4"])
    assert three.step("final").inputs["model"] == "round3/tune.model"
    assert three.step("round3/tune").config.train.max_steps == 4  # a round's step's config: every round's


@pytest.mark.parametrize(
    "edit, message",
    [
        (("prev.tune.model | avg.model", "prev.tune.model"), r"init='prev.tune.model': expected 'prev.STEP.OUTPUT \|"),
        (("prev.tune.model |", "prev.tuna.model |"), "rounds 'round' has no step 'tuna'; its steps: tune, c"),
        (("prev.tune.model |", "prev.tune.weights |"), "step 'tune' has outputs model"),
        (("| avg.model", "| tune.model"), r"FALLBACK \(round 1's value\) must be an earlier step's output or a URI"),
        (("| avg.model", "| pre.model"), "step 'pre' runs in parallel; a round reads one checkpoint"),
        (("{model: round.tune.model}", "{model: tune.model}"), "its last round's output is round.tune.model"),
        (("{model: round.tune.model}", "{model: round.tun.model}"), "rounds 'round' has steps tune, c"),
        (("{model: tune.model}}", "{model: tune.model}, when: final.side == heads}"), "when: not supported"),
        (("id: c,", "id: avg,"), "duplicate step ids avg"),
        (("id: round\n", "id: prev\n"), "'prev' is a reserved word"),
        (("{id: c, stage:", "{id: c, stag:"), r"steps\[4\]\.rounds\.steps\[1\]\.stag: Extra inputs"),
    ],
)
def test_round_errors_name_the_field(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_recipe(_recipe(tmp_path, ROUNDS.replace(*edit), ROUNDS_PRESET))
    assert "flow.yaml" in str(info.value)


def test_round_errors_name_the_step_and_input(tmp_path):
    path = _recipe(tmp_path, ROUNDS.replace("prev.tune.model | avg.model", "prev.tune.model"), ROUNDS_PRESET)
    with pytest.raises(ConfigError, match=r"steps\[4\]\.rounds\.steps\[0\] \(tune\): input init="):
        load_recipe(path)


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        (ROUNDS_PRESET.replace("{round: 2}", "{rnd: 2}"), [], r"presets\.tiny\.rounds\.rnd: no rounds block"),
        (ROUNDS_PRESET, ["rounds.round=0"], r"presets\.tiny\.rounds\.round: expected a number of rounds >= 1"),
        (ROUNDS_PRESET, ["rounds.rnd=2"], r"expected rounds\.BLOCK=N; rounds blocks: round"),
        (ROUNDS_PRESET, ["avg.seed=${round}"], r"presets\.tiny\.config\.avg\.seed: \$\{round\} is a round's number"),
    ],
)
def test_round_counts_and_numbers_are_checked(tmp_path, preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_recipe(tmp_path, ROUNDS, preset), overrides=overrides)


def test_in_process_runner_runs_the_rounds_in_order(tmp_path, tracking_uri):
    recipe = load_recipe(_recipe(tmp_path, ROUNDS, ROUNDS_PRESET))
    plan = plan_recipe(recipe, store_uri=str(tmp_path / "store"), tracking_uri=tracking_uri)
    result = InProcess(show_progress=False).run(plan)
    assert list(result.steps)[4:] == ["avg", "round1/tune", "round1/c", "round2/tune", "round2/c", "final"]
    store = result.store_uri
    assert result.steps["round2/tune"].outputs["model"] == f"{store}/round2/tune/model"
    children = {r.info.run_name: r for r in Tracker(tracking_uri).child_runs(result.run_id)}
    assert children["round1/tune"].data.tags["llmfab.input.init"] == f"{store}/avg/model"
    assert children["round2/tune"].data.tags["llmfab.input.init"] == f"{store}/round1/tune/model"
    assert children["final"].data.tags["llmfab.input.model"] == f"{store}/round2/tune/model"
    assert [children[f"round{n}/tune"].data.params["seed"] for n in (1, 2)] == ["1", "2"]


def test_rounds_compile_to_one_sub_pipeline_called_per_round(tmp_path):
    """KFP: the block is a sub-pipeline, called once per round (3 here, from an override), each call after the
    previous one and given its round's step ids and the previous round's model."""
    import json

    import yaml

    from llmfab.kubeflow.pipelines import compile_pipeline

    # Stages with images (the test's coin has none): average's `models` take URIs, what a round passes on too.
    steps = ROUNDS.replace("stage: coin_for_tests, inputs: {model:", "stage: average, inputs: {models:")
    path = _recipe(tmp_path, steps, ROUNDS_PRESET)
    ir = compile_pipeline(str(path), tmp_path / "flow-ir.yaml", overrides=["rounds.round=3"])
    spec = next(yaml.safe_load_all(ir.read_text()))
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    key = {t["taskInfo"]["name"]: k for k, t in tasks.items()}
    calls = [tasks[key[f"round{n}"]] for n in (1, 2, 3)]
    # KFP's compiler writes the sub-pipeline out once per call (comp-round, comp-round-2, ...): the same body.
    bodies = {tuple(sorted(spec["components"][c["componentRef"]["name"]]["dag"]["tasks"])) for c in calls}
    assert bodies == {("average", "pretrain")} and {c["componentRef"]["name"] for c in calls} == {
        "comp-round",
        "comp-round-2",
        "comp-round-3",
    }
    for n, call in enumerate(calls, start=1):
        params = call["inputs"]["parameters"]
        assert params["tune_step_id"]["runtimeValue"]["constant"] == f"round{n}/tune"
        assert params["c_step_id"]["runtimeValue"]["constant"] == f"round{n}/c"
        prev = call["inputs"]["artifacts"]["prev_tune__model"]["taskOutputArtifact"]
        if n == 1:
            assert prev == {"producerTask": key["avg"], "outputArtifactKey": "model"}
        else:
            assert prev == {"producerTask": key[f"round{n - 1}"], "outputArtifactKey": "tune__model"}
            assert key[f"round{n - 1}"] in call["dependentTasks"]
    final = [
        p["taskOutputParameter"]
        for p in tasks[key["final"]]["inputs"]["parameters"].values()
        if "taskOutputParameter" in p
    ]
    assert final == [{"producerTask": key["round3"], "outputParameterKey": "tune__model_uri"}]  # the last round's
    body = spec["components"][calls[0]["componentRef"]["name"]]
    assert body["inputDefinitions"]["artifacts"].keys() == {
        "pipeline_run",
        "data__text",
        "tokenizer__tokenizer",
        "prev_tune__model",
    }
    tune = body["dag"]["tasks"]["pretrain"]["inputs"]
    assert tune["parameters"]["step_id"] == {"componentInputParameter": "tune_step_id"}
    assert tune["artifacts"]["in_init"] == {"componentInputArtifact": "prev_tune__model"}
    opened = tasks[key["open-run"]]["inputs"]["parameters"]
    assert json.loads(opened["rounds"]["runtimeValue"]["constant"]) == {"round": 3}  # what open-run checks


def test_open_run_refuses_a_preset_with_other_rounds_than_the_graph(tmp_path):
    from llmfab.errors import LlmfabError
    from llmfab.kubeflow.runtime import open_run

    path = str(_recipe(tmp_path, ROUNDS, ROUNDS_PRESET))
    with pytest.raises(LlmfabError, match=r"rounds \{'round': 2\}, but this pipeline was built for \{'round': 3\}"):
        open_run(path, "tiny", [], str(tmp_path / "store"), "", "", "r", "", "kfp-1", '{"round": 3}')


KFP_ROUNDS = """
family: flow
steps:
  - {id: data, stage: prepare_data}
  - {id: tokenizer, stage: train_tokenizer, inputs: {corpus: data.text}}
  - {id: base, stage: pretrain, inputs: {corpus: data.text, tokenizer: tokenizer.tokenizer}}
  - rounds:
      id: round
      steps:
        - {id: tune, stage: pretrain, parallel: [{seed: 0}, {seed: 1}],
           inputs: {corpus: data.text, tokenizer: tokenizer.tokenizer, init: prev.avg.model | base.model}}
        - {id: avg, stage: average, inputs: {models: tune.model}}
  - {id: final, stage: average, inputs: {models: [round.avg.model, base.model]}}
presets:
  tiny:
    models:
      m: {arch: llama, vocab_size: 300, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1,
          intermediate_size: 64, max_position_embeddings: 64}
    rounds: {round: 2}
    config:
      data: {prose_docs: 30, code_docs: 10, task_docs: 30, sft_examples: 10, prompts: 10, preference_pairs: 10}
      tokenizer: {vocab_size: 300}
      base: {model: "${models.m}", seq_len: 64, train: {max_steps: 2, batch_size: 2}}
      tune: {seq_len: 64, train: {max_steps: 2, batch_size: 2}}
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rounds_run_under_kfp_local(tmp_path, tracking_uri):
    """`llmfab run` through kfp.local (~2 min): the round sub-pipeline runs twice, a ParallelFor + Collected inside
    it, round 2 starting from round 1's average, the step after the block reading round 2's by its URI."""
    path = tmp_path / "flow.yaml"
    path.write_text(KFP_ROUNDS)
    plan = plan_run(str(path), store_uri=str(tmp_path / "store"), tracking_uri=tracking_uri, run_name="rounds")
    recipe = plan.recipe
    result = KfpLocal().run(plan)
    logs = {p.stem for p in Path(result.log_dir).glob("*.log")}  # kfp.local's output: a file per task
    assert "open-run" in logs and len(logs) > len(recipe.steps), logs
    assert list(result.steps) == [name for s in recipe.steps for name, _ in s.runs()]
    assert all(s.status == "FINISHED" for s in result.steps.values())
    store = result.store_uri
    children = {r.info.run_name: r for r in Tracker(tracking_uri).child_runs(result.run_id)}
    assert children["round1/tune/seed-1"].data.tags["llmfab.input.init"] == f"{store}/base/model"
    assert children["round2/tune/seed-0"].data.tags["llmfab.input.init"] == f"{store}/round1/avg/model"
    assert children["round2/avg"].data.tags["llmfab.input.models"] == str(
        [f"{store}/round2/tune/seed-0/model", f"{store}/round2/tune/seed-1/model"]
    )
    assert children["final"].data.tags["llmfab.input.models"] == str(
        [f"{store}/round2/avg/model", f"{store}/base/model"]
    )
