"""Register a checkpoint as a version of an MLflow registered model, at most once per content.

Small models are logged with MLflow's transformers flavour (a self-contained artifact: `mlflow.transformers.
load_model("models:/NAME@champion")` works anywhere); large ones are registered by their object-store URI as
`source`, so the registry points at the checkpoint instead of copying its weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from llmfab.errors import LlmfabError
from llmfab.storage import open_store
from llmfab.storage.checkpoint import read_manifest, verify_checkpoint
from llmfab.storage.content import checkpoint_hash

log = logging.getLogger(__name__)

FINGERPRINT_TAG = "llmfab.fingerprint"
FORMAT_TAG = "llmfab.registration"  # transformers | uri
LOAD_TAG = "llmfab.load"
PARAMETERS_TAG = "llmfab.parameters"
METRIC_TAG = "llmfab.metric."
MODES = ("auto", "transformers", "uri")
ARTIFACT_PATH = "model"
MODEL_ID_TAG = "llmfab.model_id"  # on a version: the MLflow LoggedModel it was registered from
_BYTES = {"float32": 4, "float": 4, "float64": 8, "float16": 2, "half": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


class RegistryError(LlmfabError):
    """A registered model, version or alias is missing, or a registration cannot be done."""


@dataclass
class Registered:
    name: str
    version: str
    source: str
    format: str  # transformers | uri
    created: bool  # False: an equal version already existed and was reused
    fingerprint: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def fingerprint(name: str, model_uri: str) -> str:
    """The registration's identity: the model name and the checkpoint's content (not where it is stored, nor when
    it was written), so re-running a pipeline that reproduces the same weights finds the version it made before."""
    content = checkpoint_hash(read_manifest(open_store(model_uri)))
    return hashlib.sha256(f"{name}\0{content}".encode()).hexdigest()


def checkpoint_dtype(model_uri: str) -> str:
    """The dtype config.json records (float32 when it says nothing)."""
    store = open_store(model_uri)
    if not store.exists("config.json"):
        return "float32"
    config = json.loads(store.get_text("config.json"))
    return str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")


def estimate_parameters(model_uri: str) -> int:
    """Parameter count from the manifest's weight-file sizes and config.json's dtype: no weights are read."""
    files = read_manifest(open_store(model_uri))["files"]
    weight_bytes = sum(e["size"] for n, e in files.items() if n.endswith((".safetensors", ".bin", ".pt")))
    return weight_bytes // _BYTES.get(checkpoint_dtype(model_uri), 4)


def find_version(client, name: str, fp: str):
    """The version of `name` already registered with fingerprint `fp`, or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{FINGERPRINT_TAG}` = '{fp}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def ensure_registered_model(client, name: str, description: str | None = None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created concurrently
            client.get_registered_model(name)


def pip_requirements() -> list[str]:
    """Pinned to what is installed (the CPU wheel's `+cpu` local tag dropped): MLflow's inference of them would
    import torchvision."""
    reqs = []
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "accelerate"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def choose_mode(mode: str, model_uri: str, max_flavor_parameters: int) -> tuple[str, int]:
    if mode not in MODES:
        raise RegistryError(f"log_model {mode!r}: expected one of {', '.join(MODES)}")
    params = estimate_parameters(model_uri)
    if mode == "auto":
        mode = "transformers" if params <= max_flavor_parameters else "uri"
    return mode, params


def _log_transformers(client, model_id: str, model_uri: str, metadata: dict) -> None:
    """The checkpoint in the transformers flavour as the artifacts of LoggedModel `model_id`."""
    import huggingface_hub
    import mlflow.transformers

    from llmfab.models import load_model, load_tokenizer
    from llmfab.models.architectures import DTYPES

    dtype = checkpoint_dtype(model_uri)  # keep a bf16 checkpoint bf16 in the artifact, not upcast
    model = load_model(model_uri, dtype=dtype if dtype in DTYPES else "float32")
    tokenizer = load_tokenizer(model_uri)
    # A trained checkpoint has no hub repo: named by its store URI (not a valid repo id) and given its own card,
    # mlflow does not spend ~45 s of retries looking a card and a license up on the hub for it.
    model.name_or_path = model_uri
    card = huggingface_hub.ModelCard(f"# {model_uri}\n\nTrained by llmfab; lineage in the registering MLflow run.\n")
    with tempfile.TemporaryDirectory(prefix="llmfab-register-") as tmp:
        path = Path(tmp) / ARTIFACT_PATH
        mlflow.transformers.save_model(
            {"model": model, "tokenizer": tokenizer},
            str(path),
            task="text-generation",
            pip_requirements=pip_requirements(),
            metadata=metadata,
            model_card=card,
        )
        client.log_model_artifacts(model_id, str(path))


def logged_model(client, run_id: str, name: str, tags: dict[str, str], fill=None) -> str:
    """An MLflow 3 LoggedModel for the registering run `run_id` (the run's Models tab links it, and the version
    registers from it): `fill(model_id)` uploads its artifacts, if it has any; READY once done, FAILED if not."""
    experiment_id = client.get_run(run_id).info.experiment_id
    created = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags, model_type="llm")
    try:
        if fill is not None:
            fill(created.model_id)
    except BaseException:
        client.finalize_logged_model(created.model_id, "FAILED")
        raise
    client.finalize_logged_model(created.model_id, "READY")
    from mlflow.entities import LoggedModelOutput

    client.log_outputs(run_id, [LoggedModelOutput(created.model_id, 0)])  # the run's "Logged models"
    return created.model_id


def register_checkpoint(
    client,
    name: str,
    model_uri: str,
    *,
    mode: str = "auto",
    max_flavor_parameters: int = 100_000_000,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    description: str | None = None,
) -> Registered:
    """Register the checkpoint at `model_uri` under `name`, or return the version that already holds the same
    content. `run_id` (the registering run) holds the transformers-flavour artifacts and links the version."""
    verify_checkpoint(open_store(model_uri))  # a partial or corrupt checkpoint is never registered
    fp = fingerprint(name, model_uri)
    ensure_registered_model(client, name)
    existing = find_version(client, name, fp)
    if existing is not None:
        log.info("%s: version %s already holds this checkpoint (fingerprint %s)", name, existing.version, fp[:12])
        return Registered(name, str(existing.version), existing.source, existing.tags.get(FORMAT_TAG, ""), False, fp)
    mode, params = choose_mode(mode, model_uri, max_flavor_parameters)
    meta = {FINGERPRINT_TAG: fp, "llmfab.model_uri": model_uri, FORMAT_TAG: mode}
    model_id = None
    if mode == "transformers":
        if run_id is None:
            raise RegistryError("log_model transformers: the model is logged into a run; give run_id")
        fill = functools.partial(_log_transformers, client, model_uri=model_uri, metadata=meta)
        model_id = logged_model(client, run_id, ARTIFACT_PATH, meta, fill)
        source = client.get_logged_model(model_id).artifact_location  # where models:/<model_id> points
        load = f"mlflow.transformers.load_model('models:/{name}@ALIAS') or llmfab.registry.load_registered(...)"
    else:
        # Above the flavour's size limit the weights stay where they are; the LoggedModel records where.
        model_id = logged_model(client, run_id, ARTIFACT_PATH, meta) if run_id else None
        source = model_uri
        load = (
            f"llmfab.registry.load_registered('models:/{name}@ALIAS'), i.e. llmfab.models.load_model('{source}') "
            "(an llmfab checkpoint: HF files + MANIFEST.json, verified on download)"
        )
    all_tags = {**(tags or {}), FINGERPRINT_TAG: fp, FORMAT_TAG: mode, LOAD_TAG: load, PARAMETERS_TAG: str(params)}
    if model_id:
        all_tags[MODEL_ID_TAG] = model_id
    mv = client.create_model_version(
        name, source, run_id=run_id, tags=all_tags, description=description, model_id=model_id
    )
    if model_id:  # the LoggedModel's link to its version, as mlflow.register_model writes it (the UI reads it)
        client.set_logged_model_tags(
            model_id, {"mlflow.modelVersions": json.dumps([{"name": name, "version": mv.version}])}
        )
    return Registered(name, str(mv.version), mv.source, mode, True, fp)


HEADLINE_METRICS = ("gold_reward", "heldout_loss", "win_rate_gold", "win_rate_rm", "kl_to_reference", "rm_score")


BENCHMARK = "lm_eval."  # lm-evaluation-harness metrics: lm_eval.<task>.<metric>[.<filter>], stderr in <name>_stderr


def benchmark_scores(metrics: dict[str, float]) -> list[str]:
    """ "<task> <metric> <value> ± <stderr>" for every lm-eval score, a group's members (tasks named <group>_...,
    as MMLU's 57 subjects) summarised by the group's own score."""
    scores = {k: v for k, v in metrics.items() if k.startswith(BENCHMARK) and not k.endswith("_stderr")}
    tasks = {k[len(BENCHMARK) :].split(".", 1)[0] for k in scores}
    out = []
    for name in sorted(scores):
        task, _, metric = name[len(BENCHMARK) :].partition(".")
        if any(task.startswith(f"{group}_") for group in tasks):
            continue
        se = metrics.get(f"{name}_stderr")
        out.append(f"{task} {metric} {scores[name]:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
    return out


def version_description(intro: str | None, metrics: dict[str, float], decision: str, reasons: list[str]) -> str:
    """A model version's description (Markdown, as the registry UI shows it): the evaluation, the benchmark scores
    and the gate."""
    own = {k: v for k, v in metrics.items() if not k.startswith(BENCHMARK)}
    shown = [k for k in HEADLINE_METRICS if k in own] or sorted(own)[:8]
    lines = [intro.strip(), ""] if intro else []
    if shown:
        lines += ["**Evaluation** (held out): " + ", ".join(f"{k} {metrics[k]:.4g}" for k in shown), ""]
    if scores := benchmark_scores(metrics):
        lines += ["**Benchmarks** (lm-evaluation-harness):" + "".join(f"\n- {s}" for s in scores), ""]
    lines.append(f"**Gate**: {decision}" + "".join(f"\n- {r}" for r in reasons))
    return "\n".join(lines)


def metric_tags(metrics: dict[str, float]) -> dict[str, str]:
    return {f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()}


def version_metrics(mv) -> dict[str, float]:
    """A version's `llmfab.metric.*` tags as numbers."""
    out = {}
    for key, value in mv.tags.items():
        if key.startswith(METRIC_TAG):
            try:
                out[key[len(METRIC_TAG) :]] = float(value)
            except ValueError:
                continue
    return out
