"""Kubeflow: per-stage components, family pipelines (compiled IR committed, stale check), the component runtime,
local runs under kfp.local, and submission to a (fake) KFP API server."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from kfp import dsl
from typer.testing import CliRunner

from llmfab.cli import app
from llmfab.config.recipe import as_refs, list_families, load_recipe
from llmfab.images import stage_group
from llmfab.kube.trainjob import CREDENTIAL_NAME
from llmfab.kubeflow.components import LIST_INPUTS, component_source, is_list_input, stage_component
from llmfab.kubeflow.pipelines import compile_all, compile_pipeline
from llmfab.kubeflow.runtime import STORE_URI, run_component
from llmfab.stages import shipped_stages
from llmfab.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SMALL = [
    "data.prose_docs=40",
    "data.code_docs=20",
    "data.task_docs=40",
    "data.sft_examples=20",
    "data.prompts=10",
    "data.preference_pairs=20",
    "tokenizer.vocab_size=400",
    "tokenizer.report.vocab_sizes=[]",
]


@pytest.fixture
def default_images(monkeypatch):
    """Compiled files name the default registry and tag."""
    monkeypatch.delenv("LLMFAB_IMAGE_REGISTRY", raising=False)
    monkeypatch.delenv("LLMFAB_IMAGE_TAG", raising=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    import os

    saved = {k: os.environ.pop(k) for k in ("LLMFAB_IMAGE_REGISTRY", "LLMFAB_IMAGE_TAG") if k in os.environ}
    try:
        root = tmp_path_factory.mktemp("compiled")
        compile_all(root)
    finally:
        os.environ.update(saved)
    return root


def test_committed_pipelines_and_components_are_current(compiled):
    fresh = sorted(p.relative_to(compiled) for p in compiled.rglob("*.yaml"))
    committed = sorted(
        [Path("pipelines") / p.name for p in (ROOT / "pipelines").glob("*.yaml")]
        + [p.relative_to(ROOT) for p in (ROOT / "components").glob("*/component.yaml")]
    )
    assert fresh == committed, "pipelines/ or components/ lack files: run `llmfab compile-pipelines`"
    stale = [str(p) for p in fresh if (compiled / p).read_text() != (ROOT / p).read_text()]
    assert not stale, f"stale compiled YAML (run `llmfab compile-pipelines`): {', '.join(stale)}"
    assert {p.stem for p in (ROOT / "pipelines").glob("*.yaml")} == set(list_families())
    assert {p.parent.name for p in (ROOT / "components").glob("*/component.yaml")} == set(shipped_stages())


def _example_secret_values() -> set[str]:
    values = set()
    for path in ROOT.glob("manifests/**/*.env*"):
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and value.strip() and not key.startswith("#") and CREDENTIAL_NAME.search(key):
                values.add(value.strip())
    return values


def test_compiled_yaml_holds_no_credentials(compiled):
    secrets = _example_secret_values()
    for path in compiled.rglob("*.yaml"):
        text = path.read_text()
        assert not [v for v in secrets if len(v) >= 6 and v in text], path
        for doc in yaml.safe_load_all(text):
            for name, spec in (
                (doc.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})).get("executors", {}).items()
            ):
                for ref in spec.get("secretAsEnv", []):
                    assert set(ref) >= {"secretName", "keyToEnv"}, (path, name)
        # Credentials reach pods only as secretKeyRefs: no env var of a credential name with a literal value.
        assert not re.search(r"name: \w*(PASSWORD|SECRET_ACCESS_KEY|TOKEN)\w*\s+value:", text), path


def _pipeline(compiled, family):
    """(the pipeline spec, its kfp-kubernetes executors)"""
    spec, platform = yaml.safe_load_all((compiled / "pipelines" / f"{family}.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.parametrize("family", list_families())
def test_pipeline_wires_the_recipe(compiled, family):
    recipe = load_recipe(family, "tiny")
    spec, platform = _pipeline(compiled, family)
    tasks = spec["root"]["dag"]["tasks"]
    by_step = {t["taskInfo"]["name"]: t for t in tasks.values()}
    assert set(by_step) == {"open-run", *(s.id for s in recipe.steps)}
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "preset",
        "overrides",
        "store",
        "tracking_uri",
        "experiment",
        "run_name",
        "parent_run_id",
    }
    key_of = {t["taskInfo"]["name"]: k for k, t in tasks.items()}
    for step in recipe.steps:
        task = by_step[step.id]
        upstream = {ref.partition(".")[0] for refs in step.inputs.values() for ref in as_refs(refs)}
        assert set(task.get("dependentTasks", [])) == {key_of[u] for u in upstream} | {key_of["open-run"]}, step.id
        inputs = task["inputs"]
        assert inputs["parameters"]["step_id"]["runtimeValue"]["constant"] == step.id
        for name, refs in step.inputs.items():
            if is_list_input(step.stage, name):
                assert f"in_{name}" in inputs["parameters"], (step.id, name)
            else:
                src, _, out = refs.partition(".")
                art = inputs["artifacts"][f"in_{name}"]["taskOutputArtifact"]
                assert art == {"producerTask": key_of[src], "outputArtifactKey": out}
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        assert container["image"].endswith(
            f"/llmfab-{step.stage.replace('_', '-')}:" + container["image"].split(":")[-1]
        )
        k8s = platform[executor]
        assert {s["secretName"] for s in k8s["secretAsEnv"]} == {"llmfab-s3", "llmfab-mlflow"}
        if stage_group(step.stage).gpu:
            assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert k8s["tolerations"] and k8s["nodeSelector"]["labels"]
        else:
            assert "accelerator" not in container.get("resources", {})
            assert "tolerations" not in k8s


def test_list_inputs_cover_the_recipes():
    for family in list_families():
        for step in load_recipe(family, "tiny").steps:
            for name, refs in step.inputs.items():
                if isinstance(refs, list):
                    assert (step.stage, name) in LIST_INPUTS, (family, step.id, name)
    for stage, name in LIST_INPUTS:
        spec = shipped_stages()[stage]
        assert name in {*spec.inputs, *spec.optional_inputs}
        assert "list" in {**spec.inputs, **spec.optional_inputs}[name]


def test_every_stage_component_is_typed():
    for name, spec in shipped_stages().items():
        component = stage_component(name)
        inputs = component.component_spec.inputs
        outputs = component.component_spec.outputs
        assert set(outputs) == {*spec.outputs, *(f"{o}_uri" for o in spec.outputs), "metrics"}
        assert outputs["metrics"].type == "system.Metrics@0.0.1"
        for out in spec.outputs:
            assert outputs[out].type in ("system.Model@0.0.1", "system.Dataset@0.0.1")
        for inp in spec.optional_inputs:
            assert inputs[f"in_{inp}"].optional, (name, inp)
        assert f"def {name}(" in component_source(spec)


def _artifact(cls, tmp_path, name, metadata=None):
    art = cls(name=name, uri=str(tmp_path / "kfp" / name), metadata=dict(metadata or {}))
    art.path  # noqa: B018 (an output artifact's file path below its uri)
    return art


def test_run_component_maps_artifacts_onto_the_stage(tmp_path, tracking_uri):
    """What a component does in its pod, in this process: store URIs in artifact metadata, a nested MLflow run."""
    tracker = Tracker(tracking_uri)
    store = (tmp_path / "store").as_uri()
    with tracker.run("parent") as parent:
        common = dict(
            recipe="qwen2",
            preset="tiny",
            overrides=SMALL,
            store_uri=store,
            tracking_uri=tracking_uri,
            experiment="",
            parent_run_id=parent.run_id,
        )
        data_out = {n: _artifact(dsl.Dataset, tmp_path, n) for n in ("text", "sft", "prompts", "preferences")}
        metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "kfp" / "m"))
        uris = run_component(
            "prepare_data", step_id="data", inputs={}, list_inputs={}, outputs=data_out, metrics=metrics, **common
        )
        assert uris == tuple(data_out[n].metadata[STORE_URI] for n in data_out)
        assert uris[0] == f"{store}/data/text"
        assert json.loads(Path(data_out["text"].path).read_text())[STORE_URI] == uris[0]
        tok = _artifact(dsl.Model, tmp_path, "tokenizer")
        run_component(
            "train_tokenizer",
            step_id="tokenizer",
            inputs={"corpus": data_out["text"]},
            list_inputs={},
            outputs={"tokenizer": tok},
            metrics=dsl.Metrics(name="metrics", uri=str(tmp_path / "kfp" / "m2")),
            **common,
        )
        with pytest.raises(Exception, match="is stage train_tokenizer, not pretrain"):
            run_component(
                "pretrain", step_id="tokenizer", inputs={}, list_inputs={}, outputs={}, metrics=metrics, **common
            )
    children = {r.info.run_name: r for r in tracker.child_runs(parent.run_id)}
    assert {"data", "tokenizer"} <= set(children)
    assert children["tokenizer"].data.tags["llmfab.input.corpus"] == f"{store}/data/text"
    assert tok.metadata[STORE_URI] == f"{store}/tokenizer/tokenizer"
    assert tok.metadata["mlflow_run_id"] == children["tokenizer"].info.run_id


def test_run_component_refuses_foreign_artifacts(tmp_path):
    from llmfab.errors import LlmfabError
    from llmfab.kubeflow.runtime import artifact_uri

    with pytest.raises(LlmfabError, match="not written by an llmfab component"):
        artifact_uri("corpus", dsl.Dataset(name="x", uri="gs://elsewhere/x", metadata={}))


MINI_RECIPE = """
family: mini
description: data, tokenizer, two short pretrains and their average (a list input)
steps:
  - {id: data, stage: prepare_data}
  - {id: tokenizer, stage: train_tokenizer, inputs: {corpus: data.text}}
  - {id: pa, stage: pretrain, inputs: {corpus: data.text, tokenizer: tokenizer.tokenizer}}
  - {id: pb, stage: pretrain, inputs: {corpus: data.text, tokenizer: tokenizer.tokenizer}}
  - {id: avg, stage: average, inputs: {models: [pa.model, pb.model]}}
