import pytest
import torch

from conftest import TINY_MODEL
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.tracking import Tracker
from llmfab.train.config import TrainConfig
from llmfab.train.trainer import FAULT_ENV, InjectedFault, Trainer, TrainingError


def _config(**train):
    return {
        "model": TINY_MODEL,
        "seq_len": 128,
        "eval_rows": 16,
        "mixture": {"code": 2.0},
        "train": {"max_steps": 12, "batch_size": 4, "log_every": 4, "optim": {"lr": 3e-3, "warmup_steps": 2}, **train},
    }


def test_pretraining_lowers_held_out_loss(testbed, tmp_path):
    cfg = _config(max_steps=60)
    result = run_stage(
        "pretrain",
        cfg,
        {"corpus": testbed["text"], "tokenizer": testbed["tokenizer"]},
        store=open_store(tmp_path / "pt"),
        track=False,
    )
    before, after = result.metrics["eval_loss_before"], result.metrics["eval_loss"]
    assert after < before - 0.8, (before, after)  # 60 steps: ~6.2 -> ~5.2 nats
    # The output is a complete checkpoint that continued pretraining can start from.
    cont = run_stage(
        "pretrain",
        _config(max_steps=2),
        {"corpus": testbed["text"], "tokenizer": testbed["tokenizer"], "init": result.outputs["model"]},
        store=open_store(tmp_path / "cont"),
        track=False,
    )
    assert cont.metrics["eval_loss_before"] == pytest.approx(after, rel=1e-4)


def test_bf16_autocast_trains(testbed, tmp_path):
    res = run_stage(
        "pretrain",
        _config(max_steps=8, precision="bf16"),
        {"corpus": testbed["text"], "tokenizer": testbed["tokenizer"]},
        store=open_store(tmp_path / "bf16"),
        track=False,
    )
    assert res.metrics["eval_loss"] < res.metrics["eval_loss_before"]


def _loss_curve(tracker: Tracker, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in tracker.client.get_metric_history(run_id, "train_loss")}


def _crash_then_resume(cfg, inputs, store, tracker, monkeypatch, crash_after: int):
    """Run until a crash injected after step `crash_after`, then rerun on the same store."""
    monkeypatch.setenv(FAULT_ENV, str(crash_after))
    with pytest.raises(InjectedFault):
        run_stage("pretrain", cfg, inputs, store=store, tracker=tracker)
    monkeypatch.delenv(FAULT_ENV)
    return run_stage("pretrain", cfg, inputs, store=store, tracker=tracker)


def test_resume_reproduces_the_loss_curve(testbed, tmp_path, monkeypatch, tracking_uri):
    inputs = {"corpus": testbed["text"], "tokenizer": testbed["tokenizer"]}
    cfg = _config(max_steps=10, checkpoint_every=3, grad_accum=2)
    tracker = Tracker(tracking_uri)
    full = run_stage("pretrain", cfg, inputs, store=open_store(tmp_path / "full"), tracker=tracker)

    interrupted = open_store(tmp_path / "interrupted")
    resumed = _crash_then_resume(cfg, inputs, interrupted, tracker, monkeypatch, crash_after=7)

    assert resumed.metrics["resumed_from_step"] == 6.0
    full_curve, resumed_curve = _loss_curve(tracker, full.run_id), _loss_curve(tracker, resumed.run_id)
    assert sorted(resumed_curve) == list(range(7, 11))
    for step, loss in resumed_curve.items():
        assert loss == pytest.approx(full_curve[step], rel=1e-6, abs=1e-7), step
    assert resumed.metrics["eval_loss"] == pytest.approx(full.metrics["eval_loss"], rel=1e-6)
    # Only the newest `keep_checkpoints` resumable checkpoints remain.
    names = {k.split("/")[0] for k in interrupted.sub("checkpoints").list()}
    assert names == {"step-00000006", "step-00000009"}


def test_non_finite_loss_stops_with_clear_error(tmp_path):
    from llmfab.stages.base import StageContext

    model = torch.nn.Linear(2, 2)
    ctx = StageContext("nan", open_store(tmp_path), show_progress=False)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        out = m(batch["x"]).sum()
        return (out * float("nan") if len(calls) == 3 else out), {}

    trainer = Trainer(model, TrainConfig(max_steps=5, checkpoint_every=1), ctx, loss_fn)
    trainer.model.save_pretrained = lambda *a, **k: None  # a bare nn.Module has no HF saver
    with pytest.raises(TrainingError, match="step 3: loss is nan"):
        trainer.fit(lambda step, micro: {"x": torch.ones(1, 2)})


