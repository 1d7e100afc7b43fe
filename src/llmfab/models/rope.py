"""Changing a trained model's RoPE: a new base (context extension) and YaRN scaling (inference)."""

from __future__ import annotations

import tempfile

from llmfab.models.checkpoints import resolve_ref


def rope_theta(config) -> float:
    return float(config.rope_parameters["rope_theta"])


def with_rope(
    model,
    *,
    theta: float | None = None,
    max_positions: int | None = None,
    yarn_factor: float | None = None,
    yarn_original: int | None = None,
):
    """A copy of `model` with new RoPE settings. The rotary frequencies are buffers computed from
    the config at construction, so the model is rebuilt from its weights with the new config."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    rope = dict(config.rope_parameters)
    if theta is not None:
        rope["rope_theta"] = float(theta)
    if yarn_factor is not None:
        rope.update(
            rope_type="yarn",
            factor=float(yarn_factor),
            original_max_position_embeddings=int(yarn_original or config.max_position_embeddings),
        )
    config.rope_parameters = rope
    if max_positions is not None:
        config.max_position_embeddings = int(max_positions)
    with tempfile.TemporaryDirectory(prefix="llmfab-rope-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        return AutoModelForCausalLM.from_pretrained(resolve_ref(tmp), config=config, dtype=model.dtype)
