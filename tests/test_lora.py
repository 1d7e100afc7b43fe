"""LoRA and QLoRA fine-tuning (train.lora) in the sft, dpo, reward_model, online_dpo and
rejection_sampling stages, on the tiny testbed."""

import math
from pathlib import Path

import pytest
import torch

from conftest import pretrain_tiny
from llmfab.errors import ConfigError
from llmfab.models import load_model
from llmfab.models.checkpoints import resolve_ref
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.train.trainer import FAULT_ENV, InjectedFault

LORA = {"r": 4}
NO_EVAL = {"prompts": 0}


@pytest.fixture(scope="module")
def base(testbed, tmp_path_factory):
    return pretrain_tiny(testbed, tmp_path_factory.mktemp("lora") / "base", 30).outputs["model"]


def _run(stage, cfg, inputs, folder):
    return run_stage(stage, cfg, inputs, store=open_store(folder), track=False, show_progress=False)


def _record_loads(monkeypatch, *modules) -> list[str]:
    """The refs every load_model call of `modules` loads (the calls still load)."""
    loaded = []
    for module in modules:
        real = module.load_model

        def recording(ref, *args, _real=real, **kwargs):
            loaded.append(str(ref))
            return _real(ref, *args, **kwargs)

        monkeypatch.setattr(module, "load_model", recording)
    return loaded


def test_lora_settings_turn_on_with_one_field():
    """`--set lora.r=8`: LoRA on, the rest defaulted (alpha 2r, dropout 0.05, every linear layer), merged output."""
    from llmfab.config.base import apply_overrides
    from llmfab.stages.sft import SFTConfig

    assert SFTConfig().lora is None  # full fine-tuning by default
    lora = SFTConfig.model_validate(apply_overrides({}, ["lora.r=8"])).lora
    peft = lora.peft_config()
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, peft.target_modules) == (8, 16, 0.05, "all-linear")
    assert lora.save == "merged" and lora.quantize is None
    from llmfab.stages.base import get_stage

    with pytest.raises(ConfigError, match=r"lora: .*save=adapter: a reward model is saved merged"):
        get_stage("reward_model").make_config({"lora": {"save": "adapter"}})


def test_lora_dpo_starts_at_the_full_dpo_loss_with_the_base_as_reference(testbed, base, tmp_path, monkeypatch):
    """B starts at zero: the LoRA policy is the base, and so is its reference (the adapter off), so step 0's
    loss is log 2 as full DPO's is; the base loads once (no reference copy)."""
    import llmfab.stages.dpo as dpo_stage
    import llmfab.train.lora as lora_module

    cfg = {"train": {"max_steps": 1, "batch_size": 4}, "eval": NO_EVAL}
    inputs = {"model": base, "data": testbed["preferences"]}
    full = _run("dpo", cfg, inputs, tmp_path / "full").metrics["train_loss"]
    loaded = _record_loads(monkeypatch, dpo_stage, lora_module)
    lora = _run("dpo", {**cfg, "lora": LORA}, inputs, tmp_path / "lora").metrics["train_loss"]
    assert lora == pytest.approx(full, abs=1e-6) and lora == pytest.approx(math.log(2), abs=1e-6)
    assert loaded == [base]
    with pytest.raises(ConfigError, match="online_merging does not run with lora"):
        _run("dpo", {**cfg, "lora": LORA, "optimizer": "online_merging"}, {**inputs, "base": base}, tmp_path / "omo")


