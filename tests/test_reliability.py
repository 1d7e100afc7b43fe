"""Reliability and security under injected faults (issue #10): a training process killed with SIGKILL, an S3
endpoint that fails, drops connections, hangs or is down, an MLflow server that is down or goes away mid-stage,
bad inputs through the CLI, pickles and remote code in checkpoints, credentials in what a run leaves behind.

What each test proves is in its docstring; the outcomes are summed up in the issue's closing table. Tests that
were already elsewhere are not repeated here: in-process crash/resume (test_pretrain, test_rl_stages,
test_distributed_training), store-level partial checkpoints (test_checkpoint), 503s on a small PUT
(test_storage), malformed records (test_data), credentials in compiled pipelines and TrainJobs (test_kubeflow,
test_trainjob), non-root images (test_images).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import BIN, free_port
from llmfab.cli import app
from llmfab.data.corpus import code_documents, prose_documents
from llmfab.data.io import read_dataset, write_dataset
from llmfab.errors import CheckpointError, LlmfabError, StoreError, TrackingError
from llmfab.models import load_model, load_tokenizer, save_model
from llmfab.stages.base import StageContext
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.storage.checkpoint import (
    FORMAT,
    MANIFEST,
    fetch_checkpoint,
    is_checkpoint,
    list_step_checkpoints,
    step_name,
    write_checkpoint,
)
from llmfab.storage.s3 import S3Store, make_client
from llmfab.tracking import Tracker
from llmfab.train.config import TrainConfig
from llmfab.train.trainer import STATE_FILE, Trainer, TrainingError

runner = CliRunner()
MIB = 1024 * 1024
MINI_MODEL = dict(
    arch="llama",
    vocab_size=320,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)
CHAT = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}]}
PAIR = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}
TOKENIZER = ["stage", "train_tokenizer", "-s", "vocab_size=300", "-s", "report=null"]


def _quiet(stage, cfg, inputs, store):
    return run_stage(stage, cfg, inputs, store=store, track=False, show_progress=False)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """Small enough for a CLI run in a second: prose as text data, a 320-token BPE, a 1-step 2-layer model, and
    chat / preference / prompt datasets with train and test splits."""
    root = open_store(tmp_path_factory.mktemp("mini"))
    docs = prose_documents(60, 0, 400)
    text = write_dataset(
        root.sub("text"), {"train": [{"text": d} for d in docs[:50]], "test": [{"text": d} for d in docs[50:]]}, "text"
    )
    tok = _quiet("train_tokenizer", {"vocab_size": 320, "report": None}, {"corpus": text}, root.sub("tok"))
    tokenizer = tok.outputs["tokenizer"]
    cfg = {"model": MINI_MODEL, "seq_len": 32, "eval_rows": 2, "train": {"max_steps": 1, "batch_size": 2}}
    model = _quiet("pretrain", cfg, {"corpus": text, "tokenizer": tokenizer}, root.sub("pt")).outputs["model"]
    return {
        "root": root,
        "text": text,
        "tokenizer": tokenizer,
        "model": model,
        "chat": write_dataset(root.sub("chat"), {"train": [CHAT] * 4, "test": [CHAT]}, "chat"),
        "prefs": write_dataset(root.sub("prefs"), {"train": [PAIR] * 4, "test": [PAIR]}, "preference"),
    }


@pytest.fixture(autouse=True)
def _unwrapped_errors(monkeypatch):
    """The CLI's error console without line wrapping, so that a message is matched whole."""
    from rich.console import Console

    monkeypatch.setattr("llmfab.cli.console", Console(stderr=True, width=100_000))


