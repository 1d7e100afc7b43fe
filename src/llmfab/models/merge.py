"""Parameter averaging of models that share an architecture (and, to be meaningful, an init)."""

from __future__ import annotations

import torch


def average_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float] | None = None):
    """Σ_i w_i θ_i with weights normalised to sum to 1 (uniform by default); computed in float32."""
    if not states:
        raise ValueError("nothing to average")
    weights = weights or [1.0] * len(states)
    if len(weights) != len(states) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need {len(states)} non-negative weights with a positive sum, got {weights}")
    keys = states[0].keys()
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != keys:
            raise ValueError(f"model {i} has different parameters than model 0")
    total = sum(weights)
    return {
        k: sum(w / total * s[k].float() for w, s in zip(weights, states, strict=True)).to(states[0][k].dtype)
        if states[0][k].is_floating_point()
        else states[0][k]
        for k in keys
    }
