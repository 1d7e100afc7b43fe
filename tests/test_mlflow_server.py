"""Tracking against a real `mlflow server` process on loopback, artifacts proxied to S3 (moto)."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, wait_for_port
from llmfab.tracking import Tracker


@pytest.fixture
def mlflow_server(tmp_path, s3_bucket, s3_endpoint, monkeypatch):
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


def test_tracker_against_mlflow_server(mlflow_server, monkeypatch):
    uri, bucket = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker()
    assert tracker.uri == uri
    with tracker.run("pipeline") as parent, tracker.run("stage", parent_run_id=parent.run_id) as child:
        child.log_params({"lr": 1e-3})
        child.log_metrics({"loss": 0.5}, step=3)
        child.log_dict({"a": 1}, "plan.json")
    run = tracker.client.get_run(child.run_id)
    assert run.data.params["lr"] == "0.001" and run.data.metrics["loss"] == 0.5
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    # The artifact went through the server's proxy into the S3 bucket.
    from llmfab.storage.s3 import make_client

    keys = [o["Key"] for o in make_client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("plan.json") for k in keys), keys
