"""Palettization (AFM on-device compression): a weight matrix becomes `bits`-bit indices into a lookup
table (LUT) of 2^bits values found by k-means, one LUT per group of `group_size` rows (output channels)
or columns. A checkpoint stores the packed indices and fp16 LUTs; `load_model` dequantizes them.

Checkpoint files besides the usual config/tokenizer ones:
    palettization.json       format, the settings, per tensor: shape, bits, group size, axis
    palettized.safetensors   NAME.indices (uint8, bit-packed), NAME.lut (fp16, groups x 2^bits), and every
                             tensor kept float (norms, biases, layers an override keeps) under its own name
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from llmfab.config.base import StrictModel
from llmfab.errors import CheckpointError, ConfigError
from llmfab.storage import ObjectStore
from llmfab.storage.checkpoint import MANIFEST, write_checkpoint

FORMAT = "llmfab-palettized/1"
MANIFEST_FILE = "palettization.json"
WEIGHTS_FILE = "palettized.safetensors"
LUT_DTYPE = torch.float16
LUT_BITS = 16
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_CHUNK = 1 << 22  # elements per k-means chunk: bounds memory on large layers
_PACK_CHUNK = 1 << 19  # indices per packing chunk (a multiple of 8: whole bytes at any width)


class PalettizeConfig(StrictModel):
    """Which tensors are palettized at how many bits, and how LUTs are shared."""

    bits: int = Field(4, ge=1, le=8, description="bits per weight of every linear layer no override matches")
    group_size: int = Field(16, gt=0, description="rows (axis=rows) or columns (axis=columns) sharing one LUT")
    axis: Literal["rows", "columns"] = Field("rows", description="rows: groups of output channels share a LUT")
    overrides: dict[str, int | None] = Field(
        default_factory=dict,
        description="regex searched in a linear layer's module name -> its bits (first match wins; null keeps "
        "the layer float), e.g. {mlp: 2}",
    )
    embedding_bits: int | None = Field(
        8,
        ge=1,
        le=8,
        description="the input embedding and the output head (one tensor when tied); 8 bits like AFM's shared "
        "embedding (int8 per channel there); null keeps them float",
    )
    embedding_group_size: int | None = Field(
        None, gt=0, description="group_size for the embeddings (default group_size)"
    )
    float_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="how tensors that are not palettized (norms, biases, float-kept layers) are stored"
    )
    kmeans_iters: int = Field(30, gt=0, description="Lloyd iterations after k-means++ seeding")

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, int | None]) -> dict[str, int | None]:
        for pattern, bits in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
            if bits is not None and not 1 <= bits <= 8:
                raise ValueError(f"{pattern!r}: bits must be 1-8 (or null to keep the layer float), got {bits}")
        return value

    def bits_for(self, module_name: str) -> int | None:
        for pattern, bits in self.overrides.items():
            if re.search(pattern, module_name):
                return bits
        return self.bits


# -- k-means --------------------------------------------------------------------------------------


def kmeans_1d(x: torch.Tensor, k: int, *, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Sorted centroids (G, k) of k-means on each row of `x` (G, n): seeded k-means++, then Lloyd.

    One-dimensional, so each row is sorted once: a cluster is then a contiguous run of it, found by a
    binary search for the midpoints between centroids, and its sum is a difference of prefix sums, so a
    Lloyd step costs O(k log n) per row. k-means++ never picks a point already on a centroid, so a row
    with at most k distinct values gets each of them as a centroid and is reproduced exactly.
    """
    xs = x.float().sort(1).values
    g, n = xs.shape
    gen = torch.Generator(device=xs.device).manual_seed(seed)

    def pick(weights: torch.Tensor) -> torch.Tensor:
        # Inverse-CDF draw: the first point whose cumulative weight exceeds u has a positive weight.
        cdf = weights.cumsum(1)
        u = torch.rand(g, 1, generator=gen, device=xs.device) * cdf[:, -1:]
        return xs.gather(1, torch.searchsorted(cdf, u, right=True).clamp_max(n - 1))

    centroids = [pick(torch.ones_like(xs))]
    dist = (xs - centroids[0]) ** 2
    for _ in range(1, k):
        # A row whose points all sit on centroids picks its last point: an empty duplicate is harmless.
        c = pick(dist)
        centroids.append(c)
        dist = torch.minimum(dist, (xs - c) ** 2)
    del dist
    cents = torch.cat(centroids, 1).sort(1).values
    prefix = torch.nn.functional.pad(xs.double().cumsum(1), (1, 0))
    last = torch.full((g, 1), n, device=xs.device)
    for _ in range(iters):
        # assign() puts a value equal to a midpoint in the lower cluster: cluster j ends after the last
        # sorted value <= its upper midpoint.
        ends = torch.cat([torch.searchsorted(xs, (cents[:, 1:] + cents[:, :-1]) / 2, right=True), last], 1)
        starts = torch.nn.functional.pad(ends[:, :-1], (1, 0))
        counts = ends - starts
        sums = prefix.gather(1, ends) - prefix.gather(1, starts)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), cents.double()).float().sort(1).values
        if torch.equal(new, cents):
            break
        cents = new
    return cents


