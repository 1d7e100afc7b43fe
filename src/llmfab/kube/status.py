"""Reading a TrainJob's status: its phase, a one-line summary, and what to look at when it failed.

Trainer v2 copies its Complete / Failed conditions from the JobSet's terminal conditions; status.jobsStatus
counts each replicated job's active / ready / succeeded / failed Jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Trainer v2 condition types (pkg/apis/trainer/v1alpha1/trainjob_types.go); Created is set by releases
# that report JobSet creation. Complete and Failed are terminal.
COMPLETE, FAILED, SUSPENDED, CREATED = "Complete", "Failed", "Suspended", "Created"
RUNNING, PENDING = "Running", "Pending"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on every pod of the TrainJob's JobSet


@dataclass(frozen=True)
class StatusChange:
    """One reported change of a TrainJob's status."""

    phase: str  # Pending, Created, Running, Suspended, Complete or Failed
    text: str  # one line: phase, conditions, per-job counts
    status: dict = field(default_factory=dict)  # .status as the API served it

    def __str__(self) -> str:
        return self.text


def _condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def _is_true(status: dict, kind: str) -> bool:
    cond = _condition(status, kind)
    return cond is not None and cond.get("status") == "True"


def trainjob_phase(obj: dict) -> str:
    """Complete / Failed (terminal), Suspended, Running (a child Job has active pods), Created, or Pending."""
    status = obj.get("status") or {}
    if _is_true(status, COMPLETE):
        return COMPLETE
    if _is_true(status, FAILED):
        return FAILED
    if _is_true(status, SUSPENDED):
        return SUSPENDED
    jobs = status.get("jobsStatus") or []
    if any((job.get("active") or 0) > 0 for job in jobs):
        return RUNNING
    if _is_true(status, CREATED) or jobs:
        return CREATED
    return PENDING


def _jobs_text(status: dict) -> str:
    parts = []
    for job in status.get("jobsStatus") or []:
        counts = ", ".join(f"{job.get(k) or 0} {k}" for k in ("active", "ready", "succeeded", "failed"))
        suspended = f", {job['suspended']} suspended" if job.get("suspended") else ""
        parts.append(f"{job.get('name', '?')}: {counts}{suspended}")
    return "; ".join(parts)


def describe_status(obj: dict) -> StatusChange:
    status = obj.get("status") or {}
    phase = trainjob_phase(obj)
    conds = ", ".join(
        f"{c.get('type')}={c.get('status')}" + (f" ({c['reason']})" if c.get("reason") else "")
        for c in status.get("conditions") or []
    )
    jobs = _jobs_text(status)
    text = phase + (f" | conditions: {conds}" if conds else "") + (f" | jobs: {jobs}" if jobs else "")
    return StatusChange(phase, text, status)


def failure_message(obj: dict, namespace: str, name: str) -> str:
    """Why the TrainJob failed, and the command that shows its pods' logs."""
    status = obj.get("status") or {}
    cond = _condition(status, FAILED) or {}
    reason = cond.get("reason") or "no reason given"
    message = f": {cond['message']}" if cond.get("message") else ""
    jobs = f" Jobs: {_jobs_text(status)}." if status.get("jobsStatus") else ""
    return (
        f"TrainJob {namespace}/{name} failed ({reason}{message}).{jobs} Logs: kubectl -n {namespace} logs "
        f"-l {JOBSET_NAME_LABEL}={name} --all-containers --prefix --tail=200"
    )
