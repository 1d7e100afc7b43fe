"""Where a model came from: walk the pipeline's stage runs back from the model's URI.

Every stage run of a pipeline is a child of the pipeline's MLflow run and carries `llmfab.input.NAME` (URI, or a
Python list of URIs) and `llmfab.output.NAME` tags; matching an input URI to the output that produced it gives the
chain of steps, the parent checkpoints and the data, each with a content hash.
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass, field

from llmfab.data.version import DATA_FINGERPRINT_TAG
from llmfab.errors import LlmfabError
from llmfab.hub import is_hub_uri, repo_type_of
from llmfab.storage.content import content_hash

INPUT_TAG = "llmfab.input."
OUTPUT_TAG = "llmfab.output."


@dataclass
class Artifact:
    uri: str
    kind: str  # checkpoint | data | external (not in an object store: e.g. a hub repo, model or dataset)
    sha256: str | None
    key: str  # PRODUCER_STEP.OUTPUT, or CONSUMER_STEP.INPUT for a pipeline input nothing in it produced


@dataclass
class Lineage:
    model: Artifact
    pipeline_run_id: str | None = None
    family: str | None = None
    preset: str | None = None
    git_commit: str | None = None
    data_fingerprint: str | None = None  # the pipeline run's (llmfab.data.version), what `llmfab retrain` compares
    steps: list[str] = field(default_factory=list)  # producing steps, nearest first
    checkpoints: list[Artifact] = field(default_factory=list)  # ancestors of the model (tokenizers included)
    data: list[Artifact] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def describe(uri: str, key: str) -> Artifact:
    """Classify `uri` and hash its content: a checkpoint by its manifest, a dataset (prefix or single file) by its
    files' bytes; anything the store does not hold (a hub id) is `external` and unhashed."""
    kind, sha256 = content_hash(uri)
    return Artifact(uri, kind, sha256, key)


def hub_model(uri: str, input_name: str) -> bool:
    """Whether `uri` is a model on the hub (a released checkpoint: a parent, not data), decided as the runner
    decides it: `hf://models/...`, or a plain `hf://ORG/NAME` given to an input that is not a data input."""
    return is_hub_uri(uri) and repo_type_of(uri, input_name) == "model"


def parse_uris(value: str) -> list[str]:
    """A tag value as URIs: the runner writes a list input as its Python repr."""
    if value.startswith("["):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        return [str(v) for v in parsed] if isinstance(parsed, list) else [value]
    return [value]


def stage_runs(client, parent_run_id: str) -> list:
    """The pipeline's child runs, finished ones first (a retried step's FAILED attempt loses to its success)."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=5000
    )
    return sorted(runs, key=lambda r: (r.info.status != "FINISHED", -(r.info.start_time or 0)))


def collect_lineage(client, model_uri: str, parent_run_id: str | None) -> Lineage:
    """The model's lineage within the pipeline run `parent_run_id` (just the model itself without one)."""
    model = describe(model_uri, "model")
    if model.kind != "checkpoint":
        raise LlmfabError(f"{model_uri}: not a checkpoint (no MANIFEST.json): only store checkpoints are registered")
    lineage = Lineage(model)
    if not parent_run_id:
        return lineage
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    lineage.pipeline_run_id = parent_run_id
    lineage.family = tags.get("llmfab.family")
    lineage.preset = tags.get("llmfab.preset")
    lineage.git_commit = tags.get("llmfab.system.git_commit")
    lineage.data_fingerprint = tags.get(DATA_FINGERPRINT_TAG)
    producers: dict[str, tuple[object, str]] = {}
    for run in stage_runs(client, parent_run_id):
        for tag, value in run.data.tags.items():
            if tag.startswith(OUTPUT_TAG):
                producers.setdefault(value, (run, tag[len(OUTPUT_TAG) :]))
    if model_uri in producers:
        run, output = producers[model_uri]
        lineage.model.key = f"{run.data.tags.get('llmfab.step', run.info.run_name)}.{output}"
    seen = {model_uri}
    frontier = [model_uri]
    while frontier:
        uri = frontier.pop(0)
        if uri not in producers:
            continue
        run, _ = producers[uri]
        step = run.data.tags.get("llmfab.step", run.info.run_name)
        if step not in lineage.steps:
            lineage.steps.append(step)
        lineage.git_commit = lineage.git_commit or run.data.tags.get("llmfab.system.git_commit")
        for tag, value in sorted(run.data.tags.items()):
            if not tag.startswith(INPUT_TAG):
                continue
            for i, ref in enumerate(parse_uris(value)):
                if ref in seen:
                    continue
                seen.add(ref)
                if ref in producers:
                    producer, output = producers[ref]
                    key = f"{producer.data.tags.get('llmfab.step', producer.info.run_name)}.{output}"
                    frontier.append(ref)
                else:
                    key = f"{step}.{tag[len(INPUT_TAG) :]}" + (f".{i}" if value.startswith("[") else "")
                art = describe(ref, key)
                parent = art.kind == "checkpoint" or hub_model(ref, tag[len(INPUT_TAG) :])
                (lineage.checkpoints if parent else lineage.data).append(art)
    return lineage


def lineage_tags(lineage: Lineage) -> dict[str, str]:
    """Model-version tags: searchable lineage (`llmfab.parent.KEY`, `llmfab.data.KEY`, each with `.sha256`)."""
    tags = {
        "llmfab.model_uri": lineage.model.uri,
        "llmfab.model_sha256": lineage.model.sha256 or "",
        "llmfab.model_step": lineage.model.key,
        "llmfab.lineage.steps": ",".join(lineage.steps),
    }
    for name in ("pipeline_run_id", "family", "preset", "git_commit", "data_fingerprint"):
        if getattr(lineage, name):
            tags[f"llmfab.{name}"] = getattr(lineage, name)
    for prefix, items in (("llmfab.parent", lineage.checkpoints), ("llmfab.data", lineage.data)):
        for art in items:
            tags[f"{prefix}.{art.key}"] = art.uri
            if art.sha256:
                tags[f"{prefix}.{art.key}.sha256"] = art.sha256
    return tags
