"""One training loop for every stage that updates weights.

Deterministic given the seed and `batch_for_step`, and resumable exactly: every
`checkpoint_every` steps it writes an atomic checkpoint (model, tokenizer, optimizer state, RNG
states, step); on start it continues from the newest complete one, so an interrupted run and an
uninterrupted one produce the same loss curve.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmfab.errors import LlmfabError
from llmfab.stages.base import StageContext
from llmfab.storage.checkpoint import (
    delete_checkpoint,
    fetch_checkpoint,
    latest_step_checkpoint,
    list_step_checkpoints,
    step_name,
    write_checkpoint,
)
from llmfab.train.config import TrainConfig
from llmfab.train.distributed import deepspeed_config, deepspeed_engine, is_main_process, rank_and_world
from llmfab.train.schedule import lr_multiplier

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
DS_DIR = "deepspeed"
FAULT_ENV = "LLMFAB_FAIL_AT_STEP"
TOKEN_KEYS = ("input_ids", "chosen_ids", "rejected_ids")  # counted for tokens_per_sec

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


class TrainingError(LlmfabError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class InjectedFault(RuntimeError):
    """Raised when LLMFAB_FAIL_AT_STEP asks for a crash (fault-injection tests)."""


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load safetensors weights saved by save_pretrained (sharded or not) into `model`."""
    from safetensors.torch import load_file

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


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        ctx: StageContext,
        loss_fn: LossFn,
        *,
        tokenizer=None,
        params: list[torch.nn.Parameter] | None = None,
        eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        eval_every: int = 0,
        checkpoint_meta: dict | None = None,
        wrap_optimizer: Callable[[torch.optim.Optimizer], object] | None = None,
    ):
        self.model = model
        self.config = config
        self.ctx = ctx
        self.loss_fn = loss_fn
        self.tokenizer = tokenizer
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.meta = checkpoint_meta or {}
        self.ckpt_store = ctx.store.sub("checkpoints")
        opt = config.optim
        params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr,
            betas=opt.betas,
        )
        if wrap_optimizer is not None:  # e.g. the Online Merging Optimizer around AdamW
            if config.deepspeed is not None:
                # DeepSpeed steps its own (sharded) optimizer: a wrapper around AdamW would never run.
                raise TrainingError("a wrapped optimizer (e.g. optimizer=online_merging) cannot run under deepspeed")
            self.optimizer = wrap_optimizer(self.optimizer)
        self.step = 0
        self.history: list[float] = []
        self.rank, self.world_size = rank_and_world()
        if self.world_size > 1:
            # Needs gradient all-reduce (DDP) and per-rank optimizer-shard uploads; lands with the launcher.
            raise TrainingError(
                f"WORLD_SIZE={self.world_size}: multi-process training is not supported yet; "
                "run one process per stage (DeepSpeed ZeRO 0-2 works in one process)"
            )
        self.engine = None
        if config.deepspeed is None and torch.cuda.is_available():
            model.to("cuda")
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
        """Write a resumable checkpoint (every rank joins DeepSpeed's save; rank 0 uploads)."""
        with tempfile.TemporaryDirectory(prefix="llmfab-train-") as tmp:
            state = {"step": self.step, "rng": _rng_state(), "history": self.history}
            if self.engine is not None:
                self.engine.save_checkpoint(str(Path(tmp) / DS_DIR), tag="state")
            else:
                state["optimizer"] = self.optimizer.state_dict()
            if not is_main_process():
                return None
            self.model.save_pretrained(tmp, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            torch.save(state, Path(tmp) / STATE_FILE)
            uri = write_checkpoint(self.ckpt_store.sub(step_name(self.step)), tmp, {**self.meta, "step": self.step})
        for _, name in list_step_checkpoints(self.ckpt_store)[: -self.config.keep_checkpoints]:
            delete_checkpoint(self.ckpt_store.sub(name))
        return uri

    def resume(self) -> bool:
        found = latest_step_checkpoint(self.ckpt_store)
        if found is None:
            return False
        step, store = found
        folder = fetch_checkpoint(store)
        load_weights(self.model, folder)
        state = torch.load(folder / STATE_FILE, weights_only=True)  # no pickled code from a store
        if self.engine is not None:
            self.engine.load_checkpoint(str(folder / DS_DIR), tag="state", load_module_strict=False)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.step, self.history = state["step"], list(state["history"])
        log.info("resumed from %s (step %d)", store.uri, step)
        self.ctx.log_metrics({"resumed_from_step": step})
        return True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- the loop ----------------------------------------------------------------------------
    def _autocast(self):
        if self.config.precision == "bf16":
            device = next(self.model.parameters()).device.type
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fit(self, batch_for_step: Callable[[int, int], Batch]) -> torch.nn.Module:
        """Train until `max_steps`; `batch_for_step(step, micro)` gives each micro-batch."""
        cfg, opt = self.config, self.config.optim
        self.resume()
        fail_at = int(os.environ.get(FAULT_ENV, "0") or 0)
        self.model.train()
        bar = self.ctx.progress(total=cfg.max_steps, initial=self.step, desc=f"{self.ctx.step_id} train")
        tokens, started = 0, time.time()
        while self.step < cfg.max_steps:
            mult = lr_multiplier(self.step, cfg.max_steps, opt.warmup_steps, opt.schedule, opt.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = opt.lr * mult
            self.optimizer.zero_grad(set_to_none=True)
            total, extra = 0.0, {}
            for micro in range(cfg.grad_accum):
                # Each rank takes its own micro-batches of the same global step.
                batch = batch_for_step(self.step, micro * self.world_size + self.rank)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with self._autocast():
                    loss, metrics = self.loss_fn(self.model if self.engine is None else self.engine, batch)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"step {self.step + 1}: loss is {loss.item()}; stopping (last good checkpoint kept at "
                        f"{self.ckpt_store.uri})"
                    )
                if self.engine is not None:
                    self.engine.backward(loss)  # DeepSpeed scales by the accumulation steps itself
                    self.engine.step()  # applies the update at the accumulation boundary only
                else:
                    (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
                for k, v in metrics.items():
                    extra[k] = extra.get(k, 0.0) + v / cfg.grad_accum
                tokens += sum(int(v.numel()) for k, v in batch.items() if k in TOKEN_KEYS)
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
            self.ctx.log_metrics(row, step=self.step)
            if self.eval_fn and self.eval_every and self.step % self.eval_every == 0 and self.step < cfg.max_steps:
                self.evaluate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
            if fail_at and self.step == fail_at:
                raise InjectedFault(f"{FAULT_ENV}={fail_at}: simulated crash after step {self.step}")
        bar.close()
        self.model.eval()
        return self.model

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        metrics = self.eval_fn(self.model)
        self.ctx.log_metrics(metrics, step=self.step)
        self.model.train(was_training)
        return metrics
