"""The GitHub Actions workflow that shows CI-triggered retraining: valid YAML with the triggers and jobs it
documents, and every `llmfab` command it runs exists with the options it passes."""

import re
import shlex
from pathlib import Path

import typer.main
import yaml

from llmfab.cli import app

WORKFLOW = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "retrain.yml"


def _llmfab_calls(script: str) -> list[list[str]]:
    """`llmfab ...` command lines of a run script (continuations joined, ${{ }} expressions blanked)."""
    text = re.sub(r"\$\{\{[^}]*\}\}", "X", script.replace("\\\n", " "))
    calls = []
    for line in text.splitlines():
        line = line.split(">", 1)[0].split("|", 1)[0]
        if line.strip().startswith("llmfab "):
            calls.append(shlex.split(line)[1:])
    return calls


def test_workflow_wires_decide_build_submit_wait():
    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow[True]  # YAML 1.1 reads the key `on` as True
    assert {"push", "schedule", "workflow_dispatch"} <= set(triggers)
    jobs = flow["jobs"]
    assert jobs["images"]["needs"] == "decide" and jobs["retrain"]["needs"] == ["decide", "images"]
    assert "needs.decide.outputs.retrain == 'true'" in jobs["images"]["if"]
    scripts = "\n".join(s.get("run", "") for job in jobs.values() for s in job["steps"])
    assert "--dry-run" in scripts and "--wait" in scripts and "docker push" in scripts
    assert not re.search(r"(PASSWORD|SECRET|TOKEN)\w*:\s*[^$\s]", WORKFLOW.read_text())  # secrets by reference


def test_workflow_llmfab_commands_exist_with_their_options():
    group = typer.main.get_command(app)
    calls = [c for job in yaml.safe_load(WORKFLOW.read_text())["jobs"].values() for s in job["steps"]
             for c in _llmfab_calls(s.get("run", ""))]  # fmt: skip
    assert {c[0] for c in calls} == {"retrain", "images", "compile-pipelines"}
    for call in calls:
        command = group.commands[call[0]]
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        used = {arg.split("=", 1)[0] for arg in call[1:] if arg.startswith("--")}
        assert used <= known, (call[0], sorted(used - known))


def test_workflow_installs_what_llmfab_commands_need():
    """Every job that runs llmfab installs the train extra (recipes load the stage registry, which imports torch)
    after the CPU build of the pinned torch (else pip pulls a multi-GB CUDA build)."""
    for name, job in yaml.safe_load(WORKFLOW.read_text())["jobs"].items():
        scripts = "\n".join(s.get("run", "") for s in job["steps"])
        if re.search(r"^\s*llmfab ", scripts, re.M):
            install = scripts.index('pip install -e ".[train,kfp]"')
            assert scripts.index("torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu") < install, name
