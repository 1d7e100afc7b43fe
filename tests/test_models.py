import pytest
import torch

from llmfab.config.model import ModelConfig, RopeScaling
from llmfab.config.recipe import load_recipe
from llmfab.models import build_hf_config, build_model, count_parameters, load_model, load_tokenizer, save_model
from llmfab.models.checkpoints import resolve_ref
from llmfab.tokenizer import EOS, IM_END, IM_START, PAD, special_token_ids, train_bpe_tokenizer

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "llama", "afm"])
def test_build_and_forward(arch):
    model = build_model(ModelConfig(arch=arch, **TINY), seed=1)
    ids = torch.randint(0, 512, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, 512)
    assert torch.isfinite(out.loss)
    again = build_model(ModelConfig(arch=arch, **TINY), seed=1)
    assert torch.equal(next(model.parameters()), next(again.parameters())), "seeded init"


def test_arch_specifics():
    gemma = build_hf_config(
        ModelConfig(arch="gemma2", head_dim=32, sliding_window=64, final_logit_softcapping=30.0, **TINY)
    )
    assert gemma.model_type == "gemma2" and gemma.sliding_window == 64 and gemma.head_dim == 32
    afm = build_hf_config(ModelConfig(arch="afm", **TINY))
    assert afm.model_type == "llama" and afm.tie_word_embeddings
    yarn = build_hf_config(
        ModelConfig(
            arch="qwen2",
            rope_theta=1e6,
            rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=128),
            **TINY,
        )
    )
    assert yarn.rope_parameters["rope_type"] == "yarn" and yarn.rope_parameters["rope_theta"] == 1e6


# Published parameter counts of the real models these presets reproduce.
@pytest.mark.parametrize(
    "family,preset,expected",
    [
        ("qwen2", "qwen2-0.5b-replica", 494e6),
        ("gemma2", "gemma2-2b-replica", 2.61e9),
        ("llama31", "llama31-8b-replica", 8.03e9),
        ("afm", "afm-3b-replica", 2.73e9),  # 2.58B non-embedding + 0.15B embedding (AFM paper, table 1)
    ],
)
def test_real_size_presets_have_real_shapes(family, preset, expected):
    cfg = load_recipe(family, preset).models["policy"]
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_hf_config(cfg))
    assert count_parameters(model) == pytest.approx(expected, rel=0.02)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."] * 50
    return train_bpe_tokenizer(texts, vocab_size=400)


def test_tokenizer_special_tokens_and_template(tokenizer):
    for token in (EOS, PAD, IM_START, IM_END):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    text = "The quick brown fox"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    out = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "yo<|im_end|>"
    ids = special_token_ids(tokenizer)
    assert ids["pad_token_id"] != ids["eos_token_id"]


def test_save_load_roundtrip_local_and_s3(tokenizer, store):
    cfg = ModelConfig(arch="qwen2", **{**TINY, "vocab_size": len(tokenizer)})
    model = build_model(cfg, **special_token_ids(tokenizer)).eval()
    uri = save_model(model, tokenizer, store.sub("m"), meta={"stage": "test"})
    loaded = load_model(uri).eval()
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits)
    tok = load_tokenizer(uri)
    assert tok.chat_template == tokenizer.chat_template
    assert loaded.config.pad_token_id == tokenizer.pad_token_id


def test_hub_ids_pass_through(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the constant it already read.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_ref("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"
    assert resolve_ref(tmp_path) == str(tmp_path)
    # Offline (as in tests and air-gapped clusters) a hub id fails with transformers' own error.
    with pytest.raises(OSError):
        load_model("llmfab-test/does-not-exist")


def test_a_model_is_saved_in_the_dtype_its_checkpoint_came_in(tmp_path):
    """A bf16 checkpoint (as every released one is) trained with fp32 master weights goes out in bf16, the tied LM
    head once; an fp32 checkpoint stays fp32; dtype="float32" keeps full precision for a state a rerun resumes from."""
    import json

    from safetensors import safe_open

    from llmfab.storage import open_store

    def saved(uri: str) -> tuple[str, set, torch.dtype]:
        folder = resolve_ref(uri)
        with safe_open(f"{folder}/model.safetensors", "pt") as f:
            keys = set(f.keys())
            dtype = f.get_tensor("model.embed_tokens.weight").dtype
        return json.load(open(f"{folder}/config.json"))["dtype"], keys, dtype

    store, ids = open_store(tmp_path), {"pad_token_id": 0, "eos_token_id": 1}
    released = build_model(ModelConfig(arch="qwen2", tie_word_embeddings=True, dtype="bfloat16", **TINY), seed=1, **ids)
    hub = save_model(released, None, store.sub("hub"))
    assert saved(hub)[0] == "bfloat16"
    model = load_model(hub)  # fp32 master weights for training
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        model.model.norm.weight.add_(1e-3)  # "trained"
    dtype, keys, weights = saved(save_model(model, None, store.sub("out")))
    assert (dtype, weights) == ("bfloat16", torch.bfloat16) and "lm_head.weight" not in keys
    reloaded = load_model(store.sub("out").uri)
    assert torch.allclose(reloaded.model.norm.weight, model.model.norm.weight.to(torch.bfloat16).float())
    assert saved(save_model(model, None, store.sub("resume"), dtype="float32"))[:3:2] == ("float32", torch.float32)
    fp32 = build_model(ModelConfig(arch="qwen2", **TINY), seed=1, **ids)
    tiny = load_model(save_model(fp32, None, store.sub("tiny")))
    assert saved(save_model(tiny, None, store.sub("tiny-out")))[:3:2] == ("float32", torch.float32)