def test_lora_sft_trains_adapters_only_and_saves_merged_or_adapter(testbed, base, tmp_path):
    """Merged: a plain transformers checkpoint (no peft needed) that differs from the base. Adapter: the base as
    it was beside the trained adapter, which load_model merges into the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = {"train": {"max_steps": 4, "batch_size": 4, "optim": {"lr": 1e-2}}, "eval": NO_EVAL, "lora": LORA}
    inputs = {"model": base, "data": testbed["sft"]}
    merged_ref = _run("sft", cfg, inputs, tmp_path / "merged").outputs["model"]
    adapter_ref = _run("sft", {**cfg, "lora": {**LORA, "save": "adapter"}}, inputs, tmp_path / "adapter").outputs[
        "model"
    ]

    folder = Path(resolve_ref(merged_ref))
    assert not (folder / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(folder)
    base_state = load_model(base).state_dict()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base_state[k])}
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert not any("embed" in k or "norm" in k or "lm_head" in k for k in changed)  # only where adapters sit

    assert (Path(resolve_ref(adapter_ref)) / "adapter_model.safetensors").is_file()
    attached = load_model(adapter_ref, merge_adapter=False)
    assert isinstance(attached, PeftModel)
    trained_b = 0
    for name, tensor in attached.state_dict().items():
        if "lora_B" in name:
            trained_b += int(tensor.abs().sum() > 0)
        elif "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(tensor, base_state[key]), f"{key}: the base must stay frozen"
    assert trained_b == 14  # 7 linears x 2 layers
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(adapter_ref)(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
    # A later stage starts from the adapter checkpoint (merged on load) and saves a whole model.
    again = _run(
        "sft",
        {**cfg, "lora": None, "train": {"max_steps": 1, "batch_size": 4}},
        {**inputs, "model": adapter_ref},
        tmp_path / "again",
    )
    assert AutoModelForCausalLM.from_pretrained(resolve_ref(again.outputs["model"])).config.vocab_size == 512


def test_lora_sft_resumes_exactly(testbed, base, tmp_path, monkeypatch):
    cfg = {
        "train": {"max_steps": 6, "batch_size": 4, "checkpoint_every": 2, "optim": {"lr": 1e-2}},
        "eval": NO_EVAL,
        "lora": LORA,
    }
    inputs = {"model": base, "data": testbed["sft"]}
    full = _run("sft", cfg, inputs, tmp_path / "full")
    monkeypatch.setenv(FAULT_ENV, "5")
    with pytest.raises(InjectedFault):
        _run("sft", cfg, inputs, tmp_path / "resumed")
    monkeypatch.delenv(FAULT_ENV)
    resumed = _run("sft", cfg, inputs, tmp_path / "resumed")
    assert resumed.metrics["resumed_from_step"] == 4
    a, b = load_model(full.outputs["model"]).state_dict(), load_model(resumed.outputs["model"]).state_dict()
    assert any(not torch.equal(a[k], v) for k, v in load_model(base).state_dict().items())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_reward_model_lora_trains_its_score_head(testbed, base, tmp_path):
    cfg = {"eval_pairs": 8, "train": {"max_steps": 3, "batch_size": 8, "optim": {"lr": 1e-2}}, "lora": LORA}
    out = _run("reward_model", cfg, {"init": base, "data": testbed["preferences"]}, tmp_path).outputs["model"]
    assert not (Path(resolve_ref(out)) / "adapter_config.json").exists()
    trained = load_model(out, kind="reward").state_dict()
    torch.manual_seed(0)  # the stage's seed: the head it started from
    init = load_model(base, kind="reward").state_dict()
    assert not torch.equal(trained["score.weight"], init["score.weight"])
    assert not torch.equal(
        trained["model.layers.0.self_attn.q_proj.weight"], init["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(trained["model.embed_tokens.weight"], init["model.embed_tokens.weight"])


def test_online_dpo_lora_loads_the_policy_once(testbed, base, tmp_path, monkeypatch):
    """The reference is the policy with its adapter off: the `model` input loads once, not twice."""
    import llmfab.train.lora as lora_module
    import llmfab.train.rl_setup as rl_setup
    from llmfab.train.lora import AdapterOff

    references = []
    real_setup = rl_setup.load_rl_setup

    def setup_recording(*args, **kwargs):
        rl = real_setup(*args, **kwargs)
        references.append(rl.reference)
        return rl

    import llmfab.stages.online_dpo as odpo_stage

    monkeypatch.setattr(odpo_stage, "load_rl_setup", setup_recording)
    loaded = _record_loads(monkeypatch, rl_setup, lora_module)
    cfg = {
        "episodes": 1,
        "prompts_per_episode": 8,
        "samples_per_prompt": 3,
        "max_new_tokens": 8,
        "keep_truncated": True,
        "train": {"max_steps": 2, "batch_size": 4},
        "eval": NO_EVAL,
        "lora": LORA,
    }
    inputs = {"model": base, "reward_model": base, "prompts": testbed["prompts"]}
    res = _run("online_dpo", cfg, inputs, tmp_path)
    assert loaded == [base] and isinstance(references[0], AdapterOff)
    assert sum(p.numel() for p in references[0].parameters()) == 0
    assert res.metrics["episode_pairs"] > 0
    assert not (Path(resolve_ref(res.outputs["model"])) / "adapter_config.json").exists()


def test_rejection_sampling_fine_tunes_the_kept_answers_with_lora(testbed, base, tmp_path):
    cfg = {
        "samples_per_model": 2,
        "max_new_tokens": 4,
        "keep_truncated": True,
        "max_prompts": 8,
        "sft": {"train": {"max_steps": 2, "batch_size": 4}, "eval": NO_EVAL, "lora": {**LORA, "save": "adapter"}},
    }
    out = _run(
        "rejection_sampling", cfg, {"model": base, "reward_model": base, "prompts": testbed["prompts"]}, tmp_path
    )
    assert (Path(resolve_ref(out.outputs["model"])) / "adapter_model.safetensors").is_file()


def test_qlora_without_a_cuda_gpu_or_bitsandbytes_is_a_config_error(testbed, base, tmp_path):
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("a CUDA GPU and bitsandbytes are here: QLoRA runs")
    cfg = {"train": {"max_steps": 1, "batch_size": 4}, "eval": NO_EVAL, "lora": {**LORA, "quantize": "4bit"}}
    with pytest.raises(ConfigError, match=r"lora.quantize=4bit: QLoRA needs (a CUDA GPU|bitsandbytes)"):
        _run("sft", cfg, {"model": base, "data": testbed["sft"]}, tmp_path)