presets:
  tiny:
    models:
      m: {arch: llama, vocab_size: 400, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1,
          intermediate_size: 64, max_position_embeddings: 64}
    config:
      data: {prose_docs: 40, code_docs: 20, task_docs: 40, sft_examples: 20, prompts: 10, preference_pairs: 20}
      tokenizer: {vocab_size: 400}
      pa: {model: "${models.m}", seq_len: 64, train: {max_steps: 2, batch_size: 2}}
      pb: {model: "${models.m}", seed: 1, seq_len: 64, train: {max_steps: 2, batch_size: 2}}
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mini_pipeline_runs_under_kfp_local(tmp_path, tracking_uri):
    """`llmfab run` of a 5-task pipeline through kfp.local (~1 min): artifact edges, a List[str] input (average's
    models), every step a nested MLflow run of one FINISHED parent."""
    path = tmp_path / "mini.yaml"
    path.write_text(MINI_RECIPE)
    store = tmp_path / "store"
    args = ["run", str(path), "--store", str(store), "--tracking-uri", tracking_uri, "--run-name", "mini-ci"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    tracker = Tracker(tracking_uri)
    (parent,) = tracker.client.search_runs([tracker.experiment_id], "attributes.run_name = 'mini-ci'")
    assert parent.info.status == "FINISHED" and parent.data.tags["llmfab.runner"] == "kfp-local"
    children = {r.info.run_name: r for r in tracker.child_runs(parent.info.run_id)}
    assert set(children) == {"data", "tokenizer", "pa", "pb", "avg"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    run_store = (store / "runs" / "mini-ci").as_uri()
    avg = children["avg"].data.tags
    assert avg["llmfab.output.model"] == f"{run_store}/avg/model"
    assert avg["llmfab.input.models"] == str([f"{run_store}/pa/model", f"{run_store}/pb/model"])
    assert parent.data.metrics["pa.train_loss"] > 0  # the steps' final metrics, on the parent too


class FakeKfp(BaseHTTPRequestHandler):
    """The few KFP v2beta1 endpoints kfp.Client calls to create a run or a recurring run."""

    requests: ClassVar[list] = []

    def _send(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.requests.append(("GET", self.path.split("?")[0], None))
        self._send({})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        path = self.path.split("?")[0]
        self.requests.append(("POST", path, body))
        if path == "/apis/v2beta1/experiments":
            self._send({"experiment_id": "exp-1", "display_name": body["display_name"]})
        elif path == "/apis/v2beta1/runs":
            self._send({"run_id": "run-1", "experiment_id": body["experiment_id"]})
        elif path == "/apis/v2beta1/recurringruns":
            self._send({"recurring_run_id": "rr-1", "experiment_id": body["experiment_id"]})
        else:
            self._send({"error": "not found"}, 404)

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_server():
    FakeKfp.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeKfp.requests
    server.shutdown()
    server.server_close()


def test_submit_creates_a_run(kfp_server, default_images):
    host, requests = kfp_server
    result = runner.invoke(
        app,
        ["submit", "llama31", "--host", host, "--store", "s3://bucket/llmfab", "--run-name", "nightly",
         "--set", "tokenizer.vocab_size=999"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1]) == {
        "kind": "run",
        "id": "run-1",
        "experiment_id": "exp-1",
        "name": "nightly",
    }
    posted = {path: body for method, path, body in requests if method == "POST"}
    assert posted["/apis/v2beta1/experiments"]["display_name"] == "llmfab"
    run = posted["/apis/v2beta1/runs"]
    assert run["display_name"] == "nightly"
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "llmfab-llama31"
    assert "kubernetes" in run["pipeline_spec"]["platform_spec"]["platforms"]
    assert run["runtime_config"]["parameters"] == {
        "preset": "tiny",
        "overrides": ["tokenizer.vocab_size=999"],
        "store": "s3://bucket/llmfab",
        "run_name": "nightly",
    }


def test_submit_schedules_a_recurring_run(kfp_server, default_images):
    host, requests = kfp_server
    result = runner.invoke(app, ["submit", "qwen2", "--host", host, "--schedule", "0 3 * * 0"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["kind"] == "recurring_run"
    job = next(body for method, path, body in requests if path == "/apis/v2beta1/recurringruns")
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"
    assert job["max_concurrency"] == "1" or job["max_concurrency"] == 1
    assert job["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "llmfab-qwen2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "qwen2", "--host", "http://127.0.0.1:9", "--schedule", "3 * *"], "cron line of 5"),
        (["submit", "qwen2", "--host", "http://127.0.0.1:9", "--preset", "nope"], "no preset 'nope'"),
        (["submit", "qwen2", "--host", "http://127.0.0.1:9"], "KFP at http://127.0.0.1:9"),
        (["run", "qwen2", "--runner", "bogus"], "--runner 'bogus'"),
        (["run", "qwen2", "--only", "data"], "--only needs --runner inprocess"),
    ],
)
def test_cli_errors(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_compile_pipelines_command(tmp_path, default_images):
    result = runner.invoke(app, ["compile-pipelines", "--root", str(tmp_path), "--registry", "localhost:5000/team"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "pipelines" / "gemma2.yaml").read_text()
    assert "image: localhost:5000/team/llmfab-rlhf-warp:" in text
    assert (tmp_path / "components" / "merge" / "component.yaml").is_file()
    # one pipeline compiles on its own too, for any preset default
    path = compile_pipeline("afm", tmp_path / "afm.yaml", preset="afm-3b")
    assert "afm-3b" in path.read_text()
