"""register: the pipeline's final model into the MLflow Model Registry, with its lineage, as the `candidate`.

The version carries the lineage as tags (pipeline run, family, preset, git commit, parent checkpoints and data
with content hashes) and the evaluation metrics (`llmfab.metric.*`). Re-running a pipeline that reproduces the same
weights reuses the version it registered before. The gate's verdict against the current champion is the stage's
`decision` value ("promote" / "keep"); a pipeline runs the `promote` stage only on "promote": this stage never
moves the champion alias itself.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

from pydantic import Field, field_validator

from llmfab.errors import ConfigError, LlmfabError
from llmfab.registry.lineage import collect_lineage, lineage_tags
from llmfab.registry.promotion import RULES_TAG, GateRule, evaluate_gate, record_gate, set_alias
from llmfab.registry.register import metric_tags, register_checkpoint, version_description
from llmfab.registry.registration import check_alias, tracked_run, write_registration
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.storage import open_store
from llmfab.storage.checkpoint import read_manifest

log = logging.getLogger(__name__)

REPORT_FILES = ("evaluation.json", "report.json", "metrics.json")


class RegisterConfig(StageConfig):
    name: str | None = Field(
        None, min_length=1, description="registered model name [default: llmfab-FAMILY, from the pipeline run]"
    )
    log_model: Literal["auto", "transformers", "uri"] = Field(
        "auto",
        description="transformers: MLflow transformers flavour (a copy of the weights); uri: the checkpoint's store "
        "URI as the version's source (no copy); auto: transformers up to max_flavor_parameters",
    )
    max_flavor_parameters: int = Field(100_000_000, ge=0, description="auto: the largest model logged as a flavour")
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    gate: list[GateRule] = Field(
        default_factory=list,
        description="rules the candidate must all pass to replace the champion, e.g. "
        "[{metric: gold_reward, margin: 0.01, higher_is_better: true}]; none: only a first champion is promoted",
    )
    description: str | None = Field(None, description="text for a newly created version")

    @field_validator("candidate_alias", "champion_alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        return check_alias(value)


def _numbers(mapping: dict) -> dict[str, float]:
    return {str(k): float(v) for k, v in mapping.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def report_metrics(data) -> dict[str, float]:
    """{metric: value} from an evaluation report: the evaluate stage's {"metrics": {...}, "rows": [...]}, rows of
    {metric, value}, an MLflow table ({"columns", "data"}), or a flat mapping of numbers."""
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        return _numbers(data["metrics"])
    if isinstance(data, dict) and isinstance(data.get("columns"), list) and isinstance(data.get("data"), list):
        cols = data["columns"]
        if "metric" in cols and "value" in cols:
            data = [dict(zip(cols, row, strict=False)) for row in data["data"]]
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        data = data["rows"]
    if isinstance(data, list):
        rows = [r for r in data if isinstance(r, dict) and "metric" in r]
        return _numbers({r["metric"]: r.get("value") for r in rows})
    if isinstance(data, dict):
        return _numbers(data)
    return {}


def read_report(uri: str) -> tuple[dict[str, float], str | None]:
    """(metrics, the model the report is about if it says) from the JSON report at `uri` (a file or a prefix)."""
    store = open_store(uri)
    keys = [k for k in store.list() if k.endswith(".json")]
    if keys:
        key = next((k for k in REPORT_FILES if k in keys), keys[0])
    else:  # the URI is the file itself
        parent, _, key = uri.rstrip("/").rpartition("/")
        store = open_store(parent)
        if not key.endswith(".json") or not store.exists(key):
            raise LlmfabError(f"register: report {uri}: no JSON evaluation report found")
    try:
        data = json.loads(store.get_text(key))
    except json.JSONDecodeError as exc:
        raise LlmfabError(
            f"register: report {store.uri_for(key)}: invalid JSON at line {exc.lineno}: {exc.msg}"
        ) from None
    metrics = report_metrics(data)
    if not metrics:
        raise LlmfabError(f"register: report {store.uri_for(key)}: no numeric metrics in it")
    about = data.get("model") if isinstance(data, dict) else None
    return metrics, about if isinstance(about, str) else None


@stage(
    "register",
    RegisterConfig,
    inputs={"model": "the aligned final checkpoint"},
    optional_inputs={"report": "the evaluate stage's report: its metrics go on the version and into the gate"},
    outputs={"registration": "registration.json: name, version, model_uri, source, aliases, decision, reasons"},
    values={"decision": "the gate's verdict: promote (beats the champion) or keep"},
)
def run(config: RegisterConfig, inputs: dict, ctx: StageContext) -> dict[str, str]:
    """Register the final model with its lineage as the candidate; the gate decides promote/keep."""
    from llmfab.tracking.mlflow_tracker import git_commit

    model_uri = inputs["model"]
    with tracked_run(ctx.run, ctx.step_id, ctx.parent_run_id) as run:
        client = run.client
        lineage = collect_lineage(client, model_uri, ctx.parent_run_id)
        name = config.name or (f"llmfab-{lineage.family}" if lineage.family else None)
        if not name:
            raise ConfigError(
                "register: name: not set, and there is no pipeline run with an llmfab.family tag to default it from"
            )
        if "report" in inputs:
            metrics, about = read_report(inputs["report"])
            if about is not None and about != model_uri:
                raise LlmfabError(f"register: report {inputs['report']} evaluates {about}, not {model_uri}")
        else:  # the producing stage's final metrics, which save_model keeps in the manifest
            metrics = _numbers(read_manifest(open_store(model_uri)).get("meta") or {})
        ctx.log_metrics({f"candidate.{k}": v for k, v in metrics.items()})
        run.log_dict(lineage.to_dict(), "lineage.json")
        tags = {
            **lineage_tags(lineage),
            **metric_tags(metrics),
            "llmfab.register_run_id": run.run_id,
            RULES_TAG: json.dumps([r.model_dump() for r in config.gate]),
        }
        tags.setdefault("llmfab.git_commit", git_commit() or "unknown")
        if "report" in inputs:
            tags["llmfab.report"] = inputs["report"]
        reg = register_checkpoint(
            client,
            name,
            model_uri,
            mode=config.log_model,
            max_flavor_parameters=config.max_flavor_parameters,
            run_id=run.run_id,
            tags=tags,
            description=config.description,
        )
        if not reg.created:
            # Same weights again: keep the first registration's lineage; a new evaluation report and the gate
            # rules of this run replace the old ones (the manifest's metrics are the same as at first).
            refresh = {RULES_TAG: tags[RULES_TAG], "llmfab.reregistered_by_run": run.run_id}
            if "report" in inputs:
                refresh.update({**metric_tags(metrics), "llmfab.report": inputs["report"]})
            for key, value in refresh.items():
                client.set_model_version_tag(name, reg.version, key, value)
        by = f"stage {ctx.step_id} (run {run.run_id})"
        set_alias(client, name, reg.version, config.candidate_alias, by)
        verdict = evaluate_gate(client, name, reg.version, config.gate, config.champion_alias)
        record_gate(client, name, reg.version, verdict, by)
        summary = version_description(config.description, metrics, verdict.decision, verdict.reasons)
        client.update_model_version(name, reg.version, description=summary)
        run.set_tags({"llmfab.registered_model": name, "llmfab.registered_version": reg.version})
        aliases = sorted(client.get_model_version(name, reg.version).aliases)
    log.info(
        "register: %s v%s (%s, %s): %s",
        name,
        reg.version,
        reg.format,
        "new" if reg.created else "reused",
        verdict.decision,
    )
    registration = {
        "name": name,
        "version": reg.version,
        "model_uri": reg.model_uri,
        "source": reg.source,
        "format": reg.format,
        "checkpoint": model_uri,
        "fingerprint": reg.fingerprint,
        "created": reg.created,
        "aliases": aliases,
        "candidate_alias": config.candidate_alias,
        "champion_alias": config.champion_alias,
        "decision": verdict.decision,
        "reasons": verdict.reasons,
        "champion": verdict.champion,
        "gate": [r.model_dump() for r in config.gate],
        "metrics": metrics,
    }
    return {"registration": write_registration(ctx.output("registration"), registration), "decision": verdict.decision}
