"""AFM on-device compression: palettization (k-means LUTs, bit packing, bits-per-weight accounting,
checkpoints that load_model dequantizes) and the compress / recover stages on the tiny testbed."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import pretrain_tiny
from llmfab.config.base import validate
from llmfab.errors import ConfigError
from llmfab.models import load_model, save_model
from llmfab.models.checkpoints import resolve_ref
from llmfab.models.palettize import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    PalettizeConfig,
    dequantize,
    pack_bits,
    palettize_model,
    palettize_tensor,
    save_palettized,
    unpack_bits,
    weights_bytes,
)
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.train.trainer import FAULT_ENV, InjectedFault

QUICK_EVAL = {"prompts": 8, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Llama with tied embeddings, no tokenizer needed (a fresh model per call)."""
    from llmfab.config.model import ModelConfig
    from llmfab.models.architectures import build_model

    cfg = ModelConfig(
        arch="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=176, max_position_embeddings=64,
    )  # fmt: skip
    return lambda: build_model(cfg, seed=0)


@pytest.mark.parametrize(("bits", "axis", "rows"), [(2, "rows", 48), (4, "rows", 40), (3, "columns", 64)])
def test_few_distinct_values_per_group_round_trip_exactly(bits, axis, rows):
    """A matrix whose every LUT group holds at most 2^bits (fp16-representable) values comes back
    bit for bit, including a short last group (40 rows in groups of 16)."""
    gen = torch.Generator().manual_seed(bits)
    k, group = 2**bits, 16
    other = 24
    values = torch.randn(-(-rows // group), k, generator=gen).half().float()
    shape = (rows, other) if axis == "rows" else (other, rows)
    w = torch.empty(shape)
    for r in range(rows):
        picks = values[r // group][torch.randint(0, k, (other,), generator=gen)]
        if axis == "rows":
            w[r] = picks
        else:
            w[:, r] = picks
    p = palettize_tensor(w, bits, group, axis)
    assert p.lut.shape == (-(-rows // group), k)
    assert torch.equal(dequantize(p), w)


def test_error_shrinks_with_bits():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    errors = [float(((dequantize(palettize_tensor(w, b, 16)) - w) ** 2).mean() / (w**2).mean()) for b in range(1, 7)]
    assert all(a > b for a, b in itertools.pairwise(errors))
    # Lloyd-Max optimum for a Gaussian at 1 and 2 bits is 1 - 2/pi ~ 0.363 and ~0.118: k-means reaches it.
    assert errors[0] == pytest.approx(1 - 2 / math.pi, abs=0.02)
    assert errors[1] == pytest.approx(0.118, abs=0.01)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trips(bits):
    idx = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), idx)


def test_bits_per_weight_counts_indices_and_luts(tiny):
    model = tiny()
    cfg = PalettizeConfig(bits=4, group_size=16, overrides={"mlp": 2}, embedding_bits=None)
    pal = palettize_model(model, cfg)
    layers = {n: model.get_parameter(n) for n in pal.palettized}
    assert sum("mlp" in n for n in layers) == 6 and sum("self_attn" in n for n in layers) == 8
    assert "model.embed_tokens.weight" in pal.floats  # embedding_bits=None keeps it float
    expected_bits = 0
    for name, w in layers.items():
        b = 2 if "mlp" in name else 4
        groups = math.ceil(w.shape[0] / 16)
        expected_bits += math.ceil(w.numel() * b / 8) * 8 + groups * 2**b * 16
    n = sum(w.numel() for w in layers.values())
    s = pal.summary()
    assert s["bits_per_weight"] == pytest.approx(expected_bits / n)
    assert 2 < s["bits_per_weight"] < 4
    n_float = sum(t.numel() for t in pal.floats.values())
    assert s["bits_per_weight_model"] == pytest.approx((expected_bits + 16 * n_float) / (n + n_float))
    assert s["palettized_params"] + s["float_params"] == sum(p.numel() for p in model.parameters())


def test_checkpoint_round_trips_through_load_model_and_is_smaller(tiny, tmp_path):
    model = tiny()
    cfg = PalettizeConfig(bits=4, overrides={"mlp": 2}, embedding_bits=4, embedding_group_size=64)
    pal = palettize_model(model, cfg)
    uri = save_palettized(pal, model, None, open_store(tmp_path / "pal"), {"stage": "test"})
    float_uri = save_model(model, None, open_store(tmp_path / "float"))
    folder = Path(resolve_ref(uri))
    assert json.loads((folder / MANIFEST_FILE).read_text())["format"] == "llmfab-palettized/1"
    loaded = load_model(uri)
    state = loaded.state_dict()
    for name, p in pal.palettized.items():
        assert torch.equal(state[name], dequantize(p)), name
    for name, t in pal.floats.items():
        assert torch.equal(state[name], t.float()), name
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    # The loaded model is the dequantized one, and close to the float model.
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p_float, p_pal = model(ids).logits.softmax(-1), loaded(ids).logits.softmax(-1)
    assert (p_float - p_pal).abs().sum(-1).max() < 0.5
    float_bytes, pal_bytes = weights_bytes(resolve_ref(float_uri)), weights_bytes(folder)
    assert pal_bytes == (folder / WEIGHTS_FILE).stat().st_size
    assert pal_bytes < float_bytes / 6  # fp32 -> ~4 bits/weight, minus headers and float norms


def test_bad_config_names_the_field(tiny):
    from llmfab.models.palettize import plan_layers
    from llmfab.stages.compress import CompressConfig

    with pytest.raises(ConfigError, match=r"compress: bits: Input should be less than or equal to 8"):
        validate(CompressConfig, {"bits": 9}, "compress")
    with pytest.raises(ConfigError, match=r"compress: overrides: .*'mlp\(' is not a regular expression"):
        validate(CompressConfig, {"overrides": {"mlp(": 2}}, "compress")
    with pytest.raises(ConfigError, match=r"compress: overrides: .*'mlp': bits must be 1-8"):
        validate(CompressConfig, {"overrides": {"mlp": 0}}, "compress")
    with pytest.raises(ConfigError, match=r"compress: group_size: Input should be greater than 0"):
        validate(CompressConfig, {"group_size": 0}, "compress")
    with pytest.raises(ConfigError, match=r"overrides\.mpl: matches no linear layer; layers: .*mlp\.up_proj"):
        plan_layers(tiny(), PalettizeConfig(overrides={"mpl": 2}))
    with pytest.raises(ConfigError, match="nothing to palettize"):
        plan_layers(tiny(), PalettizeConfig(overrides={".": None}, embedding_bits=None))


# -- the stages on the tiny testbed ----------------------------------------------------------------

COMPRESS = {"bits": 4, "overrides": {"mlp": 2}, "embedding_bits": 4, "embedding_group_size": 64}
RECOVER = {
    "max_examples": 64,
    "train": {"max_steps": 6, "batch_size": 4, "checkpoint_every": 2, "optim": {"lr": 2e-3, "warmup_steps": 1}},
    "eval": QUICK_EVAL,
}


def _run(stage, cfg, inputs, folder):
    return run_stage(stage, cfg, inputs, store=open_store(folder), track=False, show_progress=False)


@pytest.fixture(scope="module")
def compressed(testbed, tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    base = pretrain_tiny(testbed, root / "base", 30).outputs["model"]
    inputs = {"model": base, "data": testbed["sft"]}
    return base, _run("compress", {**COMPRESS, "eval": QUICK_EVAL}, inputs, root / "compress")


def test_compress_stage_reports_bits_size_and_quality(compressed):
    base, res = compressed
    m = res.metrics
    assert m["bits_per_weight"] < 4 and m["bits_per_weight_model"] < 4
    assert m["size_bytes"] < m["size_bytes_float"] / 6 and m["compression_ratio"] > 6
    assert {"eval_loss_float", "eval_loss", "gold_reward_float", "gold_reward"} <= set(m)
    # A 30-step model is barely trained, so compression neither helps nor hurts it much (the efficacy
    # measurement uses an SFT model); the loaded palettized model must still be the same network.
    assert abs(m["eval_loss"] - m["eval_loss_float"]) < 0.5
    assert load_model(res.outputs["model"]).config.vocab_size == load_model(base).config.vocab_size


def test_recover_trains_adapters_on_a_frozen_base(testbed, compressed, tmp_path, tracking_uri):
    from peft import PeftModel

    from llmfab.tracking import Tracker

    base, comp = compressed
    inputs = {"model": comp.outputs["model"], "data": testbed["sft"], "float_model": base}
    tracker = Tracker(tracking_uri)
    res = run_stage("recover", RECOVER, inputs, store=open_store(tmp_path), tracker=tracker, show_progress=False)
    m = res.metrics
    for model in ("float", "palettized", "recovered"):
        assert {f"eval_loss_{model}", f"gold_reward_{model}"} <= set(m)
    assert m["eval_loss_recovered"] < m["eval_loss_palettized"]
    assert m["size_bytes_adapter"] > 0
    table = tracker.client.download_artifacts(res.run_id, "compression_comparison.json", str(tmp_path / "art"))
    rows = json.loads(Path(table).read_text())
    assert [r[0] for r in rows["data"]] == ["float", "palettized", "recovered"]
    assert {"eval_loss", "gold_reward", "size_bytes", "disk_bits_per_param"} <= set(rows["columns"])

    # One checkpoint holds both: the palettized base byte for byte, and the adapter.
    pal_folder, rec_folder = (Path(resolve_ref(comp.outputs["model"])), Path(resolve_ref(res.outputs["model"])))
    assert (rec_folder / WEIGHTS_FILE).read_bytes() == (pal_folder / WEIGHTS_FILE).read_bytes()
    assert (rec_folder / "adapter_model.safetensors").is_file()
    attached = load_model(res.outputs["model"], merge_adapter=False)
    assert isinstance(attached, PeftModel)
    dequantized = load_model(comp.outputs["model"]).state_dict()
    lora_b, base_weights = 0, 0
    for name, tensor in attached.state_dict().items():
        if "lora_B" in name:
            lora_b += int(tensor.abs().sum() > 0)  # B starts at zero: non-zero means trained
        elif "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(tensor, dequantized[key]), f"{key} changed: the base must stay frozen"
            base_weights += 1
    assert lora_b == 14 and base_weights == len(dequantized)  # 7 linears x 2 layers
    # load_model's default merges the adapter: the same function as base + adapter.
    merged = load_model(res.outputs["model"])
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, attached(ids).logits, atol=1e-4, rtol=1e-4)


def test_recover_resumes_exactly_and_rejects_bad_inputs(testbed, compressed, tmp_path, monkeypatch):
    base, comp = compressed
    cfg = {**RECOVER, "eval": {"prompts": 0}}
    inputs = {"model": comp.outputs["model"], "data": testbed["sft"]}
    full = _run("recover", cfg, inputs, tmp_path / "full")
    monkeypatch.setenv(FAULT_ENV, "5")
    with pytest.raises(InjectedFault):
        _run("recover", cfg, inputs, tmp_path / "resumed")
    monkeypatch.delenv(FAULT_ENV)
    resumed = _run("recover", cfg, inputs, tmp_path / "resumed")
    assert resumed.metrics["resumed_from_step"] == 4
    assert resumed.metrics["eval_loss_recovered"] == pytest.approx(full.metrics["eval_loss_recovered"], rel=1e-5)

    with pytest.raises(ConfigError, match=r"recover: input `model` .* is not a palettized checkpoint"):
        _run("recover", cfg, {"model": base, "data": testbed["sft"]}, tmp_path / "bad1")
    with pytest.raises(ConfigError, match="already has an adapter"):
        _run("recover", cfg, {"model": full.outputs["model"], "data": testbed["sft"]}, tmp_path / "bad2")
    with pytest.raises(ConfigError, match="teacher_weight > 0 needs the `float_model` input"):
        _run("recover", {**cfg, "teacher_weight": 0.5}, inputs, tmp_path / "bad3")


def test_gap_closed_is_a_share_of_a_real_loss():
    from llmfab.stages.recover import gap_closed

    assert gap_closed(1.0, 1.4, 1.1, higher_is_better=False) == pytest.approx(0.75)
    assert gap_closed(0.6, 0.2, 0.5, higher_is_better=True) == pytest.approx(0.75)
    assert gap_closed(1.0, 0.9, 1.0, higher_is_better=False) is None  # palettizing lost nothing
    assert gap_closed(0.5, 0.5, 0.6, higher_is_better=True) is None
