"""Promotion by alias (`candidate`, `champion`; MLflow's deprecated stages are never used).

The gate promotes a candidate only when it beats the current champion on every configured metric by more than
that metric's margin, and, for a rule with `stderr_k: k`, by more than k combined standard errors
k·sqrt(se_candidate² + se_champion²) (each version's `<metric>_stderr`, as lm-eval and the gold reward report it),
so that a gain within the noise of a finite benchmark does not promote. Every verdict, promotion and refusal is
written onto the model version as tags (the latest in `llmfab.gate.*` / `llmfab.promotion.*`, all of them in
`llmfab.history`), so the registry itself is the log.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import time
from dataclasses import dataclass, field

from pydantic import Field

from llmfab.config.base import StrictModel, validate
from llmfab.registry.register import RegistryError, version_metrics

GATE_TAG = "llmfab.gate."
PROMOTION_TAG = "llmfab.promotion."
HISTORY_TAG = "llmfab.history"
RULES_TAG = "llmfab.gate.rules"  # the rules the version was registered with: `llmfab promote --gate` reuses them
HISTORY_CHARS = 20_000  # the newest entries that fit (tag values may be longer, but stay readable)


class GateRule(StrictModel):
    metric: str = Field(..., min_length=1, description="an evaluation metric (a version tag llmfab.metric.NAME)")
    margin: float = Field(0.0, ge=0, description="the candidate must beat the champion by more than this")
    higher_is_better: bool = True
    stderr_k: float | None = Field(
        None,
        gt=0,
        description="the gain must also exceed this many combined standard errors sqrt(se_c² + se_champion²), "
        "read from both versions' METRIC_stderr",
    )


def stderr_of(metric: str) -> str:
    """The metric holding `metric`'s standard error (lm-eval's and the gold reward's naming)."""
    return f"{metric}_stderr"


def _noise_check(rule: GateRule, gain: float, candidate: dict, incumbent: dict) -> tuple[bool, str]:
    """Whether `gain` exceeds stderr_k · sqrt(se_c² + se_i²), with the numbers; refused when a stderr is missing."""
    name = stderr_of(rule.metric)
    missing = [who for who, metrics in (("candidate", candidate), ("champion", incumbent)) if name not in metrics]
    if missing:
        return False, f"no {name} for the {' and '.join(missing)}: cannot tell the gain from noise"
    se_c, se_i = candidate[name], incumbent[name]
    bound = rule.stderr_k * math.sqrt(se_c**2 + se_i**2)
    ok = gain > bound
    return ok, (
        f"gain {gain:+.6g} {'>' if ok else '<='} {rule.stderr_k:g} × sqrt({se_c:.4g}² + {se_i:.4g}²) = {bound:.6g}"
    )


@dataclass
class GateResult:
    decision: str  # promote | keep
    reasons: list[str]
    champion: str | None  # the version compared against
    time: str = field(default_factory=lambda: now())

    @property
    def promote(self) -> bool:
        return self.decision == "promote"


@dataclass
class Promotion:
    status: str  # promoted | refused | unchanged
    name: str
    version: str
    alias: str
    previous: str | None
    reasons: list[str]
    gate: GateResult | None = None

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "previous": self.previous,
            "reasons": self.reasons,
        }


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "unknown")


def parse_rules(rules: list | None) -> list[GateRule]:
    """Gate rules from dicts; ConfigError naming the rule and field when one is invalid."""
    return [
        r if isinstance(r, GateRule) else validate(GateRule, r, f"gate rule {i}") for i, r in enumerate(rules or [])
    ]


def rules_from_tag(mv) -> list[GateRule]:
    """The gate rules a version was registered with (its `llmfab.gate.rules` tag)."""
    text = mv.tags.get(RULES_TAG)
    try:
        return parse_rules(json.loads(text)) if text else []
    except (json.JSONDecodeError, TypeError) as exc:
        raise RegistryError(f"version {mv.version}: tag {RULES_TAG} is not a JSON list of rules ({exc})") from None


