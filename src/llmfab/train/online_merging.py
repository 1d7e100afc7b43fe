"""Qwen2's Online Merging Optimizer, OnDARE variant (Lu et al., 2024, used in Qwen2's online DPO).

Each step the inner optimizer (AdamW) proposes a delta Δ = θ' - θ. OnDARE keeps each entry of Δ
with probability p and rescales the kept ones by 1/p (DARE), then adds α·τ_r, where
τ_r = clamp(θ_SFT - θ_base, ±1) is the reference task vector: every step merges a little of
the SFT model's own alignment direction back in, which is what limits the alignment tax.
"""

from __future__ import annotations

import torch


class OnlineMergingOptimizer:
    """Wraps `inner`; `task_vector` maps each trained parameter to its τ_r (same shape)."""

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        task_vector: dict[torch.nn.Parameter, torch.Tensor],
        *,
        keep_prob: float = 0.01,
        alpha: float = 1e-6,
        clamp: float = 1.0,
        seed: int = 0,
    ):
        if not 0 < keep_prob <= 1:
            raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
        self.inner = inner
        self.keep_prob, self.alpha, self.seed = keep_prob, alpha, seed
        self.params = [p for g in inner.param_groups for p in g["params"]]
        missing = [i for i, p in enumerate(self.params) if p not in task_vector]
        if missing:
            raise ValueError(f"no task vector for {len(missing)} trained parameter(s)")
        self.tau = [task_vector[p].detach().clamp(-clamp, clamp).to(p.device, p.dtype) for p in self.params]
        self.steps = 0

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.steps = int(state["steps"])

    @torch.no_grad()
    def step(self) -> None:
        before = [p.detach().clone() for p in self.params]
        self.inner.step()
        # The DARE mask depends only on (seed, step): a resumed run draws the same masks.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps)
        for p, old, tau in zip(self.params, before, self.tau, strict=True):
            keep = (torch.rand(p.shape, generator=gen) < self.keep_prob).to(p.device, p.dtype)
            p.copy_(old + (p - old) * keep / self.keep_prob + self.alpha * tau)
        self.steps += 1
