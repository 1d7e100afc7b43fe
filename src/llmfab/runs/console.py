"""What `llmfab run` shows a person: a line per finished step with its headline numbers, a progress bar for the
task that is running, and at the end what the model learned, what was registered and how to look at it."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmfab.runs.plan import RunPlan
from llmfab.runs.result import PipelineResult, StepRun

TAIL_LINES = 30  # of a failed task's log


def _num(value: float | None) -> str:
    if value is None:
        return "–"
    if float(value).is_integer() and abs(value) >= 1:  # counts (pairs, kept answers)
        return f"{value:,.0f}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"


def _change(metrics: dict, key: str) -> str | None:
    """`before → after` of a metric the stage logs both ways, else its value."""
    if key not in metrics:
        return None
    before = metrics.get(f"{key}_before")
    return f"{_num(before)} → {_num(metrics[key])}" if before is not None else _num(metrics[key])


# (label, metric): the first few a step has are its headline.
HEADLINE = (
    ("loss", "train_loss"),
    ("held-out loss", "eval_loss"),
    ("gold", "gold_reward"),
    ("RM acc", "eval_accuracy"),
    ("pairs", "pairs"),
    ("kept", "kept"),
    ("win (gold)", "win_rate_gold"),
    ("KL", "kl_to_reference"),
    ("bits/weight", "bits_per_weight"),
)


def step_line(step: StepRun) -> str:
    mark = "[green]✓[/]" if step.status == "FINISHED" else "[red]✗[/]"
    parts = [f"{label} {text}" for label, key in HEADLINE if (text := _change(step.metrics, key))][:3]
    if step.values.get("decision"):
        parts.append(f"gate: {step.values['decision']}")
    return f"{step.name:<22} {mark} {step.seconds:5.0f} s  " + "  ".join(parts)


class RunConsole:
    """The callbacks an executor calls while it runs, and the summary after it."""

    def __init__(self, console: Console | None = None):
        # Not a terminal (CI, a pipe): no wrapping at 80 columns, so a line stays one line.
        terminal = sys.__stdout__.isatty()
        self.console = console or Console(file=sys.__stdout__, highlight=False, width=None if terminal else 160)
        self.progress: Progress | None = None
        self._bars: dict[str, int] = {}

    def start(self, plan: RunPlan, runner: str) -> None:
        self.console.print(
            f"[bold]{plan.run_name}[/]: {plan.family} at preset {plan.preset} ({len(plan.recipe.steps)} steps, "
            f"{runner}); tracking {plan.tracking.resolved_uri}, checkpoints under {plan.run_store_uri}"
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_step(self, step: StepRun) -> None:
        self.console.print(step_line(step))

    def on_progress(self, task: str, done: int, total: int) -> None:
        if not self.console.is_terminal:
            return
        if self.progress is None:
            # Live only while a bar shows: an empty live display adds a blank line at every refresh.
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                console=self.console, transient=True,
            )  # fmt: skip
            self.progress.start()
        if task not in self._bars:
            self._bars[task] = self.progress.add_task(task, total=total)
        self.progress.update(self._bars[task], completed=done, total=total)

    def on_task(self, task: str, status: str, log: Path) -> None:
        if task in self._bars and self.progress is not None:
            self.progress.remove_task(self._bars.pop(task))
            if not self._bars:
                self.stop()
        if status != "SUCCESS":
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()[-TAIL_LINES:]
            self.console.print(f"[red]✗ task {task} failed[/]; the last {len(lines)} lines of {log}:")
            self.console.print("\n".join(lines), markup=False, highlight=False)

    def callbacks(self) -> dict[str, Callable]:
        return {"on_step": self.on_step, "on_task": self.on_task, "on_progress": self.on_progress}

    def summary(self, plan: RunPlan, result: PipelineResult) -> None:
        self.stop()
        self.console.print(f"[bold]{result.run_name}[/] finished in {result.seconds:.0f} s ({result.runner})")
        table = learned_table(plan, result)
        if table is not None:
            self.console.print(table)
        for line in registry_lines(plan, result):
            self.console.print(line)
        for line in look_lines(plan, result):
            self.console.print(line, soft_wrap=True)


def _first(plan: RunPlan, result: PipelineResult, stage: str) -> StepRun | None:
    names = [name for s in plan.recipe.steps if s.stage == stage for name, _ in s.runs()]
    return next((result.steps[n] for n in names if n in result.steps), None)


def learned_table(plan: RunPlan, result: PipelineResult) -> Table | None:
    """Base → SFT → final model on the held-out measurements, when the recipe has an SFT and an evaluate step."""
    sft, final = _first(plan, result, "sft"), _first(plan, result, "evaluate")
    if sft is None or final is None:
        return None
    s, f = sft.metrics, final.metrics
    table = Table(title="What the model learned (held out)", title_justify="left")
    for column in ("", "base", "SFT", "final"):
        table.add_column(column, justify="left" if not column else "right")
    rows = {
        "gold reward": (s.get("gold_reward_before"), s.get("gold_reward"), f.get("gold_reward")),
        "held-out loss": (s.get("eval_loss_before"), s.get("eval_loss"), f.get("heldout_loss")),
    }
    for label, values in rows.items():
        table.add_row(label, *map(_num, values))
    wins = f"{_num(f.get('win_rate_gold'))} / {_num(f.get('win_rate_rm'))}"
    table.add_row("win rate vs SFT, gold / RM", "", "", wins)
    table.add_row("KL to SFT", "", "", _num(f.get("kl_to_reference")))
    return table


def registry_lines(plan: RunPlan, result: PipelineResult) -> list[str]:
    """The registered model, its aliases now and the gate's decision with its reasons."""
    step = _first(plan, result, "register")
    if step is None or "registration" not in step.outputs:
        return []
    from llmfab.registry import registry_client
    from llmfab.registry.registration import REGISTRATION_FILE
    from llmfab.storage import open_store

    reg = json.loads(open_store(step.outputs["registration"]).get_text(REGISTRATION_FILE))
    aliases = reg.get("aliases", [])  # at registration; the registry's now (after promote) if it answers
    with contextlib.suppress(Exception):
        version = registry_client(plan.tracking.resolved_uri).get_model_version(reg["name"], reg["version"])
        aliases = sorted(version.aliases)
    name = f"[bold]{reg['name']}[/] version {reg['version']} ({reg['format']})"
    lines = [f"registered {name}, aliases: {', '.join(aliases) or 'none'}"]
    lines.append(f"gate: {reg['decision']}" + "".join(f"\n  - {r}" for r in reg.get("reasons", [])))
    return lines


def look_lines(plan: RunPlan, result: PipelineResult) -> list[str]:
    uri = plan.tracking.resolved_uri
    tracker = plan.tracking.tracker()
    path = f"#/experiments/{tracker.experiment_id}/runs/{result.run_id}"
    lines = ["look at it:"]
    if uri.startswith(("http://", "https://")):
        lines.append(f"  {uri.rstrip('/')}/{path}")
    else:
        lines.append(f"  mlflow ui --backend-store-uri {uri}")
        lines.append(f"  then http://127.0.0.1:5000/{path}")
    if result.log_dir:
        lines.append(f"  task logs: {result.log_dir}")
    return lines
