"""Load models from a hub id, an hf:// URI, a local folder or an object-store URI; save them (with their tokenizer) as
atomic checkpoints (HF format files + manifest)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from llmfab.checkpoint_refs import ADAPTER_CONFIG, loadable_folder
from llmfab.checkpoint_refs import resolve_ref as resolve_ref  # re-exported: callers resolve refs from here
from llmfab.errors import CheckpointError
from llmfab.models.dtypes import DTYPES
from llmfab.models.palettize import is_palettized, load_palettized
from llmfab.storage import ObjectStore
from llmfab.storage.checkpoint import write_checkpoint
from llmfab.tokenizer import load_tokenizer
from llmfab.train.distributed import barrier, is_main_process

ADAPTER_WEIGHTS = "adapter_model.safetensors"
STORED_DTYPE = "_llmfab_stored_dtype"  # on a loaded model: the dtype its checkpoint holds, what save_model writes
# Weights load from safetensors only (no pickle), and a checkpoint's own Python code never runs: transformers would
# otherwise load a pytorch_model.bin, or ask on stdin whether to run a config's `auto_map` code.
SAFE_LOADING = {"trust_remote_code": False, "use_safetensors": True}
# Big checkpoints load shard by shard into empty (meta-device) modules, never a random-initialised copy first: what
# transformers 5 always does (it ignores the flag), and 4.x does with it.
LOW_MEMORY = {"low_cpu_mem_usage": True}


def frozen_dtype(train) -> str:
    """The dtype a training stage loads the models it holds frozen in (reference, reward model, teacher): bf16 under
    `precision: bf16` (they only run forwards, under bf16 autocast anyway), else fp32. The trained model itself
    keeps fp32 master weights (see TrainConfig.precision)."""
    return "bfloat16" if train.precision == "bf16" else "float32"


def load_model(
    ref: str | Path,
    *,
    dtype: str = "float32",
    device="cpu",
    kind: str = "causal_lm",
    merge_adapter: bool = True,
    quantization_config=None,
):
    """Load a causal LM (or, with kind='reward', a sequence-classification reward model).

    A palettized checkpoint (see models.palettize) is dequantized to `dtype`. A checkpoint holding a
    LoRA adapter (peft's adapter_config.json) gets it applied: merged into the weights, or with
    merge_adapter=False as a peft model whose base stays as loaded. `quantization_config` (e.g. QLoRA's
    BitsAndBytesConfig, see train.lora) goes to transformers' from_pretrained.
    """
    import transformers

    loading = {**SAFE_LOADING, **LOW_MEMORY}
    if quantization_config:
        loading["quantization_config"] = quantization_config

    folder = loadable_folder(ref)
    if Path(folder).is_dir() and not (Path(folder) / "config.json").is_file():
        raise CheckpointError(f"{ref}: holds no model (no config.json): a tokenizer-only folder given as a model?")
    if (Path(folder) / ADAPTER_CONFIG).is_file() and not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{ref}: an adapter loads from {ADAPTER_WEIGHTS} only (pickled .bin files are not)")
    if kind == "causal_lm":
        if is_palettized(folder):
            model = load_palettized(folder, DTYPES[dtype])
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], **loading)
        model = _with_pad_id(_with_adapter(model, folder, merge_adapter), folder).to(device)
        setattr(model, STORED_DTYPE, stored_dtype(folder))
        return model
    if kind != "reward":
        raise ValueError(f"unknown model kind {kind!r}")
    if is_palettized(folder) or (Path(folder) / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{ref}: a palettized or adapter checkpoint loads as a causal LM only, not a reward model")
    # From a causal LM checkpoint the scalar head is new (initialised from the torch RNG).
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=DTYPES[dtype], num_labels=1, **loading
    )
    model = _with_pad_id(model, folder).to(device)
    setattr(model, STORED_DTYPE, stored_dtype(folder))
    return model


def _with_pad_id(model, folder: str):
    """A config without pad_token_id (Llama 3.x bases) gets the pad its tokenizer pads with (tokenizer.
    ensure_pad_token), else its EOS: transformers refuses padded batches for sequence classification without
    one, and generate() warns and guesses. The generation config is kept in step."""
    if model.config.pad_token_id is not None:
        return model
    pad = None
    if Path(folder).is_dir() and any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        pad = load_tokenizer(folder).pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    if pad is None:
        raise CheckpointError(f"{folder}: the model config has neither pad_token_id nor eos_token_id")
    model.config.pad_token_id = pad
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad
    return model


def _with_adapter(model, folder: str, merge: bool):
    if not (Path(folder) / ADAPTER_CONFIG).is_file():
        return model
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, folder, is_trainable=False)
    if not merge:
        return peft_model
    merged = peft_model.merge_and_unload().requires_grad_(True)  # trainable, as any model loaded here
    # transformers' from_pretrained attaches an adapter it finds beside float weights itself (peft's then takes
    # its layers over); merged, the model holds no adapter and must save whole, not as its (gone) adapter.
    merged._hf_peft_config_loaded = False
    return merged


def save_model(model, tokenizer, store: ObjectStore, meta: dict | None = None, *, dtype: str | None = None) -> str:
    """Write model (safetensors) and tokenizer as one atomic checkpoint at `store`; returns its URI.

    The weights go out in `dtype`, by default the dtype they came in (load_model records it; a from-scratch model
    is built in its config's): a bf16 hub checkpoint trained with fp32 master weights is written in bf16, half the
    size and what vLLM or TGI load, and a tiny fp32 model stays fp32. Pass dtype="float32" for a state a rerun
    resumes from. Under torchrun every rank holds the same weights: rank 0 writes while the others wait for it."""
    if not is_main_process():
        barrier()
        return store.uri
    target = DTYPES.get(dtype or getattr(model, STORED_DTYPE, None) or "")
    weights = _cast_weights(model, target) if target is not None else None
    with tempfile.TemporaryDirectory(prefix="llmfab-ckpt-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights else {}))
        if weights:
            config = Path(tmp) / "config.json"
            data = json.loads(config.read_text())
            config.write_text(json.dumps({**data, "dtype": str(target).removeprefix("torch.")}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        uri = write_checkpoint(store, tmp, meta)
    barrier()
    return uri


def _cast_weights(model, target) -> dict | None:
    """The state dict in `target` when any floating weight is in another dtype (else None: saved as it is); a tied
    weight (the LM head sharing the embeddings) appears once, as save_pretrained writes it."""
    state = model.state_dict()
    if all(not t.is_floating_point() or t.dtype == target for t in state.values()):
        return None
    out, seen = {}, set()
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.to(target) if tensor.is_floating_point() else tensor
    return out


def stored_dtype(folder: str | Path) -> str | None:
    """The dtype a checkpoint's config.json says its weights are stored in (`dtype`, or `torch_dtype` before
    transformers 5), when it is one llmfab knows."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    name = data.get("dtype") or data.get("torch_dtype")
    return name if name in DTYPES else None
