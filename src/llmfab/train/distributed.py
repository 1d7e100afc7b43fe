"""Process-group facts, the torch.distributed process group, and the optional DeepSpeed ZeRO engine.

Under torchrun or a Kubeflow TrainJob, RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT come
from the launcher; a single process gets single-process defaults so DeepSpeed also runs on one CPU.
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch

from llmfab.errors import ConfigError

# How long a rank waits in a collective (e.g. the barrier while rank 0 uploads a checkpoint) before failing.
TIMEOUT_ENV = "LLMFAB_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3600


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def micro_batches_per_step(grad_accum: int) -> int:
    """All ranks' micro-batches of one optimizer step: the Trainer asks rank r for micro-batch
    micro * world + r, so a batcher strides by grad_accum * world."""
    return grad_accum * rank_and_world()[1]


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def training_device() -> torch.device:
    """This rank's device: its LOCAL_RANK's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group() -> None:
    """Join the job's process group (env:// from torchrun / Trainer): NCCL on GPUs, gloo on CPUs."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    rank, world = rank_and_world()
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start multi-process training with "
            "torchrun (or a Kubeflow TrainJob), which sets them"
        )
    device = training_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=int(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=timeout,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def distributed_world() -> int:
    """Ranks in the initialized process group (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (a no-op without a multi-rank process group)."""
    import torch.distributed as dist

    if distributed_world() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over every rank (returned unchanged in a single process)."""
    if distributed_world() == 1:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


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
