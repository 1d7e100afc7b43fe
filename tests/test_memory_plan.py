"""Memory features (gradient checkpointing, dtype loading) and `llmfab plan`'s estimates against measured bytes."""

import pytest
import torch
from typer.testing import CliRunner

from llmfab.cli import app
from llmfab.config.model import ModelConfig
from llmfab.memory_plan import GB, plan_step, shape_from_config
from llmfab.models.architectures import build_model
from llmfab.storage import open_store
from llmfab.train.config import TrainConfig
from llmfab.train.trainer import Trainer

# Not too tiny: activations are most of the bytes, as in a real run.
MEASURED = dict(arch="llama", vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                intermediate_size=688, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
BATCH, SEQ = 8, 256


def _lm_loss(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False)
    return out.loss, {}


def _batch(vocab: int, batch: int = BATCH, seq: int = SEQ) -> dict:
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))}


def _saved_bytes(model, batch) -> tuple[torch.Tensor, int]:
    """The loss and the bytes autograd keeps for the backward (distinct storages, parameters excluded): a
    deterministic measure of activation memory."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = _lm_loss(model, batch)
    return loss, sum(seen.values())


def _trainer(model, tmp_path, **train):
    from llmfab.stages.base import StageContext

    ctx = StageContext("mem", open_store(tmp_path), show_progress=False)
    return Trainer(model, TrainConfig(max_steps=1, **train), ctx, _lm_loss)


def test_gradient_checkpointing_same_loss_and_grads_fewer_saved_bytes(tmp_path):
    cfg = ModelConfig(**{**MEASURED, "num_layers": 2})
    batch = _batch(cfg.vocab_size, 4, 64)
    results = {}
    for on in (False, True):
        model = build_model(cfg, seed=0)
        trainer = _trainer(model, tmp_path / str(on), gradient_checkpointing=on)
        assert model.is_gradient_checkpointing is on
        assert model.config.use_cache is not on  # off while training with checkpointing
        model.train()
        loss, saved = _saved_bytes(model, batch)
        loss.backward()
        results[on] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved)
        trainer.fit(lambda step, micro: batch)
        assert model.config.use_cache is True  # what the saved model asks for at inference
    (loss_off, grads_off, saved_off), (loss_on, grads_on, saved_on) = results[False], results[True]
    assert loss_on == pytest.approx(loss_off, abs=1e-5)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    assert saved_on < saved_off / 2, (saved_on, saved_off)


def test_plan_total_within_25_percent_of_measured_step():
    """One fp32 training step of a 4-layer, 256-wide model (8 x 256 tokens): parameters, gradients and AdamW
    states counted exactly after an optimizer step, plus the bytes autograd saved for the backward."""
    cfg = ModelConfig(**MEASURED)
    model = build_model(cfg, seed=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, saved = _saved_bytes(model, _batch(cfg.vocab_size))
    loss.backward()
    optimizer.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    params = list(model.parameters())
    weights, grads = nbytes(params), nbytes(p.grad for p in params)
    states = nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    measured = weights + grads + states + saved

    from llmfab.stages.sft import SFTConfig

    step_config = SFTConfig(max_len=SEQ, train={"batch_size": BATCH})
    plan = plan_step("sft", "sft", step_config, shape_from_config(cfg), [], gpus=1, gpu_memory_gb=80)
    est = plan.layouts["ddp"]
    assert plan.params == sum(p.numel() for p in params)
    assert est.weights == weights and est.grads == grads and est.optimizer == states
    print(f"measured {measured / GB:.4f} GB (saved activations {saved / GB:.4f}); plan {est.total / GB:.4f} GB "
          f"(activations {est.activations / GB:.4f})")  # fmt: skip
    assert est.total == pytest.approx(measured, rel=0.25)


runner = CliRunner()


def test_plan_llama31_8b_fits_eight_gpus():
    result = runner.invoke(app, ["plan", "llama31", "--preset", "llama31-8b", "--gpus", "8", "--gpu-memory", "80"])
    assert result.exit_code == 0, result.output
    assert "round2/dpo" in result.output and "zero3" in result.output


def test_plan_llama31_8b_one_gpu_names_steps():
    result = runner.invoke(app, ["plan", "llama31", "--preset", "llama31-8b", "--gpus", "1", "--gpu-memory", "80"])
    assert result.exit_code == 1, result.output
    assert "does not fit 1 x 80 GB" in result.output
    named = result.output.split("does not fit")[1]
    assert "round1/reward" in named and "round2/reward" in named


def test_plan_set_overrides_and_tiny_fits():
    result = runner.invoke(app, ["plan", "qwen2", "--preset", "tiny", "--gpus", "1", "--gpu-memory", "8"])
    assert result.exit_code == 0, result.output
    args = ["plan", "llama31", "--preset", "llama31-8b", "--gpus", "8", "--set", "sft.max_len=131072"]
    result = runner.invoke(app, [*args, "--set", "sft.train.gradient_checkpointing=false"])
    assert result.exit_code == 1 and "sft (" in result.output


def test_hub_shapes_match_published_sizes():
    from llmfab.memory_plan import HUB_SHAPES

    sizes = {k: s.params() / 1e9 for k, s in HUB_SHAPES.items()}
    assert sizes["meta-llama/Llama-3.1-8B"] == pytest.approx(8.03, abs=0.01)
    assert sizes["Qwen/Qwen2-0.5B"] == pytest.approx(0.494, abs=0.001)
    assert sizes["Qwen/Qwen2.5-3B"] == pytest.approx(3.09, abs=0.01)
    assert sizes["google/gemma-2-2b"] == pytest.approx(2.61, abs=0.01)
    assert sizes["google/gemma-2-9b"] == pytest.approx(9.24, abs=0.01)


def test_plan_reports_the_configured_layout_and_shards_frozen_models_under_zero3():
    """The plan is of the layout the step configures (not the cheapest that would fit), and ZeRO-3 partitions the
    frozen reference and reward model as it does the policy (WARP's EMA anchor, updated every rollout, stays whole)."""
    from llmfab.stages.online_dpo import OnlineDPOConfig

    shape = shape_from_config(ModelConfig(**MEASURED))
    frozen = [("reference", shape, False), ("reward model", shape, True), ("ema anchor", shape, False)]
    whole = sum(s.params(reward=rm) * 4 for _, s, rm in frozen)
    plain = plan_step("x", "online_dpo", OnlineDPOConfig(), shape, frozen, gpus=4, gpu_memory_gb=80)
    assert plain.layout == "ddp" and plain.fits and plain.chosen.frozen == whole
    zero3 = OnlineDPOConfig(train={"deepspeed": {"zero_optimization": {"stage": 3}}})
    plan = plan_step("x", "online_dpo", zero3, shape, frozen, gpus=4, gpu_memory_gb=80)
    anchor = shape.params() * 4
    assert plan.layout == "zero3" and plan.chosen.frozen == pytest.approx(anchor + (whole - anchor) / 4)
    assert plan.chosen.optimizer == plain.chosen.optimizer / 4 and plan.chosen.grads == plain.chosen.grads / 4

    # Too small a GPU for the configured layout: it does not fit, and the note names the setting that would.
    # (0.57 GB: DDP needs 0.56 GB, ZeRO-2 0.52, ZeRO-3 0.49; 90 % of it is the budget.)
    tight = plan_step("x", "online_dpo", OnlineDPOConfig(), shape, frozen, gpus=4, gpu_memory_gb=0.57)
    assert not tight.fits and tight.layout == "ddp"
    assert "fits as zero3" in tight.note and "train.deepspeed: {zero_optimization: {stage: 3}}" in tight.note
