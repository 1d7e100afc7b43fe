"""Learning-rate schedules as multipliers of the peak rate."""

from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier for optimizer step `step` (0-based): linear warmup, then cosine to `min_ratio`,
    linear to 0 (Llama annealing), or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    # 0 at the first step after warmup, (n-1)/n at the last: every step moves the weights.
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
