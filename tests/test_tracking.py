import pytest

from llmfab.errors import ConfigError, LlmfabError
from llmfab.stages.base import StageConfig, stage
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.tracking import TrackedRun, Tracker, flatten_params, tracking_uri


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri() == "http://mlflow:5000"
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri() == "sqlite:///mlflow.db"


def test_flatten_params():
    flat = flatten_params({"model": {"hidden": 8, "arch": "qwen2"}, "tasks": ["a", "b"], "x": None})
    assert flat == {"model.hidden": "8", "model.arch": "qwen2", "tasks": '["a", "b"]', "x": "None"}
    assert len(flatten_params({"long": "y" * 10000})["long"]) == 6000


def test_nested_runs_and_failure_status(tracking_uri):
    tracker = Tracker(tracking_uri, "exp")
    with tracker.run("pipeline") as parent:
        with tracker.run("child", parent_run_id=parent.run_id) as child:
            child.log_params({"a": {"b": 1}})
            child.log_metrics({"loss": 2.0}, step=1)
            child.log_metrics({"loss": 1.0}, step=2)
        with pytest.raises(RuntimeError), tracker.run("broken", parent_run_id=parent.run_id):
            raise RuntimeError("boom")
    children = {r.info.run_name: r for r in tracker.child_runs(parent.run_id)}
    assert set(children) == {"child", "broken"}
    assert children["child"].info.status == "FINISHED"
    assert children["broken"].info.status == "FAILED"
    assert children["child"].data.params == {"a.b": "1"}
    history = tracker.client.get_metric_history(children["child"].info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


def test_run_metrics_are_batched_and_sent_by_the_end(tracking_uri, monkeypatch):
    """A run from Tracker.run on a sqlite file sends its metrics in batches (one MLflow call, not one per
    log_metrics), each with the time it was logged; all of them are sent before the run ends, a failed run's too."""
    tracker = Tracker(tracking_uri, "exp")
    calls, send = [], tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch", lambda run_id, **kw: calls.append(kw) or send(run_id, **kw))
    with pytest.raises(RuntimeError), tracker.run("broken") as run:
        for step in range(1, 6):
            run.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
        assert not any("metrics" in c and c["metrics"] for c in calls)  # held, within METRICS_FLUSH_SECONDS
        raise RuntimeError("boom")
    assert len([c for c in calls if c.get("metrics")]) == 1
    finished = tracker.client.get_run(run.run_id)
    assert finished.info.status == "FAILED"
    history = tracker.client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in range(1, 6)]
    # A run made directly (a pipeline's parent run, updated after its steps) sends each call at once.
    direct = TrackedRun(tracker.client, run.run_id, tracker.experiment_id)
    tracker.client.update_run(run.run_id, status="RUNNING")
    direct.log_metrics({"late": 1.0})
    assert tracker.client.get_run(run.run_id).data.metrics["late"] == 1.0


class EchoConfig(StageConfig):
    message: str = "hi"
    fail: bool = False


@stage("test_echo", EchoConfig, inputs={"src": "anything"}, outputs={"out": "a text file"})
def echo(config, inputs, ctx):
    """Copy the message and input URI to a file (a test stage)."""
    if config.fail:
        raise ValueError("asked to fail")
    ctx.output("out").put_text("msg.txt", f"{config.message} {inputs['src']}")
    ctx.log_metrics({"chars": len(config.message)})
    return {"out": ctx.output("out").uri}


def test_run_stage_tracks_everything(tmp_path, tracking_uri):
    tracker = Tracker(tracking_uri)
    store = open_store(tmp_path / "s")
    with tracker.run("parent") as parent:
        result = run_stage(
            "test_echo",
            {"message": "hello"},
            {"src": "s3://b/k"},
            store=store,
            tracker=tracker,
            parent_run_id=parent.run_id,
        )
    assert open_store(result.outputs["out"]).get_text("msg.txt") == "hello s3://b/k"
    run = tracker.client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.params["message"] == "hello" and run.data.params["seed"] == "0"
    assert run.data.metrics["chars"] == 5.0
    assert run.data.tags["llmfab.output.out"] == result.outputs["out"]
    assert run.data.tags["llmfab.input.src"] == "s3://b/k"
    assert "llmfab.system.python" in run.data.tags and "llmfab.system.torch" in run.data.tags


def test_run_stage_errors(tmp_path, tracking_uri):
    with pytest.raises(ConfigError, match="missing input"):
        run_stage("test_echo", {}, {})
    with pytest.raises(ConfigError, match="unknown input"):
        run_stage("test_echo", {}, {"src": "x", "other": "y"})
    with pytest.raises(ConfigError, match="mesage: Extra inputs are not permitted"):
        run_stage("test_echo", {"mesage": "typo"}, {"src": "x"})
    with pytest.raises(ValueError, match="asked to fail"):
        run_stage("test_echo", {"fail": True}, {"src": "x"}, store=open_store(tmp_path))
    runs = Tracker(tracking_uri).client.search_runs([Tracker(tracking_uri).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert issubclass(ConfigError, LlmfabError)


def test_parent_run_from_environment(monkeypatch, tmp_path, tracking_uri):
    tracker = Tracker(tracking_uri)
    with tracker.run("kfp-pipeline") as parent:
        monkeypatch.setenv("LLMFAB_PARENT_RUN_ID", parent.run_id)
        result = run_stage("test_echo", {}, {"src": "x"}, store=open_store(tmp_path))
    assert tracker.client.get_run(result.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_stage_runs_record_datasets_description_and_system_metrics(testbed, tmp_path, tracking_uri, monkeypatch):
    """What the MLflow UI shows of a stage run: the datasets it read (store URI, content digest, train or test), the
    recipe's words for the step as its description, and for a training stage the machine's load while it ran."""
    from conftest import TINY_MODEL
    from llmfab.storage.content import content_hash

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = Tracker(tracking_uri)
    cfg = {"model": TINY_MODEL, "seq_len": 64, "train": {"max_steps": 30, "batch_size": 4}}
    inputs = {"corpus": testbed["text"], "tokenizer": testbed["tokenizer"]}
    with tracker.run("parent") as parent:
        trained = run_stage("pretrain", cfg, inputs, store=open_store(tmp_path / "p"), tracker=tracker,
                            parent_run_id=parent.run_id, description="core pretraining")  # fmt: skip
    run = tracker.client.get_run(trained.run_id)
    assert run.data.tags["mlflow.note.content"] == "core pretraining"
    (read,) = run.inputs.dataset_inputs  # the corpus; the tokenizer is a checkpoint, not a dataset
    assert read.dataset.name == "corpus" and testbed["text"] in read.dataset.source
    assert content_hash(testbed["text"])[1].startswith(read.dataset.digest)
    assert {t.key: t.value for t in read.tags}["mlflow.data.context"] == "train"
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    assert not any(k.startswith("system/") for k in trained.metrics)  # the stage's own metrics stay its own
