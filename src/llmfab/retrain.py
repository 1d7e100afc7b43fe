"""`llmfab retrain`: decide whether a family's pipeline runs again, then run it on KFP (or locally) and report the
registry's verdict.

The decision, first reason that holds:
    forced          --force (a person or a CI input asked)
    no champion     the registered model has no `champion` yet
    new data        the recipe's data fingerprint (llmfab.data.version) differs from the champion's
    schedule        the champion is older than `max_age_days`
otherwise nothing runs. The pipeline itself evaluates, registers the new model as `candidate` and promotes it to
`champion` only if it passes the gate; `retrain --wait` reports which happened.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from llmfab.config.recipe import Recipe
from llmfab.data.version import DATA_FINGERPRINT_TAG
from llmfab.errors import ConfigError
from llmfab.registry.promotion import alias_holder
from llmfab.runs.plan import RunPlan, plan_run

CHAMPION = "champion"
CANDIDATE = "candidate"


@dataclass
class Decision:
    retrain: bool
    reason: str
    model_name: str
    data_fingerprint: str
    champion_version: str | None = None
    champion_data_fingerprint: str | None = None


@dataclass
class Outcome:
    decision: Decision
    ran: str = ""  # "", or the executor that ran it: "kfp" or "kfp-local"
    run_id: str | None = None  # the KFP run id, or the local pipeline's MLflow run id
    state: str | None = None  # the KFP run's final state (with --wait), "SUCCEEDED" for a local run
    candidate_version: str | None = None  # after the run: the registry's candidate and champion
    champion_version: str | None = None
    promoted: bool | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def registered_name(recipe: Recipe) -> str:
    """The registered model a family's pipeline writes: its register step's `name`, else llmfab-FAMILY."""
    for step in recipe.steps:
        if step.stage == "register":
            return getattr(step.config, "name", None) or f"llmfab-{recipe.family}"
    raise ConfigError(f"recipe {recipe.family}: no register step, so no registered model to retrain")


def decide(
    client, plan: RunPlan, *, force: bool = False, max_age_days: float | None = None, now: float | None = None
) -> Decision:
    """Whether the planned run should happen, against the champion in the registry `client` talks to."""
    name = registered_name(plan.recipe)
    fingerprint = plan.data_fingerprint
    champion = alias_holder(client, name, CHAMPION)
    decision = Decision(False, "", name, fingerprint)
    if champion is not None:
        decision.champion_version = str(champion.version)
        decision.champion_data_fingerprint = champion.tags.get(DATA_FINGERPRINT_TAG)
    if force:
        decision.retrain, decision.reason = True, "forced"
    elif champion is None:
        decision.retrain, decision.reason = True, f"{name} has no {CHAMPION}"
    elif decision.champion_data_fingerprint != fingerprint:
        was = (decision.champion_data_fingerprint or "unknown")[:12]
        decision.retrain, decision.reason = True, f"new data version ({was} -> {fingerprint[:12]})"
    else:
        age_days = ((now or time.time()) * 1000 - champion.creation_timestamp) / 86_400_000
        if max_age_days is not None and age_days > max_age_days:
            decision.retrain, decision.reason = True, f"schedule: {CHAMPION} is {age_days:.1f} days old"
        else:
            decision.reason = f"{CHAMPION} v{champion.version} is current (same data, {age_days:.1f} days old)"
    return decision


def _registry_state(client, outcome: Outcome, pipeline_run_id: str | None) -> None:
    """Candidate and champion after the run; promoted = the champion is this run's model."""
    name = outcome.decision.model_name
    candidate, champion = alias_holder(client, name, CANDIDATE), alias_holder(client, name, CHAMPION)
    outcome.candidate_version = str(candidate.version) if candidate else None
    outcome.champion_version = str(champion.version) if champion else None
    if champion is not None and pipeline_run_id:
        outcome.promoted = champion.tags.get("llmfab.pipeline_run_id") == pipeline_run_id
    elif champion is not None and candidate is not None:
        outcome.promoted = champion.version == candidate.version
    else:
        outcome.promoted = False


def retrain(
    family: str,
    preset: str = "tiny",
    *,
    overrides: list[str] | None = None,
    host: str | None = None,
    force: bool = False,
    max_age_days: float | None = None,
    wait: bool = True,
    timeout_s: float = 24 * 3600.0,
    dry_run: bool = False,
    store: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    namespace: str | None = None,
    registry: str | None = None,
    tag: str | None = None,
    client=None,
    kfp_client=None,
) -> Outcome:
    """Decide; if it says so, run `family`'s pipeline on the KFP at `host` (else locally through kfp.local)."""
    from llmfab.registry.loading import registry_client
    from llmfab.runs.kfp_local import KfpLocal
    from llmfab.runs.kfp_server import KfpServer

    plan = plan_run(family, preset, overrides, store_uri=store, tracking_uri=tracking_uri, experiment=experiment,
                    run_name=run_name)  # fmt: skip
    client = client or registry_client(tracking_uri)
    outcome = Outcome(decide(client, plan, force=force, max_age_days=max_age_days))
    if not outcome.decision.retrain or dry_run:
        return outcome
    if host:
        executor = KfpServer(host, namespace=namespace, registry=registry, tag=tag, wait=wait, timeout_s=timeout_s,
                             client=kfp_client)  # fmt: skip
    else:
        executor = KfpLocal()
    result = executor.run(plan)
    outcome.ran, outcome.state = executor.name, result.state
    outcome.run_id = result.kfp_run_id or result.run_id
    if result.state == "SUCCEEDED":
        _registry_state(client, outcome, result.run_id)
    return outcome
