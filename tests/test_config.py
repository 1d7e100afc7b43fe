import pytest

from llmfab.config.base import apply_overrides, validate
from llmfab.config.model import ModelConfig
from llmfab.config.recipe import list_families, load_recipe
from llmfab.errors import ConfigError

FAMILIES = ["afm", "gemma2", "llama31", "qwen2"]


def test_families():
    assert list_families() == FAMILIES


def test_model_config_errors_name_field():
    with pytest.raises(ConfigError, match=r"model: hidden_size: Input should be greater than 0"):
        validate(ModelConfig, {"hidden_size": 0}, "model")
    with pytest.raises(ConfigError, match=r"model: hiden_size: Extra inputs are not permitted"):
        validate(ModelConfig, {"hiden_size": 64}, "model")
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        validate(ModelConfig, {"num_heads": 4, "num_kv_heads": 3}, "model")


def test_overrides_keep_types():
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "a.b=3", "d=true"]) == {
        "a": {"b": 3, "c": [1, 2]},
        "d": True,
    }
    with pytest.raises(ConfigError, match=r"KEY\.PATH=VALUE"):
        apply_overrides({}, ["nonsense"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_loads(family):
    import yaml

    from llmfab.config.recipe import recipe_path

    presets = yaml.safe_load(recipe_path(family).read_text())["presets"]
    assert "tiny" in presets and len(presets) >= 2, "a tiny preset and a real-size one"
    for preset in presets:
        recipe = load_recipe(family, preset)
        assert recipe.steps and (recipe.models or recipe.given)  # a post-training preset's models are the hub's


def test_recipe_overrides_and_errors(tmp_path):
    recipe = load_recipe("qwen2", "tiny", ["tokenizer.vocab_size=4096", "models.policy.num_layers=2"])
    assert recipe.step("tokenizer").config.vocab_size == 4096
    assert recipe.models["policy"].num_layers == 2
    with pytest.raises(ConfigError, match=r"qwen2\.yaml: presets\.tiny\.config\.tokenizer\.vocab_size"):
        load_recipe("qwen2", "tiny", ["tokenizer.vocab_size=-1"])
    with pytest.raises(ConfigError, match=r"no preset 'huge'; available: tiny, qwen2-0\.5b-replica, qwen2-0\.5b$"):
        load_recipe("qwen2", "huge")
    with pytest.raises(ConfigError, match="is neither 'models'"):
        load_recipe("qwen2", "tiny", ["pretrian.lr=1"])
    with pytest.raises(ConfigError, match="unknown family 'mistral'"):
        load_recipe("mistral")


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_recipe_file_errors(tmp_path):
    bad_ref = """
family: x
steps:
  - {id: tok, stage: train_tokenizer, inputs: {corpus: data.text}}
presets: {tiny: {}}
"""
    with pytest.raises(ConfigError, match=r"steps\[0\] \(tok\): input corpus='data.text': no earlier step 'data'"):
        load_recipe(_write(tmp_path, bad_ref))
    bad_output = bad_ref.replace("steps:\n", "steps:\n  - {id: data, stage: prepare_data}\n").replace(
        "data.text", "data.txt"
    )
    with pytest.raises(ConfigError, match="has outputs text, sft, prompts, preferences"):
        load_recipe(_write(tmp_path, bad_output))
    missing_input = "family: x\nsteps:\n  - {id: tok, stage: train_tokenizer}\npresets: {tiny: {}}\n"
    with pytest.raises(ConfigError, match="missing input"):
        load_recipe(_write(tmp_path, missing_input))
    unknown_stage = "family: x\nsteps:\n  - {id: a, stage: warp_drive}\npresets: {tiny: {}}\n"
    with pytest.raises(ConfigError, match="unknown stage 'warp_drive'"):
        load_recipe(_write(tmp_path, unknown_stage))
    bad_yaml = "family: x\nsteps:\n  - {id: a, stage: prepare_data\npresets: {}\n"
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(_write(tmp_path, bad_yaml))
    bad_model = (
        "family: x\nsteps:\n  - {id: data, stage: prepare_data}\n"
        "presets: {tiny: {models: {policy: {num_layers: zero}}}}\n"
    )
    with pytest.raises(ConfigError, match=r"presets\.tiny\.models\.policy\.num_layers"):
        load_recipe(_write(tmp_path, bad_model))
    unknown_step = "family: x\nsteps:\n  - {id: data, stage: prepare_data}\npresets: {tiny: {config: {dta: {}}}}\n"
    with pytest.raises(ConfigError, match=r"presets\.tiny\.config\.dta: no step with that id"):
        load_recipe(_write(tmp_path, unknown_step))
