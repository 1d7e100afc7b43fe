"""GPU memory plan of a recipe's training steps: what each step holds per GPU in the layout it is configured with.

For every training step (a stage config with a `train` field; rounds expanded, parallel runs once) the plan
estimates, per GPU, in bytes:

- weights, gradients and optimizer states of the trained model, P parameters (with a `lora` config only the
  adapter's P_a parameters get gradients and AdamW states; the frozen base keeps its weights):
    * plain torch (DDP, replicated): fp32 weights 4P (the fp32 master copy: `precision: bf16` is autocast, see
      TrainConfig.precision), fp32 gradients 4P, AdamW's two fp32 states 8P;
    * DeepSpeed with bf16: bf16 weights 2P, bf16 gradients 2P, fp32 master + two fp32 states 12P (fp32: 4/4/8);
    * ZeRO-1 divides the optimizer states by the N GPUs, ZeRO-2 the gradients too, ZeRO-3 the weights too (plus
      the two layers' bf16 parameters it gathers at a time); offload_optimizer moves the optimizer states to CPU
      memory, offload_param (ZeRO-3) the weight shards.
- activations of one micro-batch: S sequences (batch_size; x2 for stages that run chosen and rejected in one
  forward: dpo, online_dpo, reward_model) of T tokens (the step's seq_len / max_len), b bytes per element (2
  under bf16, 4 under fp32), for a decoder of L layers, hidden h, a query heads and k KV heads of d dims,
  intermediate I. The per-layer count follows Korthikanti et al. 2022 (sbh(34 + 5as/h) for GPT with dropout and
  a materialised attention matrix), adapted to a pre-norm RMSNorm / GQA / SwiGLU / RoPE decoder with fused
  (flash / memory-efficient) attention and no dropout. Per token and layer the backward keeps:
    norms 4h (the two norms' inputs and outputs), attention 4ad + 4kd (q, k, v before and after RoPE, the attention
    output), MLP 4I (gate, up, silu(gate), their product)
  so activations = S T L (4h + 4ad + 4kd + 4I) b. With gradient checkpointing (full recomputation per layer)
  only each layer's input is kept, S T L h b, plus one layer recomputed at a time, S T (4h + 4ad + 4kd + 4I) b.
  The LM head adds the logits, S T V (b + 8) bytes (the logits, their fp32 log-softmax kept for the backward,
  and its gradient); a reward model's scalar head adds nothing.
- frozen models the stage holds while it trains, in the precision's dtype (bf16 under `precision: bf16`): the
  reference and reward model of online_dpo / mdloo / rlhf_warp (WARP also its EMA anchor), the teacher of
  distill and of an sft with a `teacher` input. Under ZeRO-3 they are partitioned like the trained model
  (train.distributed.frozen_model; with offload_param in CPU memory), except WARP's EMA anchor, which is updated
  every rollout; otherwise whole on every GPU. DPO scores its reference before training and frees it; rejection
  sampling frees its reward model before its fine-tuning.

The step's layout is the one its `train` configures: plain torch (DDP) without `train.deepspeed`, else its ZeRO
stage and offloads. It fits when its total is at most `headroom` (90 %) of the GPU's memory, the rest left to the
CUDA context, communication buffers and allocator fragmentation. A step that does not fit is told the cheapest
of DDP, ZeRO-2, ZeRO-3, ZeRO-3 with optimizer offload and ZeRO-3 with both offloads that would.

Model shapes come from the preset's models, or for hub models from config.json in the hub cache, else from
HUB_SHAPES (the published configs of the models the recipes use).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmfab.config.model import ModelConfig
from llmfab.errors import ConfigError
from llmfab.stages.base import get_stage

GB = 1e9
HEADROOM = 0.9
PAIR_STAGES = frozenset({"dpo", "online_dpo", "reward_model"})  # chosen and rejected in one forward
REWARD_STAGES = frozenset({"reward_model"})  # the trained model is a sequence classifier (no LM head logits)
FROZEN_WHOLE = frozenset({"ema anchor"})  # frozen models that stay whole under ZeRO-3 (updated as training goes)
MODEL_INPUTS = ("init", "model", "models", "float_model")  # what a step's trained model comes from, in order


@dataclass(frozen=True)
class Layout:
    """How a step's training state is laid out over its GPUs: plain torch, or DeepSpeed ZeRO `stage` with offloads."""

    stage: int | None = None  # None: plain torch (DDP)
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def name(self) -> str:
        if self.stage is None:
            return "ddp"
        return f"zero{self.stage}" + "+offload" * self.offload_optimizer + "+param_offload" * self.offload_param

    @property
    def setting(self) -> str:
        """The train.deepspeed value that configures it."""
        if self.stage is None:
            return "no train.deepspeed"
        offloads = [f"{k}: {{device: cpu}}" for k, on in (("offload_optimizer", self.offload_optimizer),
                    ("offload_param", self.offload_param)) if on]  # fmt: skip
        return "train.deepspeed: {zero_optimization: {" + ", ".join([f"stage: {self.stage}", *offloads]) + "}}"

    @classmethod
    def of(cls, train) -> Layout:
        """The layout `train` (a TrainConfig) runs with."""
        if not train.deepspeed:
            return cls()
        zero = train.deepspeed.get("zero_optimization", {})
        return cls(int(zero.get("stage", 0)), "offload_optimizer" in zero, "offload_param" in zero)


