"""Recipe control flow: `parallel` steps (KFP ParallelFor + Collected) and `when` conditions (KFP If) on a stage's
values, validated at load time and run the same way in process."""

import pytest

from llmfab.config.recipe import load_recipe, run_name_of, variant_name
from llmfab.errors import ConfigError
from llmfab.recipe_runner import run_recipe
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
    result = run_recipe(recipe, store_uri=str(tmp_path / "store"), tracking_uri=tracking_uri, show_progress=False)
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
