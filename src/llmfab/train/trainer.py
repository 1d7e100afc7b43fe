"""One training loop for every stage that updates weights.

Deterministic given the seed and `batch_for_step`, and resumable exactly: every
`checkpoint_every` steps it writes an atomic checkpoint (model, tokenizer, optimizer state, RNG
states, step); on start it continues from the newest complete one, so an interrupted run and an
uninterrupted one produce the same loss curve.

Under torchrun (WORLD_SIZE > 1, env:// rendezvous; NCCL on GPUs, gloo on CPUs) the plain loop runs
data-parallel: every rank holds the whole model, takes its own micro-batches of each step
(`batch_for_step(step, micro * world + rank)`), and DistributedDataParallel averages the gradients
at the last micro-batch of the step, so N ranks with `grad_accum` G follow the same curve as one
process with G * N. Logged losses and metrics are means over all ranks; rank 0 alone writes
checkpoints and talks to MLflow while the others wait at a barrier. `self.model` stays the bare
module (evaluation, saving, attribute access); the loss function gets the DDP wrapper to call.

With `train.deepspeed` the loss function calls DeepSpeed's engine instead, on every rank the same way (the
global batch is again batch_size × grad_accum × ranks): ZeRO 1-2 shard optimizer states and gradients, ZeRO-3
also the weights (distributed.py: `whole_weights` gathers them for generation and evaluation). A checkpoint
then holds DeepSpeed's own save: every rank writes its shards and uploads them under the step's prefix, and
rank 0 adds the HF folder (under ZeRO-3 gathered layer by layer onto rank 0), the trainer state and, last, the
manifest listing all of them; a resume fetches it on every rank and reloads the shards (same number of ranks).
At the end of `fit` ZeRO-3 weights are gathered whole on every rank (`unshard_zero3`, in the model's own dtype),
so the stage evaluates, generates and saves a plain model as in any other run.

What a step minimises: a plain loss function returns a micro-batch's mean (over its pairs, say), and
the step's loss is the mean over its micro-batches (on all ranks). A `SummedLoss` returns a
micro-batch's sum over its units (target tokens) and the step's loss is the sum over all its
micro-batches on all ranks divided by their total units, counted before the first backward: a token
weighs the same whichever micro-batch holds it, so G uneven micro-batches give the gradient of one
batch holding them all (averaging per-micro-batch token means does not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pickle
import random
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmfab.errors import CheckpointError, LlmfabError
from llmfab.storage import ObjectStore
from llmfab.storage.checkpoint import (
    MANIFEST,
    delete_checkpoint,
    fetch_checkpoint,
    file_entry,
    list_step_checkpoints,
    step_name,
    write_checkpoint,
)
from llmfab.tracking import timing
from llmfab.train.config import TrainConfig
from llmfab.train.context import TrainingContext
from llmfab.train.distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    deepspeed_config,
    deepspeed_engine,
    init_process_group,
    is_main_process,
    is_partitioned,
    rank_and_world,
    training_device,
    unshard_zero3,
    whole_weights,
)
from llmfab.train.memory import enable_gradient_checkpointing, restore_use_cache
from llmfab.train.schedule import lr_multiplier

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
DS_DIR = "deepspeed"
FAULT_ENV = "LLMFAB_FAIL_AT_STEP"
FAULT_SIGNAL_ENV = "LLMFAB_FAIL_SIGNAL"  # KILL: rank 0 SIGKILLs itself at FAULT_ENV's step instead of raising
TOKEN_KEYS = ("input_ids", "chosen_ids", "rejected_ids")  # counted for tokens_per_sec

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


@dataclasses.dataclass(frozen=True)
class SummedLoss:
    """A loss normalised over the whole optimizer step: `fn(model, batch)` returns a micro-batch's loss
    summed over its units (and metrics, micro-batch means); `units(batch)` counts those units (e.g. the
    target tokens). The Trainer divides each sum by the step's total units over all micro-batches and ranks."""

    fn: LossFn
    units: Callable[[Batch], int]

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.fn(model, batch)