@pytest.fixture(scope="module")
def shared_tracking(tmp_path_factory) -> str:
    """One MLflow sqlite store for the CLI tests of this module (creating its tables takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"
    Tracker(uri)
    return uri


def _no_files(folder: Path) -> bool:
    return not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))


# -- a process killed mid-run -------------------------------------------------------------------------------------
KILL_CFG = {
    "model": MINI_MODEL,
    "seq_len": 64,
    "eval_rows": 4,
    "train": {
        "max_steps": 16,
        "batch_size": 4,
        "checkpoint_every": 2,
        "log_every": 1,
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    },
}


def _weights(model_uri: str) -> dict[str, torch.Tensor]:
    return load_file(fetch_checkpoint(model_uri) / "model.safetensors")


def test_sigkill_mid_training_then_rerun_resumes_to_the_uninterrupted_result(mini, tmp_path):
    """`llmfab stage pretrain` killed with SIGKILL once it has written a step checkpoint leaves no complete output;
    with a half-written (no manifest) and a corrupt (sha256 mismatch) newer checkpoint beside it, the rerun skips
    both, resumes from the newest good one, and ends with the weights and losses of an uninterrupted run."""
    inputs = {"corpus": mini["text"], "tokenizer": mini["tokenizer"]}
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump(KILL_CFG))
    out = tmp_path / "killed"
    ckpts = open_store(out).sub("checkpoints")
    log = tmp_path / "stage.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(BIN / "llmfab"), "stage", "pretrain", "-c", str(config), "--output", str(out)]
            + [arg for name, uri in inputs.items() for arg in ("-i", f"{name}={uri}")],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LLMFAB_PROGRESS": "0"},
        )
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if any(step >= 4 for step, _ in list_step_checkpoints(ckpts)):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert not (out / "model" / MANIFEST).exists(), "killed before its output was complete"
    done = [step for step, _ in list_step_checkpoints(ckpts)]
    last = done[-1]
    assert 4 <= last < 16, done

    # What a crash during an upload leaves (files, no manifest), and a newer checkpoint whose weights rotted.
    last_dir = out / "checkpoints" / step_name(last)
    half = out / "checkpoints" / step_name(last + 2)
    shutil.copytree(last_dir, half, ignore=shutil.ignore_patterns(MANIFEST), dirs_exist_ok=True)
    rotten = out / "checkpoints" / step_name(last + 1)
    shutil.copytree(last_dir, rotten)
    weights = bytearray((rotten / "model.safetensors").read_bytes())
    weights[-8:] = bytes(8 * [0x7F])  # same size, other bytes
    (rotten / "model.safetensors").write_bytes(bytes(weights))

    resumed = _quiet("pretrain", KILL_CFG, inputs, open_store(out))
    assert resumed.metrics["resumed_from_step"] == last
    full = _quiet("pretrain", KILL_CFG, inputs, open_store(tmp_path / "uninterrupted"))
    for key in ("train_loss", "eval_loss"):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], rel=1e-5), key
    a, b = _weights(resumed.outputs["model"]), _weights(full.outputs["model"])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    # Only the newest complete checkpoints are kept: the rotten one was pruned, the half-written one rewritten.
    assert {k.split("/")[0] for k in ckpts.list()} == {step_name(14), step_name(16)}


def test_every_checkpoint_corrupt_stops_instead_of_starting_over(mini, tmp_path):
    """Resume never silently restarts from scratch when its checkpoints exist but none verifies."""
    cfg = {**KILL_CFG, "train": {**KILL_CFG["train"], "max_steps": 2}}
    inputs = {"corpus": mini["text"], "tokenizer": mini["tokenizer"]}
    store = open_store(tmp_path / "run")
    _quiet("pretrain", cfg, inputs, store)
    store.put_bytes(f"checkpoints/{step_name(2)}/{STATE_FILE}", b"rotten")
    with pytest.raises(TrainingError, match=r"every checkpoint \(step-00000002\) is corrupt"):
        _quiet("pretrain", {**KILL_CFG, "train": {**KILL_CFG["train"], "max_steps": 4}}, inputs, store)


# -- S3 faults ----------------------------------------------------------------------------------------------------
class FaultProxy:
    """An HTTP proxy in front of moto_server. `fault(method, path)` picks, per request, None (forward it), "503"
    (SlowDown), "drop" (close the connection without a reply), "hang" (forward it after `hang_s`) or "stall" (close
    the connection after `hang_s`, forwarding nothing)."""

    def __init__(self, upstream: str, fault, hang_s: float = 3.0):
        self.upstream, self.fault, self.hang_s = upstream, fault, hang_s
        self.injected: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers boto3's `Expect: 100-continue` at once

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    action = proxy.fault(self.command, self.path)
                    if action:
                        proxy.injected.append((action, self.command, self.path))
                if action in ("drop", "stall"):
                    time.sleep(proxy.hang_s if action == "stall" else 0)
                    self.close_connection = True
                    return
                if action == "503":
                    payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    return self._reply(503, [], payload)
                if action == "hang":
                    time.sleep(proxy.hang_s)
                self._forward(body)

            def _forward(self, body):
                skip = ("host", "content-length", "expect", "connection")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                headers.setdefault("Content-Type", "binary/octet-stream")
                req = urllib.request.Request(
                    proxy.upstream + self.path, data=body, method=self.command, headers=headers
                )
                try:
                    with urllib.request.urlopen(req) as resp:
                        status, resp_headers, data = resp.status, resp.headers.items(), resp.read()
                except urllib.error.HTTPError as err:
                    status, resp_headers, data = err.code, err.headers.items(), err.read()
                self._reply(status, resp_headers, data)

            def _reply(self, status, headers, data):
                try:
                    self.send_response(status)
                    hop = ("content-length", "transfer-encoding", "connection", "server", "date")
                    for key, value in headers:
                        if key.lower() not in hop:
                            self.send_header(key, value)
                    length = dict((k.lower(), v) for k, v in headers).get("content-length")
                    self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except OSError:  # the client gave up on a hung request
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda request, address: None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_multipart_parts_survive_5xx_and_dropped_connections(s3_bucket, s3_endpoint, tmp_path):
    """Every part of a multipart checkpoint upload fails on its first try (a 503 or a dropped connection): boto3
    retries each with backoff, and the checkpoint arrives whole and verifies."""
    tries: dict[str, int] = {}

    def fault(method, path):
        part = re.search(r"[?&]partNumber=(\d+)", path)
        if method != "PUT" or not part:
            return None
        tries[part[1]] = tries.get(part[1], 0) + 1
        if tries[part[1]] == 1:
            return "503" if part[1] == "1" else "drop"
        return None

    folder = tmp_path / "ckpt"
    folder.mkdir()
    payload = os.urandom(11 * MIB)  # three 5 MiB parts (S3's minimum part size)
    (folder / "model.safetensors").write_bytes(payload)
    with FaultProxy(s3_endpoint, fault) as proxy:
        store = S3Store(
            s3_bucket, "mp", endpoint_url=proxy.url, multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB
        )
        uri = write_checkpoint(store, folder)
    assert sorted(a for a, _, _ in proxy.injected) == ["503", "drop", "drop"]
    assert tries == {"1": 2, "2": 2, "3": 2}
    assert (fetch_checkpoint(uri, dest=tmp_path / "back") / "model.safetensors").read_bytes() == payload


def test_hung_requests_time_out_are_retried_then_fail_clearly(s3_bucket, s3_endpoint):
    """A request that hangs past the read timeout is retried (and succeeds); one that always hangs ends, within
    bounded time, in a StoreError naming the object's URI and the endpoint."""
    hung: list[str] = []

    def first_get_hangs(method, path):
        if method == "GET" and "x.txt" in path and not hung:
            hung.append(path)
            return "hang"
        return None

    with FaultProxy(s3_endpoint, first_get_hangs, hang_s=2.5) as proxy:
        store = S3Store(s3_bucket, "t", client=make_client(proxy.url, max_attempts=3, read_timeout=1))
        store.put_text("x.txt", "patience")
        assert store.get_text("x.txt") == "patience"
    assert hung

    with FaultProxy(s3_endpoint, lambda method, path: "stall" if method == "PUT" else None, hang_s=2.5) as proxy:
        store = S3Store(s3_bucket, "t", client=make_client(proxy.url, max_attempts=2, read_timeout=1))
        start = time.time()
        with pytest.raises(StoreError, match=rf"upload to s3://{s3_bucket}/t/y\.txt failed \(endpoint {proxy.url}\)"):
            store.put_text("y.txt", "never")
        assert time.time() - start < 20
    assert not open_store(f"s3://{s3_bucket}/t").exists("y.txt")


