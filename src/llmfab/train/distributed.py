"""Process-group facts, the torch.distributed process group, and the optional DeepSpeed ZeRO engine.

Under torchrun or a Kubeflow TrainJob, RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT come
from the launcher; a single process gets single-process defaults so DeepSpeed also runs on one CPU.

ZeRO-3 partitions the weights themselves: between `deepspeed_engine` and `unshard_zero3` a parameter of the
model holds only this rank's slice, and a forward gathers each layer's weights as it runs (a collective:
every rank must run the same forwards). Code that reads the weights outside the training forward, or that
runs a different number of forwards on each rank (generation of rank-local prompts), does it inside
`whole_weights(model)`, which gathers every weight on every rank and lifts the per-layer hooks meanwhile.
The frozen models of a stage (reference, reward model, teacher) go through `frozen_model`: under ZeRO-3 they are
partitioned the same way (TRL's prepare_deepspeed: the training's DeepSpeed config without its optimizer blocks,
so `offload_param` keeps their shards in host memory), and each of their forwards is a collective too: a loop
whose length differs between ranks runs `most_on_any_rank(n)` times (online DPO pads its pairs for it). Without
ZeRO-3 each rank holds them whole. WARP's EMA anchor is updated every rollout and stays whole.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import datetime
import logging
import os
import weakref

import torch

from llmfab.errors import ConfigError

log = logging.getLogger(__name__)

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


def most_on_any_rank(n: int) -> int:
    """The largest `n` any rank has (`n` in one process): how many forwards every rank runs of a partitioned model."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    backend_device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([n], device=backend_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a one-item list in a single process)."""
    if distributed_world() == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def deepspeed_config(
    user: dict, *, batch_size: int, grad_accum: int, max_grad_norm: float | None, precision: str
) -> dict:
    """The user's DeepSpeed config with the values our TrainConfig owns filled in (ours win). The global batch
    is DeepSpeed's train_batch_size = batch_size × grad_accum × ranks, as under DDP."""
    zero = user.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed.zero_optimization.stage: {stage} is not a ZeRO stage (0, 1, 2 or 3)")
    if stage < 3 and "offload_param" in zero:
        raise ConfigError("train.deepspeed.zero_optimization.offload_param needs stage 3 (it offloads weight shards)")
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
    dtypes = {id(p): p.dtype for p in model.parameters()}  # bf16 training casts the module
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if engine.zero_optimization_partition_weights():
        _ZERO3[model] = engine
        _ZERO3_DTYPES[model] = dtypes
    return engine


def frozen_model(model: torch.nn.Module, train) -> torch.nn.Module:
    """`model` (eval mode, no gradients) as the training `train` (a TrainConfig) shards: ZeRO-3 partitions it across
    the ranks with the training's own zero_optimization settings (offload_param too; the optimizer's blocks
    dropped, as it has none), otherwise it is returned as it is, whole on each rank. A partitioned frozen model is
    gathered whole by `whole_weights` and given back by `release_frozen`."""
    model.eval().requires_grad_(False)
    user = train.deepspeed or {}
    zero = dict(user.get("zero_optimization", {}))
    if zero.get("stage", 0) != 3:
        return model
    zero.pop("offload_optimizer", None)
    config = {k: v for k, v in user.items() if k not in ("optimizer", "scheduler", "zero_optimization")}
    config.update(
        zero_optimization=zero,
        train_micro_batch_size_per_gpu=train.batch_size,
        bf16={"enabled": train.precision == "bf16"},  # the frozen dtype (checkpoints.frozen_dtype)
    )
    deepspeed_engine(model, None, config)
    log.info("frozen %s partitioned across %d ranks (ZeRO-3)", type(model).__name__, distributed_world())
    return model


def release_frozen(model: torch.nn.Module) -> None:
    """Free a model `frozen_model` partitioned (its engine, hooks and shards); a no-op for one it left whole."""
    engine = _ZERO3.pop(model, None)
    _ZERO3_DTYPES.pop(model, None)
    if engine is not None:
        engine.destroy()


# Models whose weights a ZeRO-3 engine has partitioned, and that engine (until unshard_zero3); and the dtype of each
# of their weights before deepspeed.initialize.
_ZERO3: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ZERO3_DTYPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether `model`'s weights are ZeRO-3 partitioned across the ranks (each holds a slice)."""
    return model in _ZERO3


@contextlib.contextmanager
def whole_weights(model: torch.nn.Module):
    """Inside, every rank holds `model`'s whole weights and runs it without collectives (so ranks may generate
    different lengths from different prompts, or read the weights); changes made inside are not kept.
    A no-op for a model that is not ZeRO-3 partitioned. Costs the whole model in memory on every rank,
    as generation under ZeRO-3 does in TRL or DeepSpeed-Chat."""
    engine = _ZERO3.get(model)
    if engine is None:
        yield model
        return
    import deepspeed

    # A trained model's engine holds its hooks in the ZeRO-3 optimizer; a frozen one's engine has only them.
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        # The per-layer hooks would release (re-partition) each layer's weights after its forward.
        for param in model.parameters():
            param.ds_active_sub_modules.clear()
        for hook in (*offload.forward_hooks, *offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield model
        finally:
            offload._register_deepspeed_module(offload.module, count=[0])  # the module ids it gave them first


def unshard_zero3(engine, model: torch.nn.Module) -> None:
    """End ZeRO-3 for `model`: gather its weights whole on every rank (trainable ones from the optimizer's fp32
    master copy, in the dtype the model had before DeepSpeed), drop the engine's hooks and partitions, and leave a
    plain module behind (evaluation, generation and save_pretrained run on it as on any other)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    dtypes = _ZERO3_DTYPES.pop(model, {})
    params = list(model.parameters())
    whole = []
    for param in params:
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.data.clone()
        whole.append(full.to(dtypes.get(id(param), param.dtype)).reshape(param.ds_shape))
    engine.destroy()
    for module in model.modules():
        if type(module._parameters).__name__ == "ZeROOrderedDict":  # gathers on access
            module._parameters = collections.OrderedDict(module._parameters)
    for param, full in zip(params, whole, strict=True):
        param.data = full
        for attr in [a for a in vars(param) if a.startswith("ds_") or a in ("_z3_optimizer", "is_external_param")]:
            delattr(param, attr)
    _ZERO3.pop(model, None)
