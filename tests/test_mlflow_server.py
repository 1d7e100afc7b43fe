"""Tracking against a real `mlflow server` process on loopback, artifacts proxied to S3 (moto)."""

from llmfab.tracking import Tracker


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