def get_version(client, name: str, version: str | None = None, alias: str | None = None):
    """A model version by number or alias; RegistryError naming what is missing."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model {name!r}") from None
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise RegistryError(f"registered model {name!r} has no {what}") from None


def alias_holder(client, name: str, alias: str):
    """The version holding `alias`, or None."""
    try:
        return get_version(client, name, alias=alias)
    except RegistryError:
        return None


def evaluate_gate(client, name: str, version: str, rules: list, champion_alias: str = "champion") -> GateResult:
    """Whether version `version` should replace the holder of `champion_alias`, with the reasons."""
    rules = parse_rules(rules)
    champion = alias_holder(client, name, champion_alias)
    if champion is None:
        return GateResult("promote", [f"no {champion_alias} yet"], None)
    held = str(champion.version)  # MLflow hands versions back as int or str depending on the store
    if held == str(version):
        return GateResult("keep", [f"version {version} already is the {champion_alias}"], held)
    if not rules:
        return GateResult("keep", ["no gate rules configured: a champion is replaced only by hand"], held)
    candidate = version_metrics(get_version(client, name, version))
    incumbent = version_metrics(champion)
    reasons, passed = [], True
    for rule in rules:
        if rule.metric not in candidate:
            reasons.append(f"{rule.metric}: candidate has no value")
            passed = False
            continue
        value = candidate[rule.metric]
        if rule.metric not in incumbent:
            # A metric added to the gate after the champion was measured must not lock the champion in forever.
            reasons.append(f"{rule.metric}={value:.6g}: {champion_alias} v{held} has no value, not compared")
            continue
        best = incumbent[rule.metric]
        gain = value - best if rule.higher_is_better else best - value
        ok = gain > rule.margin
        direction = "higher" if rule.higher_is_better else "lower"
        reason = (
            f"{rule.metric}: {value:.6g} vs {best:.6g} (v{held}), {direction} is better, "
            f"gain {gain:+.6g} {'>' if ok else '<='} margin {rule.margin:g}"
        )
        if rule.stderr_k is not None:
            beyond_noise, why = _noise_check(rule, gain, candidate, incumbent)
            ok &= beyond_noise
            reason += f"; {why}"
        passed &= ok
        reasons.append(reason)
    return GateResult("promote" if passed else "keep", reasons, held)


def _append_history(client, name: str, version: str, entry: dict) -> None:
    mv = client.get_model_version(name, version)
    history = [*json.loads(mv.tags.get(HISTORY_TAG) or "[]"), entry]
    while len(history) > 1 and len(json.dumps(history)) > HISTORY_CHARS:
        history.pop(0)
    client.set_model_version_tag(name, version, HISTORY_TAG, json.dumps(history))


def _set_tags(client, name: str, version: str, tags: dict) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def record_gate(client, name: str, version: str, result: GateResult, by: str) -> None:
    """Write a gate verdict onto the version (latest in llmfab.gate.*, appended to llmfab.history)."""
    _set_tags(
        client,
        name,
        version,
        {
            f"{GATE_TAG}decision": result.decision,
            f"{GATE_TAG}reasons": json.dumps(result.reasons),
            f"{GATE_TAG}time": result.time,
            f"{GATE_TAG}against": result.champion or "none",
            f"{GATE_TAG}by": by,
        },
    )
    entry = {"event": "gate", "decision": result.decision, "against": result.champion, "time": result.time, "by": by}
    _append_history(client, name, version, {**entry, "reasons": result.reasons})


def set_alias(client, name: str, version: str, alias: str, by: str) -> None:
    """Point `alias` at `version` (e.g. `candidate` after registration), noting it in the version's history."""
    client.set_registered_model_alias(name, alias, str(version))
    _append_history(client, name, str(version), {"event": "alias", "alias": alias, "time": now(), "by": by})


def promote(
    client,
    name: str,
    version: str,
    *,
    alias: str = "champion",
    rules: list | None = None,
    gate: bool = True,
    by: str | None = None,
    reason: str = "",
) -> Promotion:
    """Move `alias` to `version` if the gate passes (or `gate=False`: by hand, forced). Records the verdict, the
    promotion (who, why, when, the previous holder) or the refusal as tags; never raises for a refusal."""
    version = str(get_version(client, name, version).version)
    by = by or whoami()
    previous = alias_holder(client, name, alias)
    prev_version = str(previous.version) if previous is not None else None
    if prev_version == version:
        return Promotion("unchanged", name, version, alias, prev_version, [f"version {version} already is {alias}"])
    result = None
    if gate:
        result = evaluate_gate(client, name, version, rules or [], alias)
        record_gate(client, name, version, result, by)
        if not result.promote:
            _set_tags(
                client,
                name,
                version,
                {f"{PROMOTION_TAG}refused.time": result.time, f"{PROMOTION_TAG}refused.alias": alias},
            )
            return Promotion("refused", name, version, alias, prev_version, result.reasons, result)
    reasons = result.reasons if result else [f"forced by {by}: gate skipped"]
    when = now()
    client.set_registered_model_alias(name, alias, version)
    _set_tags(
        client,
        name,
        version,
        {
            f"{PROMOTION_TAG}alias": alias,
            f"{PROMOTION_TAG}time": when,
            f"{PROMOTION_TAG}by": by,
            f"{PROMOTION_TAG}reason": reason or "; ".join(reasons),
            f"{PROMOTION_TAG}previous": prev_version or "none",
            f"{PROMOTION_TAG}forced": str(not gate).lower(),
        },
    )
    entry = {"event": "promoted", "alias": alias, "previous": prev_version, "time": when, "by": by}
    _append_history(client, name, version, {**entry, "reason": reason, "forced": not gate})
    if prev_version is not None:
        _set_tags(client, name, prev_version, {"llmfab.demotion.time": when, "llmfab.demotion.replaced_by": version})
        _append_history(
            client, name, prev_version, {"event": "demoted", "alias": alias, "replaced_by": version, "time": when}
        )
    client.set_registered_model_tag(
        name,
        f"llmfab.{alias}",
        json.dumps({"version": version, "previous": prev_version, "time": when, "by": by, "reason": reason}),
    )
    return Promotion("promoted", name, version, alias, prev_version, reasons, result)
