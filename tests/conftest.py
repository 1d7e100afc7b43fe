"""Shared fixtures: a real S3 endpoint (moto_server on loopback), an isolated MLflow sqlite store,
a local object store, and environment hygiene so tests never touch the user's folders."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def venv_tool(name: str, install: str) -> str:
    """A command-line tool a dev dependency installs into this venv, else one on PATH; the test
    fails (not skips) when neither exists, saying what installs it."""
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} not found: {install} installs it")
    return exe


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Each test gets its own cache, store and tracking DB, and no progress bars."""
    monkeypatch.setenv("LLMFAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMFAB_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LLMFAB_PROGRESS", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLMFAB_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 API (moto_server) on 127.0.0.1, with dummy credentials in the environment."""
    exe = venv_tool("moto_server", "pip install 'moto[server]'")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh bucket on the moto endpoint."""
    from llmfab.storage.s3 import make_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    make_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same tests run against both store backends."""
    from llmfab.storage import open_store

    if request.param == "local":
        return open_store(tmp_path / "objects")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/root")


@pytest.fixture
def tracking_uri() -> str:
    return os.environ["MLFLOW_TRACKING_URI"]


TINY_MODEL = dict(
    arch="llama",
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=176,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def testbed(tmp_path_factory):
    """A small prepared dataset and a 512-token tokenizer, shared by the training tests."""
    from llmfab.stages.runner import run_stage
    from llmfab.storage import open_store

    root = open_store(tmp_path_factory.mktemp("testbed"))
    data = run_stage(
        "prepare_data",
        dict(prose_docs=400, code_docs=200, task_docs=600, sft_examples=200, prompts=50, preference_pairs=200),
        store=root.sub("data"),
        track=False,
        show_progress=False,
    )
    tok = run_stage(
        "train_tokenizer",
        {"vocab_size": 512},
        {"corpus": data.outputs["text"]},
        store=root.sub("tok"),
        track=False,
        show_progress=False,
    )
    return {**data.outputs, **tok.outputs, "root": root}


def pretrain_tiny(testbed, folder, steps: int, seq_len: int = 128, **model) -> dict:
    """A tiny model pretrained on the testbed; returns the stage's outputs and metrics."""
    from llmfab.stages.runner import run_stage
    from llmfab.storage import open_store

    cfg = {
        "model": {**TINY_MODEL, **model},
        "seq_len": seq_len,
        "train": {"max_steps": steps, "batch_size": 8, "optim": {"lr": 3e-3}},
    }
    return run_stage(
        "pretrain",
        cfg,
        {"corpus": testbed["text"], "tokenizer": testbed["tokenizer"]},
        store=open_store(folder),
        track=False,
        show_progress=False,
    )
