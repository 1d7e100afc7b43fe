"""Data-parallel training under torchrun, as a TrainJob's pods run it (`torchrun --no-python llmfab stage ...`):
two CPU ranks (gloo) with grad_accum G follow the loss curve and reach the weights of one process with 2G;
rank 0 alone writes the checkpoints, the output and the result, and talks to MLflow; its checkpoints resume,
in one process or after a crash of both ranks."""

import json
import os
import shutil
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import TINY_MODEL, free_port, venv_tool
from llmfab.cli import app
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.storage.checkpoint import fetch_checkpoint, list_step_checkpoints, step_name
from llmfab.tracking import Tracker
from llmfab.train.trainer import FAULT_ENV, STATE_FILE

STEPS = 6


def _config(grad_accum: int) -> dict:
    train = {
        "max_steps": STEPS,
        "batch_size": 4,
        "grad_accum": grad_accum,
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
        "log_every": 2,
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    }
    return {"model": TINY_MODEL, "seq_len": 64, "eval_rows": 8, "train": train}


def _inputs(testbed) -> dict[str, str]:
    return {"corpus": testbed["text"], "tokenizer": testbed["tokenizer"]}


def _torchrun_stage(tmp_path, testbed, out, **env) -> subprocess.CompletedProcess:
    """`llmfab stage pretrain` on two ranks, one step of grad_accum 1 each, writing below `out`."""
    config = tmp_path / "pretrain-2ranks.yaml"
    config.write_text(yaml.safe_dump(_config(grad_accum=1)))
    torchrun = venv_tool("torchrun", "`pip install -e '.[train]'` (torch)")
    llmfab = venv_tool("llmfab", "`pip install -e .`")
    cmd = [torchrun, "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    cmd += ["--no-python", llmfab, "stage", "pretrain", "-c", str(config), "--output", str(out), "--write-result"]
    cmd += [f"--input={k}={v}" for k, v in _inputs(testbed).items()]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1", **env}
    )


def _printed(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout[proc.stdout.index("{\n") :])  # after any library chatter on stdout


def _state(folder, step: int = STEPS) -> dict:
    store = open_store(folder).sub("checkpoints").sub(step_name(step))
    return torch.load(fetch_checkpoint(store) / STATE_FILE, weights_only=True)


def _weights(folder) -> dict[str, torch.Tensor]:
    root = fetch_checkpoint(open_store(folder).sub("model"))
    return {k: v for path in sorted(root.glob("*.safetensors")) for k, v in load_file(path).items()}


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-5, msg=key)


def _runs(tracking_uri: str) -> list:
    tracker = Tracker(tracking_uri)
    return tracker.client.search_runs([tracker.experiment_id])


@pytest.fixture(scope="module")
def one_process(testbed, tmp_path_factory):
    """The reference: one process, grad_accum 2 (the two ranks' global batch)."""
    folder = tmp_path_factory.mktemp("one")
    result = run_stage("pretrain", _config(grad_accum=2), _inputs(testbed), store=open_store(folder), track=False)
    return folder, result


def test_two_ranks_match_one_process(testbed, one_process, tmp_path, tracking_uri):
    one, one_result = one_process
    out = tmp_path / "two"
    printed = _printed(_torchrun_stage(tmp_path, testbed, out))
    assert json.loads(open_store(out).get_text("stage-result.json")) == printed  # rank 0 printed and wrote it
    assert printed["outputs"]["model"] == open_store(out).sub("model").uri

    # The same global batch: the same loss curve (means over ranks), held-out loss and weights.
    ours, theirs = _state(out), _state(one)
    assert len(ours["history"]) == STEPS
    assert ours["history"] == pytest.approx(theirs["history"], rel=1e-4)
    assert printed["metrics"]["eval_loss"] == pytest.approx(one_result.metrics["eval_loss"], rel=1e-4)
    _assert_same_weights(_weights(out), _weights(one))
    assert [s for s, _ in list_step_checkpoints(open_store(out).sub("checkpoints"))] == [2, 4, 6]

    # Rank 0 alone tracked: one MLflow run, holding the global loss curve.
    runs = _runs(tracking_uri)
    assert [r.info.run_id for r in runs] == [printed["run_id"]]
    curve = {m.step: m.value for m in Tracker(tracking_uri).client.get_metric_history(printed["run_id"], "train_loss")}
    assert [curve[s] for s in sorted(curve)] == pytest.approx(theirs["history"], rel=1e-4)

    # Rank 0's step-4 checkpoint resumes (here in one process with the same global batch) to the same end.
    resume = tmp_path / "resume"
    shutil.copytree(out / "checkpoints" / step_name(4), resume / "checkpoints" / step_name(4))
    again = run_stage("pretrain", _config(grad_accum=2), _inputs(testbed), store=open_store(resume), track=False)
    assert again.metrics["resumed_from_step"] == 4.0
    _assert_same_weights(_weights(resume), _weights(one))


@pytest.mark.slow
def test_two_ranks_resume_after_a_crash(testbed, one_process, tmp_path):
    """Both ranks crash after step 4's checkpoint; a second torchrun resumes it and ends where one process does."""
    one, _ = one_process
    out = tmp_path / "two"
    crashed = _torchrun_stage(tmp_path, testbed, out, **{FAULT_ENV: "4"})
    assert crashed.returncode != 0
    assert "simulated crash after step 4" in crashed.stderr, crashed.stderr[-5000:]
    assert [s for s, _ in list_step_checkpoints(open_store(out).sub("checkpoints"))] == [2, 4]
    assert not open_store(out).exists("model/MANIFEST.json")

    printed = _printed(_torchrun_stage(tmp_path, testbed, out))
    assert printed["metrics"]["resumed_from_step"] == 4.0
    assert _state(out)["history"] == pytest.approx(_state(one)["history"], rel=1e-4)
    _assert_same_weights(_weights(out), _weights(one))


def test_stage_cli_needs_an_output_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["stage", "train_tokenizer", "-i", "corpus=/nowhere"])
    assert result.exit_code == 2
    assert "WORLD_SIZE=2: give --output" in result.output