def assign(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's sorted `lut` (G, k) for every value of `x` (G, n)."""
    bounds = ((lut[:, 1:] + lut[:, :-1]) / 2).contiguous()
    return torch.searchsorted(bounds, x.contiguous())


# -- bit packing ----------------------------------------------------------------------------------


def pack_bits(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices (< 2^bits) as a flat uint8 bit stream, most significant bit first, zero-padded to a byte."""
    flat = indices.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits - 1, -1, -1, device=flat.device)
    place = 2 ** torch.arange(7, -1, -1, device=flat.device)
    out = []
    step = _PACK_CHUNK
    for i in range(0, flat.numel(), step):
        stream = ((flat[i : i + step, None] >> shifts) & 1).reshape(-1)
        stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
        out.append((stream.reshape(-1, 8) * place).sum(1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` indices of a pack_bits stream (int64)."""
    shifts = torch.arange(7, -1, -1, device=packed.device)
    place = 2 ** torch.arange(bits - 1, -1, -1, device=packed.device)
    out = []
    step = _PACK_CHUNK
    for i in range(0, count, step):
        n = min(step, count - i)
        chunk = packed[i * bits // 8 : -(-(i + n) * bits // 8)].to(torch.int64)
        stream = ((chunk[:, None] >> shifts) & 1).reshape(-1)[: n * bits]
        out.append((stream.reshape(n, bits) * place).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


# -- one tensor -----------------------------------------------------------------------------------


@dataclass
class PalettizedTensor:
    indices: torch.Tensor  # uint8, bit-packed
    lut: torch.Tensor  # (groups, 2^bits), fp16, sorted per group
    shape: tuple[int, int]
    bits: int
    group_size: int
    axis: str

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def storage_bits(self) -> int:
        """Bits it takes on disk: packed indices plus the LUTs."""
        return self.indices.numel() * 8 + self.lut.numel() * LUT_BITS

    def spec(self) -> dict:
        return {"shape": list(self.shape), "bits": self.bits, "group_size": self.group_size, "axis": self.axis}


def _grouped(w: torch.Tensor, axis: str, group_size: int) -> tuple[torch.Tensor, int]:
    """(groups, group_size * other_dim) view of `w`; a short last group is padded with copies of its own
    rows (it clusters the same values, just weighted), and the effective group size is returned."""
    m = w if axis == "rows" else w.t()
    rows, cols = m.shape
    gs = min(group_size, rows)
    groups = -(-rows // gs)
    pad = groups * gs - rows
    if pad:
        last = m[(groups - 1) * gs :]
        m = torch.cat([m, last.repeat(-(-pad // len(last)), 1)[:pad]])
    return m.reshape(groups, gs * cols), gs


def palettize_tensor(
    w: torch.Tensor, bits: int, group_size: int, axis: str = "rows", *, iters: int = 30, seed: int = 0
) -> PalettizedTensor:
    """k-means LUT per group and the nearest-entry index of every weight (against the fp16 LUT, so
    dequantizing reproduces exactly what was measured)."""
    if w.ndim != 2:
        raise ValueError(f"palettize a 2-D weight, got shape {tuple(w.shape)}")
    grouped, gs = _grouped(w.detach().float(), axis, group_size)
    per_chunk = max(1, _CHUNK // grouped.shape[1])
    luts, indices = [], []
    for i in range(0, len(grouped), per_chunk):
        x = grouped[i : i + per_chunk]
        lut = kmeans_1d(x, 2**bits, iters=iters, seed=seed + i).to(LUT_DTYPE).sort(1).values
        luts.append(lut)
        indices.append(assign(x, lut.float()))
    idx = torch.cat(indices)
    rows = w.shape[0] if axis == "rows" else w.shape[1]
    idx = idx.reshape(-1, idx.shape[1] // gs)[:rows]  # drop the padding rows
    return PalettizedTensor(pack_bits(idx, bits), torch.cat(luts), tuple(w.shape), bits, gs, axis)


def dequantize(p: PalettizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = p.shape if p.axis == "rows" else p.shape[::-1]
    groups = len(p.lut)
    idx = unpack_bits(p.indices, p.bits, rows * cols)
    idx = torch.nn.functional.pad(idx, (0, (groups * p.group_size - rows) * cols))  # a short last group
    values = p.lut.float().gather(1, idx.reshape(groups, p.group_size * cols)).reshape(-1, cols)[:rows]
    return (values if p.axis == "rows" else values.t()).contiguous().to(dtype)


# -- a model --------------------------------------------------------------------------------------


@dataclass
class PalettizedModel:
    palettized: dict[str, PalettizedTensor]
    floats: dict[str, torch.Tensor]  # stored as config.float_dtype
    config: PalettizeConfig
    layers: list[dict] = field(default_factory=list)  # per palettized tensor: name, bits, rel_error

    def summary(self) -> dict[str, float]:
        """Bits per weight of the palettized tensors (LUTs included) and of the whole model."""
        pal_params = sum(p.numel for p in self.palettized.values())
        pal_bits = sum(p.storage_bits for p in self.palettized.values())
        float_params = sum(t.numel() for t in self.floats.values())
        float_bits = float_params * torch.finfo(FLOAT_DTYPES[self.config.float_dtype]).bits
        lut_bits = sum(p.lut.numel() * LUT_BITS for p in self.palettized.values())
        return {
            "bits_per_weight": pal_bits / pal_params,
            "lut_bits_per_weight": lut_bits / pal_params,
            "bits_per_weight_model": (pal_bits + float_bits) / (pal_params + float_params),
            "palettized_params": float(pal_params),
            "float_params": float(float_params),
        }


def plan_layers(model: torch.nn.Module, config: PalettizeConfig) -> dict[str, tuple[int | None, int]]:
    """weight name -> (bits or None for float, group size) for every linear layer and the embeddings.

    The output head is governed by embedding_bits (when tied it is the embedding itself, stored once);
    every other nn.Linear by bits/overrides. Raises ConfigError naming an override that matches no layer.
    """
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    emb_group = config.embedding_group_size or config.group_size
    plan, seen, used = {}, set(), set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear | torch.nn.Embedding) or weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        if module is inp or module is out:
            plan[f"{name}.weight"] = (config.embedding_bits, emb_group)
        elif isinstance(module, torch.nn.Linear):
            matched = next((p for p in config.overrides if re.search(p, name)), None)
            used.add(matched)
            plan[f"{name}.weight"] = (config.bits_for(name), config.group_size)
    unused = [p for p in config.overrides if p not in used]
    if unused:
        layers = sorted({re.sub(r"\.\d+\.", ".N.", n.removesuffix(".weight")) for n in plan})
        raise ConfigError(f"overrides.{unused[0]}: matches no linear layer; layers: {', '.join(layers)}")
    if not any(bits for bits, _ in plan.values()):
        raise ConfigError("overrides/embedding_bits: every layer is kept float; nothing to palettize")
    return plan


@torch.no_grad()
def palettize_model(
    model: torch.nn.Module, config: PalettizeConfig, *, seed: int = 0, progress: Callable | None = None
) -> PalettizedModel:
    """Palettize `model`'s planned weights; every other tensor of its state dict is kept float."""
    plan = plan_layers(model, config)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:  # a tied head is the embedding: store it once
            seen.add(tensor.data_ptr())
            state[name] = tensor
    todo = [n for n in state if plan.get(n, (None, 0))[0]]
    out = PalettizedModel({}, {}, config)
    for i, name in enumerate(progress(todo, desc="palettize") if progress else todo):
        bits, group = plan[name]
        w = state[name].float()
        p = palettize_tensor(w, bits, group, config.axis, iters=config.kmeans_iters, seed=seed * 100_003 + i)
        err = float(((dequantize(p) - w) ** 2).sum() / (w**2).sum().clamp_min(1e-30))
        out.palettized[name] = p
        bpw = p.storage_bits / p.numel
        out.layers.append(
            {"tensor": name, "bits": bits, "groups": len(p.lut), "bits_per_weight": bpw, "rel_error": err}
        )
    dtype = FLOAT_DTYPES[config.float_dtype]
    out.floats = {n: t.detach().to(dtype).contiguous() for n, t in state.items() if n not in out.palettized}
    return out


# -- checkpoints ----------------------------------------------------------------------------------


def is_palettized(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def write_palettized_files(pm: PalettizedModel, model, tokenizer, folder: str | Path) -> None:
    """The palettized model's files (plus config, generation config and tokenizer) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    tensors = {n: t.cpu() for n, t in pm.floats.items()}
    for name, p in pm.palettized.items():
        tensors[f"{name}.indices"], tensors[f"{name}.lut"] = p.indices.cpu(), p.lut.cpu().contiguous()
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "config": pm.config.model_dump(mode="json"),
        "float_dtype": pm.config.float_dtype,
        "palettized": {n: p.spec() for n, p in pm.palettized.items()},
        "float": {n: list(t.shape) for n, t in pm.floats.items()},
        "summary": pm.summary(),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def save_palettized(pm: PalettizedModel, model, tokenizer, store: ObjectStore, meta: dict | None = None) -> str:
    """Write the palettized model as one atomic checkpoint at `store`; returns its URI."""
    with tempfile.TemporaryDirectory(prefix="llmfab-pal-") as tmp:
        write_palettized_files(pm, model, tokenizer, tmp)
        return write_checkpoint(store, tmp, meta)


def read_palettization(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: unknown format {manifest.get('format') if isinstance(manifest, dict) else ''!r}"
        )
    return manifest


def load_palettized_state(folder: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The dequantized state dict of a palettized checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = read_palettization(folder)
    tensors = load_file(folder / WEIGHTS_FILE)
    state = {}
    for name, spec in manifest["palettized"].items():
        try:
            p = PalettizedTensor(
                tensors[f"{name}.indices"],
                tensors[f"{name}.lut"],
                tuple(spec["shape"]),
                spec["bits"],
                spec["group_size"],
                spec["axis"],
            )
        except KeyError as exc:
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: {name}: missing {exc}") from None
        state[name] = dequantize(p, dtype)
    for name in manifest["float"]:
        if name not in tensors:
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: missing float tensor {name}")
        state[name] = tensors[name].to(dtype)
    return state


def load_palettized(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers causal LM with the dequantized weights of a palettized checkpoint folder."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    model_cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # from_pretrained (not from_config + load_state_dict): the same loading, tying and buffer set-up as
    # any checkpoint, and no random initialisation of weights that are about to be overwritten.
    model = model_cls.from_pretrained(None, config=config, state_dict=load_palettized_state(folder, dtype), dtype=dtype)
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model


def copy_palettized_files(src: str | Path, dest: str | Path) -> None:
    """Copy a palettized checkpoint's files (not its store manifest or any adapter) into `dest`."""
    src, dest = Path(src), Path(dest)
    for path in src.rglob("*"):
        rel = path.relative_to(src).as_posix()
        if path.is_file() and rel != MANIFEST and not rel.startswith("adapter_"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)


def weights_bytes(folder: str | Path) -> int:
    """Bytes of a checkpoint folder's weight files (*.safetensors, adapters included)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