class TrainingError(LlmfabError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class InjectedFault(RuntimeError):
    """Raised when LLMFAB_FAIL_AT_STEP asks for a crash (fault-injection tests)."""


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load safetensors weights saved by save_pretrained (sharded or not) into `model`."""
    from safetensors.torch import load_file

    if (folder / "adapter_config.json").is_file():
        # A peft model saves only its adapter (its frozen base comes from the stage's input).
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise TrainingError(f"{folder}: adapter does not fit the model (unexpected {result.unexpected_keys})")
        return
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise TrainingError(f"{folder}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


class _DataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP that also answers the wrapped model's attributes (e.g. `model.config` in a loss function)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def _fused_adamw(params: list[torch.nn.Parameter], config: TrainConfig) -> bool | None:
    """Fused AdamW (one kernel for every parameter's update) on CUDA; torch's default elsewhere (on CPU, a
    loop over the parameters).

    DeepSpeed steps its own partitions of the parameters, so it keeps the plain AdamW. On CPU the fused
    kernel is faster too, but it rounds each update differently, and the tiny CPU recipes (AFM's above
    all) were validated on the default numerics: their SFT gold moved 0.70 -> 0.54 / 0.14 with it.
    """
    # The Trainer moves the model to training_device() after building the optimizer: ask where it goes.
    on_cuda = training_device().type == "cuda" and all(p.is_floating_point() for p in params)
    return True if on_cuda and config.deepspeed is None else None


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        ctx: TrainingContext,
        loss_fn: LossFn | SummedLoss,
        *,
        tokenizer=None,
        params: list[torch.nn.Parameter] | None = None,
        eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        eval_every: int = 0,
        checkpoint_meta: dict | None = None,
        wrap_optimizer: Callable[[torch.optim.Optimizer], object] | None = None,
        extra_state: torch.nn.Module | None = None,
    ):
        self.model = model
        if config.gradient_checkpointing:  # before any wrapper (DDP, DeepSpeed) takes the model
            enable_gradient_checkpointing(model)
        self.config = config
        self.ctx = ctx
        self.loss_fn = loss_fn
        self.tokenizer = tokenizer
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.meta = checkpoint_meta or {}
        self.extra_state = extra_state  # e.g. WARP's EMA anchor: checkpointed and restored with the step
        self.ckpt_store = ctx.store.sub("checkpoints")
        opt = config.optim
        params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr,
            betas=opt.betas,
            fused=_fused_adamw(params, config),
        )
        if wrap_optimizer is not None:  # e.g. the Online Merging Optimizer around AdamW
            if config.deepspeed is not None:
                # DeepSpeed steps its own (sharded) optimizer: a wrapper around AdamW would never run.
                raise TrainingError("a wrapped optimizer (e.g. optimizer=online_merging) cannot run under deepspeed")
            self.optimizer = wrap_optimizer(self.optimizer)
        self.step = 0
        self.history: list[float] = []
        self.rank, self.world_size = rank_and_world()
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.engine = None
        if self.world_size > 1:
            init_process_group()
        if config.deepspeed is None and torch.cuda.is_available():
            model.to(training_device())
        if config.deepspeed is not None:
            ds = deepspeed_config(
                config.deepspeed,
                batch_size=config.batch_size,
                grad_accum=config.grad_accum,
                max_grad_norm=opt.max_grad_norm,
                precision=config.precision,
            )
            self.engine = deepspeed_engine(model, self.optimizer, ds)

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> str | None:
        """Write a resumable checkpoint: rank 0 uploads it while the other ranks wait (under DeepSpeed every rank
        joins the save and uploads its own ZeRO shards first). Returns its URI on rank 0, None elsewhere."""
        uri = self._write_checkpoint() if self.rank == 0 or self.engine is not None else None
        barrier()
        return uri

    def _write_checkpoint(self) -> str | None:
        store = self.ckpt_store.sub(step_name(self.step))
        with tempfile.TemporaryDirectory(prefix="llmfab-train-") as tmp:
            state = {"step": self.step, "rng": _rng_state(), "history": self.history, "world_size": self.world_size}
            if self.extra_state is not None:
                state["extra"] = self.extra_state.state_dict()
            uploaded, weights = {}, None
            if self.engine is not None:
                if is_main_process():
                    store.delete(MANIFEST)  # no rank's new shard may sit beside the old manifest
                barrier()
                self.engine.save_checkpoint(str(Path(tmp) / DS_DIR), tag="state")
                uploaded = self._upload_rank_files(store, Path(tmp))
                if is_partitioned(self.model):  # the HF folder's weights, gathered layer by layer onto rank 0
                    weights = self.engine._zero3_consolidated_16bit_state_dict()
            else:
                state["optimizer"] = self.optimizer.state_dict()
            if not is_main_process():
                return None
            self.model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights else {}))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            torch.save(state, Path(tmp) / STATE_FILE)
            uri = write_checkpoint(store, tmp, {**self.meta, "step": self.step}, uploaded=uploaded)
        for _, name in list_step_checkpoints(self.ckpt_store)[: -self.config.keep_checkpoints]:
            delete_checkpoint(self.ckpt_store.sub(name))
        return uri

    def _upload_rank_files(self, store: ObjectStore, local: Path) -> dict[str, dict]:
        """The files DeepSpeed's save wrote on ranks other than 0 (their ZeRO shards), uploaded by those ranks under
        `store` before rank 0 writes the manifest; returns their manifest entries (on every rank). A name several
        ranks wrote is the lowest rank's; rank 0 uploads its own with the manifest."""
        names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        taken = {n for names_r in all_gather_object(names)[: self.rank] for n in names_r}
        entries = {}
        if self.rank != 0:
            for name in names:
                if name not in taken:
                    entries[name] = file_entry(local / name)
                    store.put_file(name, local / name)
        return {k: v for rank_entries in all_gather_object(entries) for k, v in rank_entries.items()}

    def _newest_good_checkpoint(self) -> tuple[int, ObjectStore, Path] | None:
        """The newest complete checkpoint whose files match its manifest, fetched. One with a manifest but
        corrupt files (bit rot, a foreign writer) is skipped for the one before it, never loaded."""
        found = list_step_checkpoints(self.ckpt_store)
        for step, name in reversed(found):
            store = self.ckpt_store.sub(name)
            try:
                return step, store, fetch_checkpoint(store)
            except CheckpointError as exc:
                log.warning("not resuming from %s: %s", store.uri, exc)
        if found:
            raise TrainingError(
                f"{self.ckpt_store.uri}: every checkpoint ({', '.join(n for _, n in found)}) is corrupt; "
                "move them away to start from scratch"
            )
        return None

    def resume(self) -> bool:
        found = self._newest_good_checkpoint()
        if found is None:
            return False
        step, store, folder = found
        if not is_partitioned(self.model):  # ZeRO-3's weight shards come back with the engine's load below
            load_weights(self.model, folder)
        try:
            state = torch.load(folder / STATE_FILE, weights_only=True)  # no pickled code from a store
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{store.uri_for(STATE_FILE)}: refused (only tensors and plain data are unpickled): {exc}"
            ) from None
        saved_world = state.get("world_size", 1)
        if self.engine is not None and saved_world != self.world_size:
            raise TrainingError(
                f"{store.uri}: its DeepSpeed ZeRO states are sharded over {saved_world} ranks, this run has "
                f"{self.world_size}; resume with {saved_world} (or move the checkpoints away to start afresh)"
            )
        if self.engine is not None:
            self.engine.load_checkpoint(str(folder / DS_DIR), tag="state", load_module_strict=False)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        if self.extra_state is not None:
            self.extra_state.load_state_dict(state["extra"])
        self.step, self.history = state["step"], list(state["history"])
        log.info("resumed from %s (step %d)", store.uri, step)
        self._log({"resumed_from_step": step})
        return True

    def _log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Metrics to the stage (so every rank's ctx.metrics agree) and, from rank 0 only, to MLflow."""
        ctx = self.ctx if self.rank == 0 else dataclasses.replace(self.ctx, run=None)
        ctx.log_metrics(metrics, step)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- the loop ----------------------------------------------------------------------------
    def _autocast(self):
        if self.config.precision == "bf16":
            device = next(self.model.parameters()).device.type
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _wrap_data_parallel(self) -> None:
        """DDP around the model (after resume, so every rank starts from the same weights it broadcasts)."""
        if self.world_size == 1 or self.engine is not None or self.ddp is not None:
            return
        device = self.device
        self.ddp = _DataParallel(
            self.model,
            device_ids=[device] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers (e.g. RoPE frequencies) are constants, identical on every rank
        )

    def _global_means(self, total: float, extra: dict[str, float], tokens: int) -> tuple[float, dict, int]:
        """The step's loss and metrics averaged over ranks, and the tokens all ranks consumed."""
        if self.world_size == 1:
            return total, extra, tokens
        keys = sorted(extra)
        summed = all_reduce_sum([total, float(tokens), *(extra[k] for k in keys)], self.device)
        n = self.world_size
        return summed[0] / n, {k: v / n for k, v in zip(keys, summed[2:], strict=True)}, int(summed[1])

    def _loss_scale(self, batches: list[Batch]) -> float:
        """What each micro-batch's loss is multiplied by so the step's gradient is that of the step's loss
        (see the module docstring). Ranks' gradients are averaged (DDP, DeepSpeed), hence a SummedLoss's
        × world size; a step without a single unit scales its zero sums by 1."""
        if not isinstance(self.loss_fn, SummedLoss):
            return 1.0 / len(batches)
        units = all_reduce_sum([float(sum(self.loss_fn.units(b) for b in batches))], self.device)[0]
        return self.world_size / max(units, 1.0)

    def fit(self, batch_for_step: Callable[[int, int], Batch]) -> torch.nn.Module:
        """Train until `max_steps`; `batch_for_step(step, micro)` gives each micro-batch."""
        cfg, opt = self.config, self.config.optim
        self.resume()
        self._wrap_data_parallel()
        # What the loss function calls: DeepSpeed's engine, the DDP wrapper, or the model itself.
        forward = next(m for m in (self.engine, self.ddp, self.model) if m is not None)
        fail_at = int(os.environ.get(FAULT_ENV, "0") or 0)
        self.model.train()
        ctx = self.ctx if self.rank == 0 else dataclasses.replace(self.ctx, show_progress=False)
        bar = ctx.progress(total=cfg.max_steps, initial=self.step, desc=f"{self.ctx.step_id} train")
        tokens, started = 0, time.time()
        while self.step < cfg.max_steps:
            with timing.timed("train"):  # the optimizer step itself (not evaluation or checkpoints)
                mult = lr_multiplier(self.step, cfg.max_steps, opt.warmup_steps, opt.schedule, opt.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = opt.lr * mult
                self.optimizer.zero_grad(set_to_none=True)
                total, extra, step_tokens = 0.0, {}, 0
                # Each rank takes its own micro-batches of the same global step, all of them before the first
                # backward: a SummedLoss's normaliser is the whole step's count.
                batches = [batch_for_step(self.step, m * self.world_size + self.rank) for m in range(cfg.grad_accum)]
                scale = self._loss_scale(batches)
                for micro, batch in enumerate(batches):
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    # DDP all-reduces gradients in the backward of the step's last micro-batch only.
                    last = micro == cfg.grad_accum - 1
                    with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                        with self._autocast():
                            loss, metrics = self.loss_fn(forward, batch)
                        loss = loss * scale
                        if self.world_size == 1 and not torch.isfinite(loss):
                            raise TrainingError(self._non_finite(loss.item()))
                        if self.engine is not None:
                            self.engine.backward(loss, scale_wrt_gas=False)  # already scaled for accumulation
                            self.engine.step()  # applies the update at the accumulation boundary only
                        else:
                            # Under DDP every rank runs the backward (a non-finite loss is caught after the
                            # step's all-reduce, on all ranks at once, so none is left waiting).
                            loss.backward()
                    total += loss.item()
                    for k, v in metrics.items():
                        extra[k] = extra.get(k, 0.0) + v / cfg.grad_accum
                    step_tokens += sum(int(v.numel()) for k, v in batch.items() if k in TOKEN_KEYS)
                total, extra, step_tokens = self._global_means(total, extra, step_tokens)
                tokens += step_tokens
                if not math.isfinite(total):
                    raise TrainingError(self._non_finite(total))
                if self.engine is not None:
                    grad_norm = self.engine.get_global_grad_norm() or 0.0
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        [p for g in self.optimizer.param_groups for p in g["params"]], opt.max_grad_norm or math.inf
                    )
                    self.optimizer.step()
            self.step += 1
            self.history.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            row = {"train_loss": total, **{f"train_{k}": v for k, v in extra.items()}}
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                elapsed = max(1e-9, time.time() - started)
                row.update(lr=opt.lr * mult, grad_norm=float(grad_norm), tokens_per_sec=tokens / elapsed)
            self._log(row, step=self.step)
            if self.eval_fn and self.eval_every and self.step % self.eval_every == 0 and self.step < cfg.max_steps:
                self.evaluate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
            if fail_at and self.step == fail_at:
                if os.environ.get(FAULT_SIGNAL_ENV) == "KILL" and self.rank == 0:
                    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all; torchrun stops the other ranks
                raise InjectedFault(f"{FAULT_ENV}={fail_at}: simulated crash after step {self.step}")
        bar.close()
        self.ddp = None  # its gradient hooks go with it; a later fit (or Trainer) wraps the model afresh
        if is_partitioned(self.model):
            # Whole weights on every rank from here: the stage evaluates, generates and saves a plain model.
            unshard_zero3(self.engine, self.model)
            self.engine = None
        restore_use_cache(self.model)  # the saved config asks for the KV cache again
        self.model.eval()
        return self.model

    def _non_finite(self, loss: float) -> str:
        return f"step {self.step + 1}: loss is {loss}; stopping (last good checkpoint kept at {self.ckpt_store.uri})"

    @torch.no_grad()
    @timing.timed("score")
    def evaluate(self) -> dict[str, float]:
        """`eval_fn` on the bare model (every rank runs it on the same weights, so all agree; under ZeRO-3 gathered
        whole for it, so it may generate)."""
        was_training = self.model.training
        self.model.eval()
        with whole_weights(self.model):
            metrics = self.eval_fn(self.model)
        self._log(metrics, step=self.step)
        self.model.train(was_training)
        return metrics
