"""Bring your own model and data: hub URIs as recipe inputs, post-training presets that start from released
checkpoints, and the hub token and cache on a cluster."""

import pytest
import yaml

from llmfab.config.recipe import load_recipe
from llmfab.errors import ConfigError
from llmfab.kubeflow.pipelines import compile_pipeline

POST_TRAINING = {
    "qwen2": ("qwen2-0.5b", "long_context.model", "hf://Qwen/Qwen2-0.5B"),
    "llama31": ("llama31-8b", "anneal.model", "hf://meta-llama/Llama-3.1-8B"),
    "gemma2": ("gemma2-2b", "student.model", "hf://google/gemma-2-2b"),
    "afm": ("afm-3b", "context.model", "hf://Qwen/Qwen2.5-3B"),
}
PRETRAINING = {"data", "tokenizer", "generator", "synthetic", "pretrain", "core", "student", "continued", "teacher",
               "long_qa", "long_context", "context", "anneal"}  # fmt: skip


@pytest.mark.parametrize("family", sorted(POST_TRAINING))
def test_post_training_presets_start_from_released_checkpoints(family):
    preset, output, uri = POST_TRAINING[family]
    recipe = load_recipe(family, preset)
    assert recipe.given[output] == uri and recipe.plan()["inputs"] == recipe.given
    ids = {s.base_id for s in recipe.steps}
    assert not ids & PRETRAINING - {"teacher"}  # no pretraining: its outputs come from the hub
    assert {"sft", "evaluate", "register", "promote"} <= ids
    reads = {r for s in recipe.steps for refs in s.inputs.values() for r in ([refs] if isinstance(refs, str) else refs)}
    assert uri in reads and "hf://datasets/HuggingFaceH4/ultrachat_200k" in reads
    assert "hf://datasets/trl-lib/ultrafeedback_binarized" in reads
    assert recipe.step("sft").config.train.precision == "bf16"
    # the from-scratch replica keeps its name's promise: pretraining included
    replica = load_recipe(family, f"{preset}-replica")
    assert not replica.given and {"data", "tokenizer"} <= {s.id for s in replica.steps}


def test_gemma2_student_distils_from_the_released_9b():
    recipe = load_recipe("gemma2", "gemma2-2b")
    assert recipe.step("teacher_sft").inputs["model"] == "hf://google/gemma-2-9b"
    assert recipe.step("sft").inputs["teacher"] == "teacher_sft.model"
    assert recipe.step("sft").config.distill == "logits"


HEAD = "family: byo\nsteps:\n"
TAIL = "presets: {tiny: {config: {sft: {max_len: 64}}}}\n"


def _recipe(tmp_path, model: str):
    path = tmp_path / "byo.yaml"
    path.write_text(
        HEAD + f"  - {{id: sft, stage: sft, inputs: {{model: '{model}', data: 'hf://datasets/HuggingFaceH4/"
        "ultrachat_200k@main'}}\n" + TAIL
    )
    return path


def test_hub_uris_are_recipe_inputs_and_pipeline_importers(tmp_path):
    path = _recipe(tmp_path, "hf://Qwen/Qwen2-0.5B@main")
    step = load_recipe(path).step("sft")
    assert step.inputs == {
        "model": "hf://Qwen/Qwen2-0.5B@main",
        "data": "hf://datasets/HuggingFaceH4/ultrachat_200k@main",
    }
    spec = next(yaml.safe_load_all(compile_pipeline(str(path), tmp_path / "byo-ir.yaml").read_text()))
    importers = [e["importer"] for e in spec["deploymentSpec"]["executors"].values() if "importer" in e]
    assert sorted(i["artifactUri"]["constant"] for i in importers) == [
        "hf://Qwen/Qwen2-0.5B@main",
        "hf://datasets/HuggingFaceH4/ultrachat_200k@main",
    ]
    assert all(i["metadata"]["store_uri"] == i["artifactUri"]["constant"] for i in importers)


@pytest.mark.parametrize(
    "model, message",
    [
        ("Qwen/Qwen2-0.5B", r"expected STEP\.OUTPUT .* or a URI .*; a hub repo is written hf://Qwen/Qwen2-0\.5B"),
        ("pretrain.model", r"input model='pretrain\.model': no earlier step 'pretrain'"),
        ("hf://Qwen/Qwen2-0.5B@", r"expected hf://ORG/NAME or hf://ORG/NAME@REVISION"),
        ("gs://bucket/model", r"unsupported URI scheme"),
    ],
)
def test_input_errors_say_what_an_input_may_be(tmp_path, model, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_recipe(tmp_path, model))


def test_inputs_override_takes_a_recipe_output_from_outside():
    base = ["inputs.long_context.model=hf://Qwen/Qwen2-0.5B"]
    recipe = load_recipe("qwen2", "tiny", base)
    assert [s.id for s in recipe.steps][:2] == ["data", "sft"]  # data still makes the SFT data; no pretraining
    assert recipe.step("sft").inputs["model"] == recipe.step("online_dpo").inputs["base"] == "hf://Qwen/Qwen2-0.5B"
    data = [f"inputs.data.{o}=hf://datasets/org/{o}" for o in ("text", "sft", "preferences", "prompts")]
    assert load_recipe("qwen2", "tiny", base + data).steps[0].id == "sft"
    rounds = load_recipe("llama31", "tiny", ["inputs.anneal.model=hf://meta-llama/Llama-3.1-8B"])
    assert rounds.step("round2/reward").inputs["init"] == "hf://meta-llama/Llama-3.1-8B"
    for override, message in [
        ("inputs.nope.model=hf://a/b", r"presets\.tiny\.inputs\.nope\.model: expected STEP\.OUTPUT of a recipe step"),
        ("inputs.sft.weights=hf://a/b", r"step 'sft' has outputs model"),
        ("inputs.sft.model=Qwen/Qwen2-0.5B", r"inputs\.sft\.model: expected a URI"),
        ("inputs.sft=hf://a/b", r"expected inputs\.STEP\.OUTPUT=URI"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_recipe("qwen2", "tiny", [override])
    with pytest.raises(ConfigError, match="step 'dpo' runs in rounds 'round'"):
        load_recipe("llama31", "tiny", ["inputs.dpo.model=hf://a/b"])


def test_step_tasks_get_the_hub_token_by_reference_and_the_shared_cache(tmp_path):
    path = compile_pipeline("qwen2", tmp_path / "qwen2.yaml")
    _, platform = yaml.safe_load_all(path.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    sft = executors["exec-sft"]
    token = [s for s in sft["secretAsEnv"] if s.get("secretName", s.get("secretNameParameter")) == "llmfab-hf-token"]
    assert token and token[0]["keyToEnv"] == [{"envVar": "HF_TOKEN", "secretKey": "token"}] and token[0]["optional"]
    assert [(m["mountPath"], m.get("constant") or m.get("pvcName")) for m in sft["pvcMount"]] == [
        ("/var/cache/llmfab/hf", "llmfab-hf-cache")
    ]
    assert "pvcMount" not in executors["exec-open-run"]  # tracking tasks read no hub repo
    assert "hf_" not in path.read_text().replace("hf_token", "")  # no token value anywhere
