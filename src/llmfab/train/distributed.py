"""Process-group facts and the optional DeepSpeed ZeRO engine.

Under torchrun or a Kubeflow TrainJob, RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from
the launcher; a single process gets single-process defaults so DeepSpeed also runs on one CPU.
"""

from __future__ import annotations

import os

import torch

from llmfab.errors import ConfigError


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def deepspeed_config(
    user: dict, *, batch_size: int, grad_accum: int, max_grad_norm: float | None, precision: str
) -> dict:
    """The user's DeepSpeed config with the values our TrainConfig owns filled in (ours win)."""
    stage = user.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(
            f"train.deepspeed.zero_optimization.stage: {stage} is not supported (0, 1 or 2): "
            "stage 3 partitions the weights, which our HF checkpoints write whole"
        )
    cfg = {
        "zero_allow_untested_optimizer": True,  # we pass our own AdamW
        "zero_force_ds_cpu_optimizer": False,
        **user,
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "bf16": {"enabled": precision == "bf16"},
    }
    if max_grad_norm:
        cfg["gradient_clipping"] = max_grad_norm
    return cfg


def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    import deepspeed

    for key, default in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ):
        os.environ.setdefault(key, default)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine
