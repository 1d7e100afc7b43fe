"""`llmfab retrain`: the decision (forced / no champion / new data version / schedule / nothing to do) against a
real MLflow registry (sqlite), submission to a (fake) KFP server and waiting for its end, and the CLI."""

import contextlib
import json
import time

import pytest
from test_kubeflow import kfp_server  # noqa: F401 (a fixture)
from typer.testing import CliRunner

from llmfab.cli import app
from llmfab.config.recipe import load_recipe
from llmfab.data.version import DATA_FINGERPRINT_TAG, data_fingerprint
from llmfab.errors import ConfigError, LlmfabError
from llmfab.kubeflow.runtime import KFP_RUN_TAG
from llmfab.registry import registry_client
from llmfab.retrain import decide, registered_name, retrain
from llmfab.runs import plan_run
from llmfab.tracking import Tracker

runner = CliRunner()
NAME = "llmfab-qwen2"


def _champion(client, fingerprint: str, pipeline_run_id: str = "") -> str:
    """A registered version holding `champion`, trained on data `fingerprint`."""
    with contextlib.suppress(Exception):  # registered already
        client.create_registered_model(NAME)
    tags = {DATA_FINGERPRINT_TAG: fingerprint, "llmfab.pipeline_run_id": pipeline_run_id}
    mv = client.create_model_version(NAME, source="file:///models/qwen2", tags=tags)
    client.set_registered_model_alias(NAME, "champion", mv.version)
    return str(mv.version)


def test_data_fingerprint_follows_the_data_not_the_training(tmp_path):
    base = data_fingerprint(load_recipe("qwen2", "tiny"))
    assert base == data_fingerprint(load_recipe("qwen2", "tiny"))
    assert base == data_fingerprint(load_recipe("qwen2", "tiny", ["sft.train.max_steps=7"]))  # not a data change
    assert base != data_fingerprint(load_recipe("qwen2", "tiny", ["data.seed=3"]))
    assert base != data_fingerprint(load_recipe("qwen2", "tiny", ["data.sft_examples=10"]))


def test_recipe_data_uri_content_is_the_version(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    recipe = tmp_path / "r.yaml"
    text = (
        "family: r\nsteps:\n  - {id: data, stage: prepare_data}\n"
        "  - {id: tokenizer, stage: train_tokenizer, inputs: {corpus: data.text}}\n"
        f"  - {{id: sft, stage: sft, inputs: {{model: tokenizer.tokenizer, data: {data}}}}}\n"
        "presets: {tiny: {}}\n"
    )
    recipe.write_text(text)
    first = data_fingerprint(load_recipe(recipe))
    data.write_text(data.read_text() * 2)
    assert data_fingerprint(load_recipe(recipe)) != first  # same URI, new content


def test_decision_reasons(tracking_uri):
    client = registry_client(tracking_uri)
    plan = plan_run("qwen2", "tiny")
    current = data_fingerprint(plan.recipe)
    assert registered_name(plan.recipe) == NAME and plan.data_fingerprint == current
    first = decide(client, plan)
    assert first.retrain and first.reason == f"{NAME} has no champion"
    _champion(client, "0" * 64)
    stale = decide(client, plan)
    assert stale.retrain and stale.reason.startswith("new data version (000000000000 -> ")
    version = _champion(client, current)
    fresh = decide(client, plan, max_age_days=7)
    assert not fresh.retrain and fresh.reason.startswith(f"champion v{version} is current")
    later = time.time() + 8 * 86400
    assert decide(client, plan, max_age_days=7, now=later).reason.startswith("schedule: champion is 8.0 days old")
    assert not decide(client, plan, now=later).retrain  # no max age: no schedule
    assert decide(client, plan, force=True).reason == "forced"


def test_recipe_without_register_step_cannot_be_retrained(tmp_path, tracking_uri):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("family: r\nsteps:\n  - {id: data, stage: prepare_data}\npresets: {tiny: {}}\n")
    with pytest.raises(ConfigError, match="no register step"):
        retrain(str(recipe), tracking_uri=tracking_uri, dry_run=True)


def test_retrain_submits_waits_and_reports_the_gate(kfp_server, tracking_uri):  # noqa: F811
    host, requests = kfp_server
    client = registry_client(tracking_uri)
    outcome = retrain("qwen2", host=host, tracking_uri=tracking_uri, run_name="weekly", dry_run=True)
    assert outcome.decision.retrain and outcome.ran == ""  # dry run: decided, nothing submitted
    assert not [r for r in requests if r[0] == "POST"]

    # What the pipeline would leave behind: its MLflow run (tagged with the KFP run id) and a champion from it.
    tracker = Tracker(tracking_uri)
    with tracker.run("weekly", tags={KFP_RUN_TAG: "run-1"}) as parent:
        pass
    _champion(client, data_fingerprint(load_recipe("qwen2", "tiny")), parent.run_id)
    outcome = retrain("qwen2", host=host, tracking_uri=tracking_uri, run_name="weekly", force=True)
    assert (outcome.ran, outcome.run_id, outcome.state) == ("kfp", "run-1", "SUCCEEDED")
    assert outcome.promoted and outcome.champion_version == "1"  # the champion came from this KFP run
    assert ("GET", "/apis/v2beta1/runs/run-1", None) in requests
    posted = [body for method, path, body in requests if method == "POST" and path == "/apis/v2beta1/runs"]
    assert posted[0]["runtime_config"]["parameters"]["run_name"] == "weekly"


def test_failed_kfp_run_fails_retrain(kfp_server, tracking_uri):  # noqa: F811
    from test_kubeflow import FakeKfp

    host, _ = kfp_server
    FakeKfp.run_state = "FAILED"
    with pytest.raises(LlmfabError, match="KFP run run-1 ended FAILED"):
        retrain("qwen2", host=host, tracking_uri=tracking_uri, force=True)


def test_cli_dry_run_prints_the_decision(tracking_uri):
    result = runner.invoke(app, ["retrain", "qwen2", "--dry-run", "--tracking-uri", tracking_uri])
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert outcome["decision"]["retrain"] and outcome["decision"]["model_name"] == NAME
    assert outcome["decision"]["data_fingerprint"] == data_fingerprint(load_recipe("qwen2", "tiny"))
    assert "llmfab-qwen2: retrain: llmfab-qwen2 has no champion" in result.stderr
    bad = runner.invoke(app, ["retrain", "qwen2", "--dry-run", "--set", "data.seedz=1"])
    assert bad.exit_code == 2 and "presets.tiny.config.data.seedz" in bad.output
