"""Stage images: which image each stage runs in and what it is called, set here and nowhere else.

images/Dockerfile has three group bases and one target per stage, built FROM its group:

    cpu        torch CPU build: stages that never need a GPU (data, tokenizer, merging)
    train      CUDA base + torch CUDA build: GPU stages that do not train (generation, ranking)
    deepspeed  train + DeepSpeed: the training stages, any of which may set train.deepspeed

Stage `sft` is target `sft`, image `REGISTRY/llmfab-sft:TAG`; group `train` is image `llmfab-train` (the
Kubeflow Trainer runtime `llmfab-train` runs it). The registry and tag default to ghcr.io/llmfab and the
package version, and are overridden by $LLMFAB_IMAGE_REGISTRY / $LLMFAB_IMAGE_TAG, then by arguments.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from llmfab import __version__
from llmfab.errors import ConfigError

REGISTRY_ENV = "LLMFAB_IMAGE_REGISTRY"
TAG_ENV = "LLMFAB_IMAGE_TAG"
DEFAULT_REGISTRY = "ghcr.io/llmfab"
PREFIX = "llmfab-"

# Docker's reference grammar: a tag is 1-128 of [\w.-], not starting with . or -; a registry/namespace is
# lowercase path components, with an optional host:port first.
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_REGISTRY = re.compile(r"[a-z0-9]+([._-][a-z0-9]+)*(:\d+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*", re.ASCII)


@dataclass(frozen=True)
class Group:
    name: str  # the Dockerfile target
    base: str  # what the target is FROM: an image repository, or another group
    gpu: bool  # built on the CUDA base
    deepspeed: bool
    description: str


GROUPS: dict[str, Group] = {
    g.name: g
    for g in (
        Group("cpu", "python", False, False, "python slim + torch CPU build: data, tokenizer, merging"),
        Group("train", "nvidia/cuda", True, False, "CUDA base + torch CUDA build: generation and ranking"),
        Group("deepspeed", "train", True, True, "train + DeepSpeed: training stages"),
    )
}

# Every stage llmfab ships (llmfab.stages.shipped_stages()) has an entry: tests/test_images.py checks it, and that
# images/Dockerfile has a target FROM the group named here.
STAGE_GROUPS: dict[str, str] = {
    # Data and tokenizer: text processing only.
    "prepare_data": "cpu",
    "train_tokenizer": "cpu",
    "synthesize_long_qa": "cpu",
    # Weight averaging is elementwise arithmetic over state dicts: memory-bound, no GPU needed.
    "average": "cpu",
    "merge": "cpu",
    # Model registry: MLflow calls, hashing and (small models) one load + save: no GPU, no DeepSpeed.
    "register": "cpu",
    "promote": "cpu",
    # Compression: k-means over every weight matrix (GPU-fast at 3B) and gold-reward generation, no training.
    "compress": "train",
    # Sampling from models (and scoring with a reward model), no optimizer step.
    "synthesize_text": "train",
    "collect_preferences": "train",
    # Evaluation: forward passes and generation on a GPU, no optimizer step.
    "evaluate": "train",
    # Everything that runs the Trainer (TrainConfig.deepspeed may be set); rejection_sampling ends in SFT.
    "pretrain": "deepspeed",
    "distill": "deepspeed",
    "extend_context": "deepspeed",
    "anneal": "deepspeed",
    "sft": "deepspeed",
    "reward_model": "deepspeed",
    "dpo": "deepspeed",
    "online_dpo": "deepspeed",
    "rejection_sampling": "deepspeed",
    "mdloo": "deepspeed",
    "rlhf_warp": "deepspeed",
    "recover": "deepspeed",
}


def resolve_registry(value: str | None = None) -> str:
    """The registry/namespace images are pushed to: `value`, else $LLMFAB_IMAGE_REGISTRY, else ghcr.io/llmfab."""
    value = (value or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).rstrip("/")
    if not _REGISTRY.fullmatch(value):
        raise ConfigError(f"image registry {value!r}: expected e.g. ghcr.io/llmfab or localhost:5000/team")
    return value


def resolve_tag(value: str | None = None) -> str:
    """The image tag: `value`, else $LLMFAB_IMAGE_TAG, else the package version."""
    value = value or os.environ.get(TAG_ENV) or __version__
    if not _TAG.fullmatch(value):
        raise ConfigError(f"image tag {value!r}: expected 1-128 of letters, digits, '_', '.', '-'")
    return value


def image_name(target: str, registry: str | None = None, tag: str | None = None) -> str:
    """REGISTRY/llmfab-TARGET:TAG for a Dockerfile target (a stage or a group); '_' becomes '-'."""
    return f"{resolve_registry(registry)}/{PREFIX}{target.replace('_', '-')}:{resolve_tag(tag)}"


def stage_group(stage: str) -> Group:
    if stage not in STAGE_GROUPS:
        raise ConfigError(f"stage {stage!r} has no image; known: {', '.join(sorted(STAGE_GROUPS))}")
    return GROUPS[STAGE_GROUPS[stage]]


def image_for(stage: str, registry: str | None = None, tag: str | None = None) -> str:
    """The image of a stage's component, e.g. ghcr.io/llmfab/llmfab-sft:0.1.0."""
    stage_group(stage)
    return image_name(stage, registry, tag)


def group_image(group: str, registry: str | None = None, tag: str | None = None) -> str:
    """The image of a group base, e.g. ghcr.io/llmfab/llmfab-deepspeed:0.1.0 (the Trainer runtimes' images)."""
    if group not in GROUPS:
        raise ConfigError(f"image group {group!r}: known: {', '.join(GROUPS)}")
    return image_name(group, registry, tag)


def all_images(registry: str | None = None, tag: str | None = None) -> dict[str, str]:
    """Dockerfile target -> image for every group and stage, groups first (the order to build them in)."""
    return {
        **{g: group_image(g, registry, tag) for g in GROUPS},
        **{s: image_for(s, registry, tag) for s in STAGE_GROUPS},
    }
