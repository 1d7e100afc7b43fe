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


@pytest.fixture
def mlflow_server(tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    """A real `mlflow server` on loopback (sqlite backend), artifacts proxied into a fresh moto S3 bucket;
    yields (URI, bucket)."""
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    port = free_port()
    log = open(tmp_path / "mlflow.log", "w")  # noqa: SIM115
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(exe),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            f"s3://{s3_bucket}/mlartifacts",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc, timeout=120)
        yield f"http://127.0.0.1:{port}", s3_bucket
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


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


# -- the alignment testbed of the slow efficacy tests ---------------------------------------------
ALIGN_EVAL = {"prompts": 256, "max_new_tokens": 24}  # the 256 held-out items, greedy
ALIGN_LLAMA = dict(arch="llama", vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                   intermediate_size=352, max_position_embeddings=256)  # fmt: skip


def train_cfg(lr: float, steps: int, batch: int = 8, warmup: int = 5) -> dict:
    return {"max_steps": steps, "batch_size": batch, "optim": {"lr": lr, "warmup_steps": warmup}}


@pytest.fixture(scope="session")
def alignment_chain(tmp_path_factory):
    """data -> tokenizer -> base -> SFT -> reward model on the tiny presets' testbed (repeat a word n times,
    name the last / reverse a list of words; 30 % of the written demonstrations carry the task's typical
    mistake): only 400 written conversations, plenty of prompts and pairs. Built once for the post-training
    and RL efficacy tests; `run(step, stage, cfg, inputs)` runs a further stage in the same store."""
    from llmfab.stages.runner import run_stage
    from llmfab.storage import open_store

    root = open_store(tmp_path_factory.mktemp("alignment"))

    def run(step, stage, cfg, inputs=None):
        return run_stage(stage, cfg, inputs or {}, store=root.sub(step), track=False, show_progress=False)

    data = run("data", "prepare_data", dict(
        prose_docs=1000, code_docs=300, task_docs=3000, sft_examples=2000, prompts=2000, preference_pairs=3000,
        tasks=["format", "wordlist"], format_kinds=["repeat"], max_repeat=7, list_kinds=["last", "reverse"],
        max_items=4, demo_error_rate=0.3, heldout_prompts=256,
    )).outputs  # fmt: skip
    tok = run("tok", "train_tokenizer", {"vocab_size": 1024}, {"corpus": data["text"]}).outputs["tokenizer"]
    base = run(
        "base",
        "pretrain",
        {"model": ALIGN_LLAMA, "seq_len": 256, "mixture": {"tasks": 2.0}, "train": train_cfg(2e-3, 300)},
        {"corpus": data["text"], "tokenizer": tok},
    ).outputs["model"]
    sft = run("sft", "sft", {"max_examples": 400, "train": train_cfg(1e-3, 150, warmup=10), "eval": ALIGN_EVAL},
              {"model": base, "data": data["sft"], "eval_prompts": data["prompts"]})  # fmt: skip
    rm = run("rm", "reward_model", {"train": train_cfg(1e-3, 300, batch=16, warmup=10)},
             {"init": sft.outputs["model"], "data": data["preferences"]})  # fmt: skip
    return {"run": run, "data": data, "tokenizer": tok, "base": base, "sft": sft, "rm": rm}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """For parity tests against TRL: a locally trained 384-token BPE, `make(seed)` building a 2-layer
    32-wide llama, and a scratch folder."""
    from llmfab.config.model import ModelConfig
    from llmfab.data.corpus import prose_documents
    from llmfab.models.architectures import build_model
    from llmfab.tokenizer import special_token_ids, train_bpe_tokenizer

    tok = train_bpe_tokenizer(prose_documents(200, 0, 2000), vocab_size=384)
    cfg = ModelConfig(
        arch="llama", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    return tok, lambda seed: build_model(cfg, seed=seed, **special_token_ids(tok)), tmp_path_factory.mktemp("trl")