def _lm_rows(n_rows: int, targets_per_row: int, seq_len: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random rows whose last `targets_per_row` tokens carry labels (the rest -100, like a prompt)."""
    ids = torch.randint(0, TINY_MODEL["vocab_size"], (n_rows, seq_len), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, : seq_len - targets_per_row] = -100
    return {"input_ids": ids, "position_ids": torch.arange(seq_len).expand(n_rows, -1).clone(), "labels": labels}


def _one_step(tmp_path, name: str, micro_batches: list[dict], loss_fn):
    """One optimizer step over `micro_batches` from a fixed init: (gradients it applied, weights after, metrics)."""
    from llmfab.config.model import ModelConfig
    from llmfab.models.architectures import build_model
    from llmfab.stages.base import StageContext

    model = build_model(ModelConfig(**TINY_MODEL), seed=0)
    config = TrainConfig(
        max_steps=1, grad_accum=len(micro_batches), optim={"lr": 1e-2, "warmup_steps": 0, "max_grad_norm": None}
    )
    ctx = StageContext(name, open_store(tmp_path / name), show_progress=False)
    trainer = Trainer(model, config, ctx, loss_fn)
    grads, step = {}, trainer.optimizer.step

    def record_then_step(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = record_then_step
    trainer.fit(lambda s, micro: micro_batches[micro])
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}, ctx.metrics


def test_accumulated_micro_batches_of_uneven_tokens_step_as_one_batch(tmp_path):
    """Token losses are normalised by the step's target tokens, not averaged per micro-batch: two micro-batches
    of 2 x 14 and 2 x 2 target tokens give the gradient, the update and the logged loss of one batch of both."""
    from llmfab.config.model import ModelConfig
    from llmfab.models.architectures import build_model
    from llmfab.train.lm import lm_loss

    many, few = _lm_rows(2, 14, seed=1), _lm_rows(2, 2, seed=2)
    both = {k: torch.cat([many[k], few[k]]) for k in many}
    acc_grads, acc_weights, acc_metrics = _one_step(tmp_path, "accumulated", [many, few], lm_loss)
    one_grads, one_weights, one_metrics = _one_step(tmp_path, "one", [both], lm_loss)
    for name, grad in one_grads.items():
        torch.testing.assert_close(acc_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
        # Adam's first update is lr·g/(|g| + 1e-8): float noise in gradients near 1e-8 moves it by ~1e-6.
        torch.testing.assert_close(acc_weights[name], one_weights[name], rtol=0, atol=1e-5, msg=name)
    # The logged loss stays the per-token mean: transformers' own loss over the joint batch, at the init.
    expected = build_model(ModelConfig(**TINY_MODEL), seed=0)(**both).loss.item()
    assert acc_metrics["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert one_metrics["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_wrapped_optimizer_under_deepspeed_is_refused(tmp_path):
    from llmfab.stages.base import StageContext

    ctx = StageContext("omo", open_store(tmp_path), show_progress=False)
    config = TrainConfig(deepspeed={"zero_optimization": {"stage": 2}})
    with pytest.raises(TrainingError, match="cannot run under deepspeed"):
        Trainer(torch.nn.Linear(2, 2), config, ctx, lambda m, b: (m(b).sum(), {}), wrap_optimizer=lambda opt: opt)


@pytest.mark.slow
def test_deepspeed_zero2_matches_plain_torch_and_resumes(testbed, tmp_path, monkeypatch, tracking_uri):
    """ZeRO-2 through DeepSpeed (single CPU process, gloo) follows the plain loop's loss curve and
    resumes from its own optimizer checkpoint. The first run builds DeepSpeed's ops (~80 s)."""
    inputs = {"corpus": testbed["text"], "tokenizer": testbed["tokenizer"]}
    monkeypatch.setenv("MASTER_PORT", str(__import__("conftest").free_port()))
    plain_cfg = _config(max_steps=6, checkpoint_every=2)
    ds_cfg = _config(max_steps=6, checkpoint_every=2, deepspeed={"zero_optimization": {"stage": 2}})
    tracker = Tracker(tracking_uri)
    plain = run_stage("pretrain", plain_cfg, inputs, store=open_store(tmp_path / "plain"), tracker=tracker)
    store = open_store(tmp_path / "ds")
    resumed = _crash_then_resume(ds_cfg, inputs, store, tracker, monkeypatch, crash_after=4)
    assert resumed.metrics["resumed_from_step"] == 4.0
    plain_curve, ds_curve = _loss_curve(tracker, plain.run_id), _loss_curve(tracker, resumed.run_id)
    for step in (5, 6):
        assert ds_curve[step] == pytest.approx(plain_curve[step], rel=1e-4), step
    assert store.sub("checkpoints/step-00000006").exists("deepspeed/latest")
