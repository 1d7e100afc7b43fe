"""promote: move the champion alias to the version the register stage made (a pipeline runs it only when
register's decision is "promote").

The gate is evaluated again against the champion of the moment with the rules register used, so a champion
promoted by a concurrent pipeline in between is not overwritten by a worse model; the verdict, the promotion
(who, when, the previous champion) or the refusal are recorded on the version as tags.
"""

from __future__ import annotations

import json
import logging

from pydantic import Field, field_validator

from llmfab.errors import LlmfabError
from llmfab.registry.promotion import promote
from llmfab.registry.registration import REGISTRATION_FILE, check_alias, tracked_run, write_registration
from llmfab.stages.base import StageConfig, StageContext, stage
from llmfab.storage import open_store

log = logging.getLogger(__name__)


class PromoteConfig(StageConfig):
    alias: str | None = Field(None, description="alias to move [default: the registration's champion_alias]")
    force: bool = Field(False, description="promote without the gate, even when register decided keep")
    reason: str = Field("", description="why, recorded on the version [default: the gate's reasons]")

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str | None) -> str | None:
        return None if value is None else check_alias(value)


def read_registration(uri: str) -> dict:
    store = open_store(uri)
    if not store.exists(REGISTRATION_FILE):
        raise LlmfabError(f"promote: {uri}: no {REGISTRATION_FILE} (the register stage's `registration` output)")
    try:
        data = json.loads(store.get_text(REGISTRATION_FILE))
    except json.JSONDecodeError as exc:
        raise LlmfabError(f"promote: {store.uri_for(REGISTRATION_FILE)}: invalid JSON: {exc.msg}") from None
    missing = [k for k in ("name", "version", "decision") if k not in data]
    if missing:
        raise LlmfabError(f"promote: {store.uri_for(REGISTRATION_FILE)}: missing {', '.join(missing)}")
    return data


@stage(
    "promote",
    PromoteConfig,
    inputs={"registration": "the register stage's registration"},
    outputs={"registration": "the registration, updated with the promotion's outcome"},
)
def run(config: PromoteConfig, inputs: dict, ctx: StageContext) -> dict[str, str]:
    """Set the champion alias on the registered version (gate re-checked against the current champion)."""
    reg = read_registration(inputs["registration"])
    alias = config.alias or reg.get("champion_alias") or "champion"
    if reg["decision"] != "promote" and not config.force:
        raise LlmfabError(
            f"promote: {reg['name']} v{reg['version']}: register decided {reg['decision']!r} "
            f"({'; '.join(reg.get('reasons', []))}); run promote only on 'promote', or set force: true"
        )
    with tracked_run(ctx.run, ctx.step_id, ctx.parent_run_id) as run:
        client = run.client
        result = promote(
            client,
            reg["name"],
            reg["version"],
            alias=alias,
            rules=reg.get("gate") or [],
            gate=not config.force,
            by=f"stage {ctx.step_id} (run {run.run_id})",
            reason=config.reason,
        )
        run.set_tags({"llmfab.promotion.status": result.status, "llmfab.promotion.alias": alias})
        aliases = sorted(client.get_model_version(reg["name"], reg["version"]).aliases)
    if result.status == "refused":
        log.warning("promote: %s v%s refused: %s", reg["name"], reg["version"], "; ".join(result.reasons))
    updated = {
        **reg,
        "aliases": aliases,
        "promotion": {**result.to_dict(), "forced": config.force},
    }
    return {"registration": write_registration(ctx.output("registration"), updated)}
