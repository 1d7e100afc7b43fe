"""Weight merging of models that share an architecture (and, to be meaningful, an init):
linear averaging, SLERP of task vectors and LITI (WARP, arXiv:2406.16768).

States are name → tensor dicts; arithmetic runs in float32 and the result takes the first
state's dtypes. Non-floating tensors (buffers such as position ids) are taken from the first.
"""

from __future__ import annotations

import math

import torch

State = dict[str, torch.Tensor]


def _check_keys(states: list[State]) -> None:
    if not states:
        raise ValueError("nothing to merge")
    keys = states[0].keys()
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != keys:
            raise ValueError(f"model {i} has different parameters than model 0")


def _combine(states: list[State], fn) -> State:
    """fn(list of float32 tensors) per key for floating tensors, cast back to the first state's dtype."""
    _check_keys(states)
    return {
        k: fn([s[k].float() for s in states]).to(states[0][k].dtype)
        if states[0][k].is_floating_point()
        else states[0][k]
        for k in states[0]
    }


def average_state_dicts(states: list[State], weights: list[float] | None = None) -> State:
    """Σ_i w_i θ_i with weights normalised to sum to 1 (uniform by default)."""
    weights = weights or [1.0] * len(states)
    if len(weights) != len(states) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need {len(states)} non-negative weights with a positive sum, got {weights}")
    total = sum(weights)
    return _combine(states, lambda ts: sum(w / total * t for w, t in zip(weights, ts, strict=True)))


def slerp_tensors(v0: torch.Tensor, v1: torch.Tensor, lam: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of two task vectors (one tensor each), WARP eq. 4:
    sin((1-λ)Ω)/sin Ω · v0 + sin(λΩ)/sin Ω · v1 with Ω the angle between them. Falls back to the
    linear (1-λ)v0 + λv1 when they are (anti)parallel or one is zero, where Ω is undefined."""
    n0, n1 = v0.norm(), v1.norm()
    if n0 < eps or n1 < eps:
        return (1 - lam) * v0 + lam * v1
    cos = (torch.dot(v0.flatten(), v1.flatten()) / (n0 * n1)).clamp(-1.0, 1.0)
    omega = math.acos(cos.item())
    if math.sin(omega) < eps:
        return (1 - lam) * v0 + lam * v1
    return (math.sin((1 - lam) * omega) * v0 + math.sin(lam * omega) * v1) / math.sin(omega)


def slerp_state_dicts(init: State, states: list[State], lam: float | None = None) -> State:
    """θ_init + SLERP of the task vectors θ_m - θ_init, per tensor. Two models: λ (default 1/2);
    M > 2: iteratively, the k-th model enters the running merge with λ = 1/k (its weight in a
    running mean)."""
    _check_keys([init, *states])
    if len(states) < 2:
        raise ValueError(f"SLERP merges at least 2 models, got {len(states)}")
    if lam is not None and len(states) > 2:
        raise ValueError("lam applies to 2 models; more are merged iteratively with λ = 1/k")
    lam = 0.5 if lam is None else lam
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")

    def merge(ts: list[torch.Tensor]) -> torch.Tensor:
        base, vectors = ts[0], [t - ts[0] for t in ts[1:]]
        merged = slerp_tensors(vectors[0], vectors[1], lam if len(vectors) == 2 else 0.5)
        for k, vector in enumerate(vectors[2:], start=3):
            merged = slerp_tensors(merged, vector, 1 / k)
        return base + merged

    return _combine([init, *states], merge)


def liti(init: State, merged: State, eta: float) -> State:
    """Linear interpolation towards init (WARP's LITI): (1-η)·θ_init + η·θ_merged."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    return _combine([init, merged], lambda ts: (1 - eta) * ts[0] + eta * ts[1])


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay_rate: float) -> None:
    """θ_ema ← (1-μ)·θ_ema + μ·θ: WARP's moving anchor (μ = 0.01)."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach().to(e), decay_rate)
