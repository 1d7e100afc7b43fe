"""Model configuration: an architecture built from shape numbers, or a pretrained reference."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmfab.config.base import StrictModel

Arch = Literal["qwen2", "gemma2", "llama", "afm"]


class RopeScaling(StrictModel):
    """RoPE scaling applied on top of `rope_theta` (YaRN for inference-time context extension)."""

    type: Literal["yarn", "linear", "dynamic"] = "yarn"
    factor: float = Field(gt=1.0)
    original_max_position_embeddings: int = Field(gt=0)


class ModelConfig(StrictModel):
    """Decoder-only LM. With `pretrained` set, weights load from that hub id, local path or store
    URI and the shape fields are ignored; otherwise the model is built from the shape, randomly
    initialised (seeded)."""

    arch: Arch = "llama"
    pretrained: str | None = None
    vocab_size: int = Field(2048, gt=0)
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    head_dim: int | None = Field(None, gt=0)
    intermediate_size: int = Field(352, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    rope_theta: float = Field(10_000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = True
    sliding_window: int | None = Field(None, gt=0, description="Gemma 2 local-attention window")
    attn_logit_softcapping: float | None = Field(None, gt=0, description="Gemma 2")
    final_logit_softcapping: float | None = Field(None, gt=0, description="Gemma 2")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _check_shape(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                "unless head_dim is set"
            )
        return self