# What a step that does not fit is offered, cheapest first.
CANDIDATES = (Layout(), Layout(2), Layout(3), Layout(3, offload_optimizer=True), Layout(3, True, True))
LAYOUTS = tuple(layout.name for layout in CANDIDATES)


@dataclass(frozen=True)
class Shape:
    """The numbers a decoder's parameter and activation counts need."""

    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None
    tied: bool = True

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its transformers name."""
        h, d = self.hidden, self.d
        return {
            "q_proj": (h, self.heads * d),
            "k_proj": (h, self.kv_heads * d),
            "v_proj": (h, self.kv_heads * d),
            "o_proj": (self.heads * d, h),
            "gate_proj": (h, self.intermediate),
            "up_proj": (h, self.intermediate),
            "down_proj": (self.intermediate, h),
        }

    def layer_params(self) -> int:
        n = sum(i * o for i, o in self.linear_shapes().values())
        n += (4 if self.arch == "gemma2" else 2) * self.hidden  # RMSNorm weights
        if self.arch == "qwen2":
            n += (self.heads + 2 * self.kv_heads) * self.d  # q/k/v biases
        return n

    def params(self, reward: bool = False) -> int:
        head = self.hidden if reward else (0 if self.tied else self.vocab * self.hidden)
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden + head

    def lora_params(self, r: int, targets: str | list[str] | None) -> int:
        shapes = self.linear_shapes()
        if targets in (None, "all-linear"):
            names = list(shapes)
        else:
            wanted = [targets] if isinstance(targets, str) else targets
            names = [n for n in shapes if any(n == t or n.endswith(t) for t in wanted)]
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)

    def layer_activation_elems(self) -> int:
        """Elements the backward keeps per token of one layer (see the module docstring)."""
        h, d = self.hidden, self.d
        return 4 * h + 4 * self.heads * d + 4 * self.kv_heads * d + 4 * self.intermediate


# The published config.json numbers of the hub models the recipes start from (used when the hub cache lacks them).
HUB_SHAPES: dict[str, Shape] = {
    "Qwen/Qwen2-0.5B": Shape("qwen2", 896, 24, 14, 2, 4864, 151936, tied=True),
    "Qwen/Qwen2.5-3B": Shape("qwen2", 2048, 36, 16, 2, 11008, 151936, tied=True),
    "meta-llama/Llama-3.1-8B": Shape("llama", 4096, 32, 32, 8, 14336, 128256, tied=False),
    "google/gemma-2-2b": Shape("gemma2", 2304, 26, 8, 4, 9216, 256000, head_dim=256, tied=True),
    "google/gemma-2-9b": Shape("gemma2", 3584, 42, 16, 8, 14336, 256000, head_dim=256, tied=True),
}


def shape_from_config(cfg: ModelConfig) -> Shape | None:
    if cfg.pretrained:
        return shape_from_ref(cfg.pretrained)
    return Shape(
        cfg.arch,
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.head_dim,
        cfg.tie_word_embeddings,
    )


def shape_from_hf_config(data: dict) -> Shape:
    arch = {"qwen2": "qwen2", "gemma2": "gemma2"}.get(data.get("model_type", ""), "llama")
    return Shape(
        arch,
        data["hidden_size"],
        data["num_hidden_layers"],
        data["num_attention_heads"],
        data.get("num_key_value_heads") or data["num_attention_heads"],
        data["intermediate_size"],
        data["vocab_size"],
        data.get("head_dim"),
        bool(data.get("tie_word_embeddings", False)),
    )


def _hub_config(repo_id: str, revision: str | None) -> dict | None:
    """config.json from the hub cache only (never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # a malformed id or cache: fall back to the table
        return None
    if isinstance(path, str) and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return None


def shape_from_ref(ref: str) -> Shape | None:
    """The shape of a hub id, hf:// URI or local checkpoint folder; None when unknown without downloading."""
    from llmfab.hub import is_hub_uri, parse_hub_uri

    if is_hub_uri(ref):
        hub = parse_hub_uri(ref)
        repo_id, revision = hub.repo_id, hub.revision
    elif Path(ref.removeprefix("file://")).joinpath("config.json").is_file():
        return shape_from_hf_config(json.loads(Path(ref.removeprefix("file://"), "config.json").read_text()))
    elif "://" not in ref and ref.count("/") == 1 and not ref.startswith(("/", ".")):
        repo_id, revision = ref, None  # a bare hub id (ModelConfig.pretrained)
    else:
        return None
    data = _hub_config(repo_id, revision)
    if data is not None:
        try:
            return shape_from_hf_config(data)
        except KeyError:
            pass
    return HUB_SHAPES.get(repo_id)


@dataclass
class Estimate:
    """Bytes per GPU of one layout (see the module docstring)."""

    layout: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    frozen: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.frozen


@dataclass
class StepPlan:
    step: str
    stage: str
    shape: Shape | None
    params: int = 0
    trainable: int = 0
    sequences: int = 0
    seq_len: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    activations: float = 0.0  # without checkpointing
    activations_ckpt: float = 0.0  # with checkpointing
    frozen: float = 0.0
    frozen_names: list[str] = field(default_factory=list)
    layouts: dict[str, Estimate] = field(default_factory=dict)  # the configured layout and the candidates
    layout: str = "ddp"  # the configured one
    fits: bool = False  # the configured layout fits
    note: str = ""

    @property
    def chosen(self) -> Estimate | None:
        return self.layouts.get(self.layout)


def activation_bytes(shape: Shape, sequences: int, seq_len: int, act_bytes: int, *, checkpointing: bool,
                     lm_head: bool = True) -> float:  # fmt: skip
    """Activations of one micro-batch's forward and backward (see the module docstring)."""
    tokens = sequences * seq_len
    per_layer = shape.layer_activation_elems() * tokens * act_bytes
    # With checkpointing: each layer's input kept, one layer's activations recomputed at a time.
    body = shape.layers * tokens * shape.hidden * act_bytes + per_layer if checkpointing else shape.layers * per_layer
    logits = tokens * shape.vocab * (act_bytes + 8) if lm_head else 0
    return body + logits


def state_bytes(params: int, trainable: int, layout: Layout, gpus: int, mixed: bool) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) per GPU. `params` all, `trainable` those AdamW updates."""
    n = max(gpus, 1)
    if layout.stage is None:  # plain torch: fp32 master weights, autocast for bf16
        return 4 * params, 4 * trainable, 8 * trainable
    # DeepSpeed: bf16 weights and gradients, fp32 master + states in the optimizer
    w = 2 if mixed else 4
    weights, grads, optim = w * params, w * trainable, (12 if mixed else 8) * trainable
    if layout.stage >= 1:
        optim /= n
    if layout.stage >= 2:
        grads /= n
    if layout.stage >= 3:
        weights = 0.0 if layout.offload_param else weights / n
    if layout.offload_optimizer:
        optim = 0.0
    return weights, grads, optim


def frozen_bytes(frozen: list[tuple[str, Shape, bool]], layout: Layout, gpus: int, mixed: bool) -> float:
    """The frozen models per GPU: partitioned under ZeRO-3 (in CPU memory with offload_param), else whole."""
    total = 0.0
    for name, shape, reward in frozen:
        whole = shape.params(reward=reward) * (2 if mixed else 4)
        if layout.stage == 3 and name not in FROZEN_WHOLE:
            whole = 0.0 if layout.offload_param else whole / max(gpus, 1)
        total += whole
    return total


def _gather_bytes(shape: Shape, mixed: bool) -> float:
    """ZeRO-3: the parameters of the layer in use and the one prefetched, gathered whole."""
    return 2 * shape.layer_params() * (2 if mixed else 4)


def plan_step(step_id: str, stage: str, config, shape: Shape | None, frozen: list[tuple[str, Shape, bool]],
              gpus: int, gpu_memory_gb: float, headroom: float = HEADROOM) -> StepPlan:  # fmt: skip
    """The plan of one training step; `frozen`: (name, shape, is_reward_model) of the models it holds."""
    train = _train_config(config)
    seq_len = _seq_len(config)
    plan = StepPlan(step_id, stage, shape, precision=train.precision)
    plan.gradient_checkpointing = bool(getattr(train, "gradient_checkpointing", False))
    if shape is None:
        plan.note = "model shape unknown (not a preset model, a hub model in the cache or a known hub id)"
        return plan
    reward = stage in REWARD_STAGES
    plan.params = shape.params(reward=reward)
    lora = getattr(config, "lora", None) if stage != "rejection_sampling" else getattr(config.sft, "lora", None)
    if lora is not None:
        r = getattr(lora, "r", None) or getattr(lora, "rank", None) or 16
        plan.trainable = shape.lora_params(int(r), getattr(lora, "target_modules", None))
    else:
        plan.trainable = plan.params
    plan.sequences = train.batch_size * (2 if stage in PAIR_STAGES else 1)
    plan.seq_len = seq_len
    mixed = train.precision == "bf16"
    act = 2 if mixed else 4
    kw = dict(lm_head=not reward)
    plan.activations = activation_bytes(shape, plan.sequences, seq_len, act, checkpointing=False, **kw)
    plan.activations_ckpt = activation_bytes(shape, plan.sequences, seq_len, act, checkpointing=True, **kw)
    used_act = plan.activations_ckpt if plan.gradient_checkpointing else plan.activations
    plan.frozen = frozen_bytes(frozen, Layout(), gpus, mixed)  # whole
    plan.frozen_names = [name for name, _, _ in frozen]
    configured = Layout.of(train)
    for layout in (configured, *CANDIDATES):
        weights, grads, optim = state_bytes(plan.params, plan.trainable, layout, gpus, mixed)
        if layout.stage == 3 and (gpus > 1 or layout.offload_param):
            weights += _gather_bytes(shape, mixed)
        held = frozen_bytes(frozen, layout, gpus, mixed)
        plan.layouts[layout.name] = Estimate(layout.name, weights, grads, optim, used_act, held)
    budget = headroom * gpu_memory_gb * GB
    plan.layout = configured.name
    plan.fits = plan.layouts[configured.name].total <= budget
    if not plan.fits:
        plan.note = _what_would_fit(plan, budget)
    return plan


def _what_would_fit(plan: StepPlan, budget: float) -> str:
    """The cheapest candidate layout that fits (with checkpointing, when only that makes it fit), as a setting."""
    with_ckpt = [] if plan.gradient_checkpointing else [True]
    for checkpointing in [False, *with_ckpt]:
        for layout in CANDIDATES:
            e = plan.layouts[layout.name]
            total = e.total - e.activations + plan.activations_ckpt if checkpointing else e.total
            if total <= budget:
                ckpt = " and train.gradient_checkpointing: true" if checkpointing else ""
                return f"fits as {layout.name} ({total / GB:.0f} GB): {layout.setting}{ckpt}"
    return ""


def _train_config(config):
    return config.sft.train if not hasattr(config, "train") and hasattr(config, "sft") else config.train


def _seq_len(config) -> int:
    for holder in (config, getattr(config, "sft", None)):
        for name in ("seq_len", "max_len"):
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int):
                return value
    return 0


def is_training_config(config) -> bool:
    from llmfab.train.config import TrainConfig

    if isinstance(getattr(config, "train", None), TrainConfig):
        return True
    return isinstance(getattr(getattr(config, "sft", None), "train", None), TrainConfig)


# -- a recipe's steps -------------------------------------------------------------------------------------------
def _step_of(ref: str) -> tuple[str, str] | None:
    """'STEP.OUTPUT' -> (step, output); None for a URI."""
    from llmfab.config.recipe import is_uri

    if is_uri(ref) or "." not in ref:
        return None
    step, _, output = ref.rpartition(".")
    return step, output


def _first(value) -> str | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def shape_of_ref(recipe, ref: str | None, _seen: frozenset = frozenset()) -> Shape | None:
    """The shape of the model a recipe reference (step output or URI) names, following steps back to a preset
    model or a hub model."""
    if ref is None:
        return None
    parsed = _step_of(ref)
    if parsed is None:
        return shape_from_ref(ref)
    step_id = parsed[0]
    if step_id in _seen:
        return None
    try:
        step = recipe.step(step_id)
    except KeyError:
        return None
    return shape_of_step(recipe, step, _seen | {step_id})


def shape_of_step(recipe, step, _seen: frozenset = frozenset()) -> Shape | None:
    """The shape of the model a step trains (or passes on)."""
    model = getattr(step.config, "model", None)
    if isinstance(model, ModelConfig) and "init" not in step.inputs:
        return shape_from_config(model)
    for name in MODEL_INPUTS:
        if name in step.inputs:
            return shape_of_ref(recipe, _first(step.inputs[name]), _seen)
    return None


def frozen_models(recipe, step) -> list[tuple[str, Shape, bool]]:
    """(name, shape, is_reward_model) of the models `step` holds frozen while it trains."""
    inputs, out = step.inputs, []

    def add(name: str, ref: str | None, reward: bool = False) -> None:
        shape = shape_of_ref(recipe, _first(ref))
        if shape is not None:
            out.append((name, shape, reward))

    if step.stage in ("online_dpo", "mdloo", "rlhf_warp"):
        policy = inputs.get("model")
        add("reference", inputs.get("reference", policy))
        if step.stage == "rlhf_warp":
            add("ema anchor", policy)
        add("reward model", inputs.get("reward_model"), reward=True)
    elif step.stage in ("distill", "sft") and "teacher" in inputs:
        add("teacher", inputs["teacher"])
    elif step.stage == "recover" and "float_model" in inputs:
        add("float model", inputs["float_model"])
    return out


def plan_recipe(recipe, gpus: int, gpu_memory_gb: float, headroom: float = HEADROOM) -> list[StepPlan]:
    """A plan per training step of a resolved recipe (a parallel step once: its runs are alike in size)."""
    plans = []
    for step in recipe.steps:
        if not is_training_config(step.config):
            continue
        shape, frozen = shape_of_step(recipe, step), frozen_models(recipe, step)
        plans.append(plan_step(step.id, step.stage, step.config, shape, frozen, gpus, gpu_memory_gb, headroom))
    return plans


def plan_stage(stage: str, config, inputs: dict, gpus: int, gpu_memory_gb: float) -> StepPlan | None:
    """The plan of one stage run on its own (`llmfab launch`); None when it does not train."""
    from llmfab.config.recipe import ResolvedStep

    if not is_training_config(config):
        return None
    step = ResolvedStep(id=stage, stage=stage, inputs=inputs, config=config)

    class _Alone:  # a recipe of one step: its references are URIs
        @staticmethod
        def step(step_id):
            raise KeyError(step_id)

    recipe = _Alone()
    shape, frozen = shape_of_step(recipe, step), frozen_models(recipe, step)
    return plan_step(stage, stage, config, shape, frozen, gpus, gpu_memory_gb)


def unfit(plans: list[StepPlan]) -> list[StepPlan]:
    """The plans whose configured layout does not fit (a step of unknown shape is not counted: nothing to check)."""
    return [p for p in plans if p.shape is not None and not p.fits]


def gb(value: float) -> str:
    return f"{value / GB:.1f}"


def rows(plans: list[StepPlan]) -> list[list[str]]:
    """The table `llmfab plan` prints: one row per step, memory in GB per GPU."""
    out = []
    for p in plans:
        if p.shape is None:
            out.append([p.step, p.stage, "?", "", "", "", "", "", "", "", "", "", "unknown", p.note])
            continue
        e = p.chosen
        out.append(
            [
                p.step,
                p.stage,
                f"{p.params / 1e9:.2f}B" + ("" if p.trainable == p.params else f" ({p.trainable / 1e6:.1f}M lora)"),
                f"{p.sequences}x{p.seq_len}",
                gb(e.weights),
                gb(e.grads),
                gb(e.optimizer),
                gb(p.activations),
                gb(p.activations_ckpt),
                ("on" if p.gradient_checkpointing else "off"),
                gb(e.frozen) + (f" ({', '.join(p.frozen_names)})" if p.frozen_names else ""),
                gb(e.total),
                p.layout if p.fits else f"{p.layout}: DOES NOT FIT",
                p.note,
            ]
        )
    return out


HEADERS = [
    "step",
    "stage",
    "params",
    "batch",
    "weights",
    "grads",
    "optim",
    "act",
    "act ckpt",
    "ckpt",
    "frozen",
    "total",
    "layout",
    "note",
]


def fit_failure(plans: list[StepPlan], gpus: int | str, gpu_memory: float) -> str | None:
    """The error naming every step whose layout does not fit on `gpus` x `gpu_memory` GB; None when all fit."""
    bad = unfit(plans)
    if not bad:
        return None
    names = ", ".join(f"{p.step} ({p.chosen.total / 1e9:.0f} GB a GPU as {p.layout}{'; ' + p.note if p.note else ''})"
                      for p in bad)  # fmt: skip
    return f"does not fit {gpus} x {gpu_memory:g} GB GPUs: {names}"


def check_recipe_fits(recipe, gpus_of: Callable[[str], int], gpu_memory: float) -> None:
    """`llmfab plan`'s check before a submit: a ConfigError naming every training step that does not fit on the
    GPUs `gpus_of(step id)` gives it."""
    plans, sizes = [], set()
    for step in recipe.steps:
        if is_training_config(step.config):
            n = gpus_of(step.base_id) if step.base_id == step.id else max(gpus_of(step.base_id), gpus_of(step.id))
            sizes.add(n)
            shape, frozen = shape_of_step(recipe, step), frozen_models(recipe, step)
            plans.append(plan_step(step.id, step.stage, step.config, shape, frozen, n, gpu_memory))
    failure = fit_failure(plans, "/".join(map(str, sorted(sizes))), gpu_memory)
    if failure:
        raise ConfigError(f"{failure} (see `llmfab plan`; --no-plan-check skips this check)")


def check_stage_fits(stage: str, data: dict, inputs: dict, gpus: int, gpu_memory: float) -> None:
    """The same check for one stage launched as a TrainJob (`llmfab launch`)."""
    plan = plan_stage(stage, get_stage(stage).make_config(data), inputs, gpus, gpu_memory)
    failure = fit_failure([plan] if plan is not None else [], gpus, gpu_memory)
    if failure:
        raise ConfigError(f"{failure} (see `llmfab plan`; --no-plan-check skips this check)")
