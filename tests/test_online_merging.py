"""The Online Merging Optimizer (OnDARE) on known geometry."""

import pytest
import torch

from llmfab.train.online_merging import OnlineMergingOptimizer


def _setup(seed=0):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(64, 32))
    tau = torch.randn(64, 32) * 3  # entries beyond ±1 get clamped
    return w, tau


def _grad(w):
    w.grad = torch.ones_like(w) * 0.5


def test_full_keep_and_no_merge_is_adamw():
    w, tau = _setup()
    ref = torch.nn.Parameter(w.detach().clone())
    omo = OnlineMergingOptimizer(torch.optim.AdamW([w], lr=1e-2), {w: tau}, keep_prob=1.0, alpha=0.0)
    adam = torch.optim.AdamW([ref], lr=1e-2)
    for _ in range(3):
        _grad(w), _grad(ref)
        omo.step(), adam.step()
    torch.testing.assert_close(w, ref)


def test_zero_step_moves_by_alpha_times_clamped_task_vector():
    w, tau = _setup()
    before = w.detach().clone()
    omo = OnlineMergingOptimizer(torch.optim.AdamW([w], lr=0.0, weight_decay=0.0), {w: tau}, alpha=1e-3)
    _grad(w)
    omo.step()
    torch.testing.assert_close(w - before, 1e-3 * tau.clamp(-1, 1))


def test_dare_keeps_a_fraction_rescaled():
    w, tau = _setup()
    before = w.detach().clone()
    plain = torch.nn.Parameter(w.detach().clone())
    omo = OnlineMergingOptimizer(torch.optim.SGD([w], lr=0.1), {w: tau}, keep_prob=0.25, alpha=0.0, seed=3)
    _grad(w)
    omo.step()
    delta = w - before
    kept = delta != 0
    assert kept.float().mean().item() == pytest.approx(0.25, abs=0.05)
    torch.testing.assert_close(delta[kept], torch.full_like(delta[kept], -0.1 * 0.5 / 0.25))
    assert plain.requires_grad  # untouched copy


def test_state_round_trip_reproduces_masks():
    w1, tau = _setup()
    w2 = torch.nn.Parameter(w1.detach().clone())
    a = OnlineMergingOptimizer(torch.optim.AdamW([w1], lr=1e-2), {w1: tau}, keep_prob=0.5, seed=1)
    for _ in range(2):
        _grad(w1)
        a.step()
    b = OnlineMergingOptimizer(torch.optim.AdamW([w2], lr=1e-2), {w2: tau}, keep_prob=0.5, seed=1)
    w2.data.copy_(w1.data)
    _grad(w2)
    b.step()  # materialise state, then overwrite it with a's
    w2.data.copy_(w1.data)
    b.load_state_dict(a.state_dict())
    _grad(w1), _grad(w2)
    a.step(), b.step()
    torch.testing.assert_close(w1, w2)


def test_missing_task_vector_is_an_error():
    w, tau = _setup()
    other = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="task vector"):
        OnlineMergingOptimizer(torch.optim.AdamW([w, other]), {w: tau})