def test_s3_endpoint_down_fails_the_stage_clearly(mini, s3_env, monkeypatch, shared_tracking):
    """With the S3 endpoint down (nothing listening: a stopped moto_server), a stage writing to S3 exits 2 within
    bounded time, and the message names the checkpoint's URI and the endpoint; AWS_MAX_ATTEMPTS bounds the
    retries."""
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_tracking)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", down)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    start = time.time()
    result = runner.invoke(
        app,
        [*TOKENIZER, "-i", f"corpus={mini['text']}", "--output", "s3://llmfab-down/run/tok"],
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "s3://llmfab-down/run/tok/tokenizer" in message and down in message
    assert time.time() - start < 60
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(StoreError, match="AWS_MAX_ATTEMPTS='many'"):
        make_client()


def test_failed_upload_is_never_read_nor_registered(s3_bucket, s3_endpoint, tmp_path, monkeypatch, shared_tracking):
    """An endpoint that fails for good after the first file of a checkpoint leaves that file and no manifest:
    readers and resume refuse the prefix, and the register stage refuses it, as it does a checkpoint with a
    truncated (S3) or altered (local) file; the registry stays empty."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    puts: list[str] = []

    def fail_after_first_put(method, path):
        if method == "PUT":
            puts.append(path)
            return "503" if len(puts) > 1 else None
        return None

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_bytes(os.urandom(1000))
    failed = rf"upload to s3://{s3_bucket}/ck/model\.safetensors failed.*SlowDown"
    with FaultProxy(s3_endpoint, fail_after_first_put) as proxy, pytest.raises(StoreError, match=failed):
        write_checkpoint(S3Store(s3_bucket, "ck", endpoint_url=proxy.url), folder)
    partial = open_store(f"s3://{s3_bucket}/ck")
    assert list(partial.list()) == ["config.json"]
    assert not is_checkpoint(partial)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        fetch_checkpoint(partial)

    tracker = Tracker(shared_tracking)
    with pytest.raises(LlmfabError, match=r"not a checkpoint \(no MANIFEST\.json\)"):
        run_stage("register", {"name": "llmfab-faults"}, {"model": partial.uri}, store=open_store(tmp_path / "r1"),
                  tracker=tracker, show_progress=False)  # fmt: skip

    truncated = open_store(f"s3://{s3_bucket}/truncated")
    write_checkpoint(truncated, folder)
    truncated.put_bytes("model.safetensors", os.urandom(10))
    local = open_store(tmp_path / "altered")
    write_checkpoint(local, folder)
    (tmp_path / "altered" / "model.safetensors").write_bytes(os.urandom(1000))
    for bad, message in ((truncated, "size 10 does not match"), (local, "sha256 does not match")):
        with pytest.raises(CheckpointError, match=message):
            run_stage("register", {"name": "llmfab-faults", "log_model": "uri"}, {"model": bad.uri},
                      store=open_store(tmp_path / "r2"), tracker=tracker, show_progress=False)  # fmt: skip
    assert tracker.client.search_registered_models() == []
    assert _no_files(tmp_path / "r1") and _no_files(tmp_path / "r2")


def test_keys_with_dot_dot_from_a_store_never_write_outside(s3_bucket, tmp_path):
    """Object names from a store are untrusted: a manifest listing `../` files, or an S3 key with `..` segments in a
    dataset's prefix, is refused before anything is written outside the destination."""
    escape = f"escape-{uuid.uuid4().hex}"
    for store in (open_store(f"s3://{s3_bucket}/evil"), open_store(tmp_path / "evil")):
        store.put_text("ok.txt", "x")
        manifest = {"format": FORMAT, "files": {f"../../{escape}": {"size": 1, "sha256": "0" * 64}}, "meta": {}}
        store.put_text(MANIFEST, json.dumps(manifest))
        with pytest.raises(StoreError, match="invalid object key"):
            fetch_checkpoint(store, dest=tmp_path / "dl" / "ckpt")
    make_client().put_object(Bucket=s3_bucket, Key=f"data/../{escape}.jsonl", Body=b'{"text": "x"}\n')
    assert [k for k in open_store(f"s3://{s3_bucket}/data").list()] == [f"../{escape}.jsonl"]
    with pytest.raises(StoreError, match="invalid object key"):
        read_dataset(f"s3://{s3_bucket}/data", "text")
    assert not list(tmp_path.rglob(f"{escape}*"))
    assert not list(Path(tempfile.gettempdir()).glob(f"{escape}*"))


# -- MLflow down ---------------------------------------------------------------------------------------------------
class FakeMlflow:
    """Just enough of MLflow's REST API for a stage's run, which goes down (503 to everything) from the first
    request `down_when(path, body)` picks."""

    def __init__(self, down_when):
        self.calls: list[tuple[str, dict]] = []
        self.down = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                path = self.path.split("?")[0].removeprefix("/api/2.0/mlflow/")
                fake.calls.append((path, body))
                fake.down = fake.down or down_when(path, body)
                if fake.down:
                    return self._reply(503, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down"})
                info = {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "status": "RUNNING",
                        "start_time": 0, "lifecycle_stage": "active", "artifact_uri": "file:///nowhere"}  # fmt: skip
                if path == "experiments/get-by-name":
                    experiment = {"experiment_id": "1", "name": "llmfab", "lifecycle_stage": "active"}
                    return self._reply(200, {"experiment": experiment})
                if path in ("runs/create", "runs/get"):
                    return self._reply(200, {"run": {"info": info, "data": {}}})
                if path == "runs/update":
                    return self._reply(200, {"run_info": {**info, "status": body.get("status")}})
                return self._reply(200, {})

            def _reply(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> FakeMlflow:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mlflow_fails_fast(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.mark.parametrize("stage", ["train_tokenizer", "register"])
def test_mlflow_down_fails_the_stage_before_it_writes(stage, mini, tmp_path, monkeypatch, mlflow_fails_fast):
    """With the tracking server down, a stage (training or registering) exits 2 naming the server, before it has
    written anything: no output, so nothing half-registered either. A password in the URI is not printed."""
    down = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://llmfab:hunter2@{down}")
    args = {
        "train_tokenizer": ["-s", "report=null", "-s", "vocab_size=300", "-i", f"corpus={mini['text']}"],
        "register": ["-s", "name=llmfab-down", "-i", f"model={mini['model']}"],
    }[stage]
    result = runner.invoke(app, ["stage", stage, *args, "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"MLflow tracking server http://llmfab:***@{down}: cannot reach it" in message
    assert "hunter2" not in result.output
    assert _no_files(tmp_path / "out")


def test_mlflow_outage_mid_training_fails_clearly_and_keeps_the_checkpoints(mini, tmp_path, mlflow_fails_fast):
    """The tracking server goes away at step 3 of a training stage: the stage stops with a TrackingError naming the
    server (not one from marking the run), the run is never marked FINISHED, the step-2 checkpoint is kept, no
    output is complete, and a rerun resumes from step 2."""
    cfg = {**KILL_CFG, "train": {**KILL_CFG["train"], "max_steps": 4}}
    inputs = {"corpus": mini["text"], "tokenizer": mini["tokenizer"]}
    store = open_store(tmp_path / "run")

    def at_step_3(path, body):
        return path == "runs/log-batch" and any(
            m["key"] == "train_loss" and m["step"] == 3 for m in body.get("metrics", [])
        )

    with FakeMlflow(at_step_3) as fake:
        tracker = Tracker(fake.url)
        with pytest.raises(TrackingError, match=rf"MLflow tracking server {fake.url}: run r1 failed: .*503"):
            run_stage("pretrain", cfg, inputs, store=store, tracker=tracker, show_progress=False)
    assert fake.down
    assert "FINISHED" not in [body.get("status") for path, body in fake.calls if path == "runs/update"]
    assert [step for step, _ in list_step_checkpoints(store.sub("checkpoints"))] == [2]
    assert not store.exists(f"model/{MANIFEST}")
    assert _quiet("pretrain", cfg, inputs, store).metrics["resumed_from_step"] == 2


# -- bad inputs through the CLI ------------------------------------------------------------------------------------
def _file(folder: Path, name: str, data: str | bytes) -> str:
    path = folder / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def _splits(folder: Path, name: str, train: str, test: str) -> str:
    (folder / name).mkdir()
    (folder / name / "train.jsonl").write_text(train)
    (folder / name / "test.jsonl").write_text(test)
    return str(folder / name)


def _poisoned_model(mini, folder: Path) -> str:
    model, tok = load_model(mini["model"]), load_tokenizer(mini["model"])
    with torch.no_grad():
        model.get_input_embeddings().weight[5].fill_(float("nan"))
    return save_model(model, tok, open_store(folder / "poisoned"))


def _jsonl_file(folder: Path) -> Path:
    path = folder / "chat.jsonl"
    path.write_text(json.dumps({"messages": [CHAT]}) + "\n")
    return path


def _other_tokenizer(folder: Path) -> str:
    """A tokenizer of the same size trained on other text (Python code): the same ids mean other tokens."""
    docs = [{"text": d} for d in code_documents(40, 0, 400)]
    code = write_dataset(open_store(folder / "code"), {"train": docs}, "text")
    tok = _quiet("train_tokenizer", {"vocab_size": 320, "report": None}, {"corpus": code}, open_store(folder / "t2"))
    return tok.outputs["tokenizer"]


PRETRAIN = ["stage", "pretrain", "-s", "seq_len=32", "-s", "eval_rows=2", "-s", "train.max_steps=2",
            "-s", "train.batch_size=2", "-s", f"model={json.dumps(MINI_MODEL)}"]  # fmt: skip
NO_EVAL = ["-s", "eval.prompts=0", "-s", "train.max_steps=1", "-s", "train.batch_size=2"]
LONG = "a rather long prompt that takes many tokens " * 4
BAD_INPUTS = {
    "malformed JSONL": lambda m, d: (
        [
            *PRETRAIN,
            "-i",
            "corpus=" + _file(d, "bad.jsonl", '{"text": "a"}\n{"text": "b"\n'),
            "-i",
            f"tokenizer={m['tokenizer']}",
        ],
        r"bad\.jsonl:2: invalid JSON",
    ),
    "not UTF-8": lambda m, d: (
        [
            *PRETRAIN,
            "-i",
            "corpus=" + _file(d, "latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
            "-i",
            f"tokenizer={m['tokenizer']}",
        ],
        r"latin\.jsonl:2: not UTF-8 text",
    ),
    "wrong schema for the stage": lambda m, d: (
        [*PRETRAIN, "-i", f"corpus={m['chat']}", "-i", f"tokenizer={m['tokenizer']}"],
        r"chat/train\.jsonl:1: field 'text': Field required",
    ),
    "empty dataset (pretrain)": lambda m, d: (
        [*PRETRAIN, "-i", "corpus=" + _splits(d, "empty", "", ""), "-i", f"tokenizer={m['tokenizer']}"],
        r"empty: no text records in split 'train'",
    ),
    "empty dataset (tokenizer)": lambda m, d: (
        ["stage", "train_tokenizer", "-s", "report=null", "-i", "corpus=" + _file(d, "empty.jsonl", "\n")],
        r"empty\.jsonl: no text records in split 'train' to train the tokenizer on",
    ),
    "empty dataset (sft)": lambda m, d: (
        ["stage", "sft", *NO_EVAL, "-i", f"model={m['model']}", "-i", "data=" + _splits(d, "chat0", "", "")],
        r"chat0: no conversations \(empty dataset or split\)",
    ),
    "conversations longer than max_len": lambda m, d: (
        ["stage", "sft", *NO_EVAL, "-s", "max_len=8", "-i", f"model={m['model']}", "-i", f"data={m['chat']}"],
        r"chat: every conversation is longer than max_len=8 tokens",
    ),
    "pairs longer than max_len": lambda m, d: (
        ["stage", "dpo", *NO_EVAL, "-s", "max_len=4", "-i", f"model={m['model']}", "-i", f"data={m['prefs']}"],
        r"prefs: no preference pairs left \(all longer than max_len=4",
    ),
    "RL prompt longer than max_len": lambda m, d: (
        [
            "stage",
            "mdloo",
            *NO_EVAL,
            "-s",
            "max_len=24",
            "-s",
            "max_new_tokens=2",
            "-s",
            "samples_per_prompt=2",
            "-s",
            "inner_steps=1",
            "-s",
            "heldout_prompts=0",
            "-i",
            f"model={m['model']}",
            "-i",
            f"reward_model={m['model']}",
            "-i",
            "prompts=" + _splits(d, "long", json.dumps({"prompt": LONG}) + "\n", ""),
        ],
        r"prompt 0 is \d+ tokens; with its answer it exceeds max_len=24",
    ),
    "NaN margin in preference data": lambda m, d: (
        [
            "stage",
            "dpo",
            *NO_EVAL,
            "-i",
            f"model={m['model']}",
            "-i",
            "data=" + _splits(d, "nan", '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}\n', ""),
        ],
        r"nan/train\.jsonl:1: field 'margin': Input should be a finite number",
    ),
    "NaN weights (loss)": lambda m, d: (
        [
            *PRETRAIN,
            "-i",
            f"corpus={m['text']}",
            "-i",
            f"tokenizer={m['tokenizer']}",
            "-i",
            f"init={_poisoned_model(m, d)}",
        ],
        r"step 1: loss is nan; stopping",
    ),
    "tokenizer/model mismatch": lambda m, d: (
        [
            *PRETRAIN,
            "-i",
            f"corpus={m['text']}",
            "-i",
            f"tokenizer={_other_tokenizer(d)}",
            "-i",
            f"init={m['model']}",
        ],
        r"tokenizer does not match model .*tokens have another id or are missing",
    ),
    "dataset given as a tokenizer": lambda m, d: (
        [*PRETRAIN, "-i", f"corpus={m['text']}", "-i", f"tokenizer={m['text']}"],
        r"text: not a complete checkpoint \(no MANIFEST\.json\)",
    ),
    "folder that is no model": lambda m, d: (
        ["stage", "sft", *NO_EVAL, "-i", f"model={d}", "-i", f"data={m['chat']}"],
        r"neither a checkpoint \(MANIFEST\.json\) nor a Hugging Face folder",
    ),
    "tokenizer given as a model": lambda m, d: (
        ["stage", "sft", *NO_EVAL, "-i", f"model={m['tokenizer']}", "-i", f"data={m['chat']}"],
        r"holds no model \(no config\.json\): a tokenizer-only folder given as a model\?",
    ),
    "JSONL file given as a model": lambda m, d: (
        ["stage", "sft", *NO_EVAL, "-i", f"model={_jsonl_file(d)}", "-i", f"data={m['chat']}"],
        r"a file, not a model or tokenizer folder",
    ),
    "unsupported URI scheme": lambda m, d: (
        [*PRETRAIN, "-i", "corpus=gs://bucket/text", "-i", f"tokenizer={m['tokenizer']}"],
        r"unsupported store URI 'gs://bucket/text'",
    ),
    "S3 URI without a bucket": lambda m, d: (
        ["stage", "train_tokenizer", "-i", f"corpus={m['text']}", "--store", "s3:///runs"],
        r"invalid S3 URI 's3:///runs': missing bucket name",
    ),
    "path traversal in an input": lambda m, d: (
        [*PRETRAIN, "-i", "corpus=s3://bucket/data/../../etc", "-i", f"tokenizer={m['tokenizer']}"],
        r"invalid object key 'data/\.\./\.\./etc'",
    ),
    "path traversal in the output": lambda m, d: (
        ["stage", "train_tokenizer", "-i", f"corpus={m['text']}", "--output", "s3://bucket/runs/../../x"],
        r"invalid object key 'runs/\.\./\.\./x'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_naming_where_and_writes_nothing(case, mini, tmp_path, monkeypatch, shared_tracking):
    """Each bad input stops the stage with exit code 2 and a message naming the file and line, the field or the
    URI at fault (no traceback), and nothing is written to the stage's output location."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_tracking)
    args, message = BAD_INPUTS[case](mini, tmp_path)
    out = tmp_path / "out"
    if "--output" not in args and "--store" not in args:
        args = [*args, "--output", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert re.search(message, " ".join(result.output.split())), result.output
    assert _no_files(out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "mistral", "--runner", "inprocess"], "unknown family 'mistral'; known: afm, gemma2, llama31, qwen2"),
        (["run", "qwen2", "--preset", "huge", "--runner", "inprocess"], "no preset 'huge'; available: tiny"),
    ],
)
def test_unknown_family_or_preset_exits_2(args, message):
    """Unknown recipe names are refused by the CLI before anything runs (unknown stages: test_cli)."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


# -- security: no pickles, no remote code, no credentials in what a run leaves ---------------------------------------
class _Plant:
    """Unpickling this runs a command that creates a file: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model_folder(mini, folder: Path) -> Path:
    source = fetch_checkpoint(mini["model"])
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(MANIFEST, "*.safetensors"))
    return folder


def test_pickled_weights_and_trainer_state_are_never_unpickled(mini, tmp_path):
    """A complete checkpoint whose weights are a pickle (pytorch_model.bin, adapter_model.bin) or whose trainer
    state carries code is refused, and the planted code never runs: weights load from safetensors only and the
    trainer state through torch.load(weights_only=True)."""
    marker = tmp_path / "code-ran"
    plant = pickle.dumps({"weight": _Plant(marker)})
    pickled = _model_folder(mini, tmp_path / "bin")
    (pickled / "pytorch_model.bin").write_bytes(plant)
    with pytest.raises(OSError, match=r"model\.safetensors"):
        load_model(write_checkpoint(open_store(tmp_path / "store-bin"), pickled))

    adapter = tmp_path / "adapter"
    shutil.copytree(fetch_checkpoint(mini["model"]), adapter, ignore=shutil.ignore_patterns(MANIFEST))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (adapter / "adapter_model.bin").write_bytes(plant)
    with pytest.raises(CheckpointError, match=r"adapter loads from adapter_model\.safetensors only"):
        load_model(write_checkpoint(open_store(tmp_path / "store-adapter"), adapter))

    state = shutil.copytree(
        fetch_checkpoint(mini["model"]), tmp_path / "state", ignore=shutil.ignore_patterns(MANIFEST)
    )
    torch.save({"step": 2, "rng": _Plant(marker)}, state / STATE_FILE)
    ctx = StageContext("resume", open_store(tmp_path / "run"), show_progress=False)
    write_checkpoint(ctx.store.sub(f"checkpoints/{step_name(2)}"), state)
    trainer = Trainer(load_model(mini["model"]), TrainConfig(max_steps=4), ctx, lambda m, b: (m(**b).loss, {}))
    with pytest.raises(CheckpointError, match=rf"{STATE_FILE}: refused \(only tensors and plain data"):
        trainer.resume()
    assert not marker.exists()


def test_remote_code_in_a_checkpoint_never_runs(mini, tmp_path, monkeypatch):
    """A checkpoint whose config or tokenizer config points at its own Python (`auto_map`) is refused even when
    stdin would answer transformers' "run the custom code? [y/N]" with yes: trust_remote_code is never on."""
    marker = tmp_path / "code-ran"
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    folder = tmp_path / "remote"
    shutil.copytree(fetch_checkpoint(mini["model"]), folder, ignore=shutil.ignore_patterns(MANIFEST))
    (folder / "planted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Planted: pass\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="planted", auto_map={"AutoConfig": "planted.Planted", "AutoModelForCausalLM": "planted.Planted"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["planted.Planted", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    uri = write_checkpoint(open_store(tmp_path / "store"), folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(uri)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(uri, kind="reward")
    load_tokenizer(uri)  # the tokenizer.json loads without the planted class...
    assert not marker.exists()  # ...and nothing planted ran


def test_source_never_enables_pickle_or_remote_code():
    """No code path can turn the protections above off: no trust_remote_code=True, weights_only=False or bare
    pickle loads anywhere in the library, the components or the pipelines."""
    root = Path(__file__).resolve().parents[1]
    banned = re.compile(
        r"trust_remote_code\s*=\s*True|weights_only\s*=\s*False|pickle\.loads?\(|cloudpickle|dill\.load"
    )
    found = []
    for base in ("src", "components", "pipelines"):
        for path in (root / base).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            found += [f"{path.relative_to(root)}: {m[0]}" for m in banned.finditer(text)]
            found += [
                f"{path.relative_to(root)}: torch.load without weights_only=True"
                for call in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text)
                if "weights_only=True" not in call[0]
            ]
    assert found == []


def test_credentials_never_reach_mlflow_logs_outputs_or_the_store(mini, s3_bucket, tmp_path, monkeypatch, caplog):
    """A stage run with S3 as its store and unique canary credentials in the environment (S3 secret key, MLflow
    password and token, HF token) leaves them in no MLflow param, tag or metric name, no file it wrote (tracking
    DB, artifacts), no store object, no log record (at DEBUG, boto3 and MLflow included) and not in its output."""
    canary = f"canary{uuid.uuid4().hex}"
    for var in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN"):
        monkeypatch.setenv(var, f"{canary}-{var}")  # moto_server accepts any secret key
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "llmfab")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    result = runner.invoke(
        app,
        ["-v", *TOKENIZER, "-i", f"corpus={mini['text']}", "--store", f"s3://{s3_bucket}/runs"],
    )
    assert result.exit_code == 0, result.output
    run_id = json.loads(result.stdout)["run_id"]
    run = Tracker().client.get_run(run_id)
    recorded = [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
    assert recorded and not [item for item in recorded if canary in str(item)]
    assert any(r.name.startswith("botocore") for r in caplog.records), "DEBUG logs of the S3 client were captured"
    blobs = {"output": result.output.encode(), "logs": caplog.text.encode()}
    blobs |= {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    store = open_store(f"s3://{s3_bucket}")
    blobs |= {key: store.get_bytes(key) for key in store.list()}
    assert any(k.endswith("tokenizer.json") for k in blobs) and any(k.endswith("mlflow.db") for k in blobs)
    assert [name for name, data in blobs.items() if canary.encode() in data] == []
