"""Kubeflow: per-stage components, family pipelines (compiled IR committed, stale check), the component runtime,
local runs under kfp.local, and submission to a (fake) KFP API server."""

import ast
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
from llmfab.kubeflow.runtime import STORE_URI, run_component, write_run_context
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


def test_tasks_install_nothing_at_run_time(compiled):
    """The stage images carry llmfab and kfp: a task runs no pip (an air-gapped cluster works)."""
    for path in compiled.rglob("*.yaml"):
        assert "pip install" not in path.read_text(), path


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


def _steps_dag(spec):
    """{display name: (task, the task in the exit handler's DAG that holds it: itself, or its loop/condition)}; a
    round's sub-pipeline task is there by its round's name (`round1`)."""
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"close-run", "exit-handler-1"}  # every step runs inside the exit handler
    assert root["close-run"]["inputs"]["parameters"]["status"] == {
        "taskFinalStatus": {"producerTask": "exit-handler-1"}
    }
    found = {}
    for key, task in spec["components"]["comp-exit-handler-1"]["dag"]["tasks"].items():
        if "parameterIterator" in task or "triggerPolicy" in task:  # a dsl.ParallelFor or dsl.If: one task inside
            ((_, step_task),) = spec["components"][task["componentRef"]["name"]]["dag"]["tasks"].items()
            found[step_task["taskInfo"]["name"]] = (step_task, key, task)
        else:
            found[task["taskInfo"]["name"]] = (task, key, task)
    return found


def _producer(recipe, key_of: dict, ref: str) -> tuple[str, str]:
    """(task key, output key) that feeds reference `ref`: a step's task, or its round's sub-pipeline task."""
    src, _, out = ref.partition(".")
    step = recipe.step(src)
    if step.round:
        return key_of[step.round.name], f"{step.base_id}__{out}"
    return key_of[src], out


@pytest.mark.parametrize("family", list_families())
def test_pipeline_wires_the_recipe(compiled, family):
    recipe = load_recipe(family, "tiny")
    spec, platform = _pipeline(compiled, family)
    by_step = _steps_dag(spec)
    conditions = {f"{s.when.step}-{s.when.value}" for s in recipe.steps if s.when}
    top = [s for s in recipe.steps if not s.round]  # a round's steps: in its sub-pipeline (test_recipe_control_flow)
    rounds = {s.round.name for s in recipe.steps if s.round}
    assert set(by_step) == {"open-run", *(s.id for s in top), *rounds, *conditions}
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "preset",
        "overrides",
        "store",
        "tracking_uri",
        "experiment",
        "run_name",
        "parent_run_id",
    }
    key_of = {name: key for name, (_, key, _) in by_step.items()}
    for step in top:
        task, _, group = by_step[step.id]
        upstream = {_producer(recipe, key_of, ref)[0] for refs in step.inputs.values() for ref in as_refs(refs)}
        upstream |= {key_of[f"{step.when.step}-{step.when.value}"]} if step.when else set()
        assert set(group.get("dependentTasks", [])) == upstream | {key_of["open-run"]}, step.id
        inputs = task["inputs"]
        assert inputs["parameters"]["step_id"]["runtimeValue"]["constant"] == step.id
        if step.variants:
            assert group["parameterIterator"]["items"]["raw"] == json.dumps(
                [json.dumps(v, sort_keys=True) for v in step.variants]
            )
        if step.when:  # tests the step-value task that passes the stage's value on
            assert f"== '{step.when.equals}'" in group["triggerPolicy"]["condition"], step.id
            value_task = by_step[f"{step.when.step}-{step.when.value}"][0]
            assert value_task["inputs"]["parameters"]["value"]["taskOutputParameter"] == {
                "producerTask": key_of[step.when.step],
                "outputParameterKey": step.when.value,
            }
        for name, refs in step.inputs.items():
            if is_list_input(step.stage, name):
                assert f"in_{name}" in inputs["parameters"], (step.id, name)
                continue
            producer, out = _producer(recipe, key_of, refs)
            art = (group if group is not task else task)["inputs"]["artifacts"]
            wired = (
                art[f"in_{name}"]
                if group is task
                else next(a for k, a in art.items() if k.endswith(f"{producer}-{out}"))
            )
            assert wired["taskOutputArtifact"] == {"producerTask": producer, "outputArtifactKey": out}
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        assert container["image"].endswith(
            f"/llmfab-{step.stage.replace('_', '-')}:" + container["image"].split(":")[-1]
        )
        k8s = platform[executor]
        assert {s["secretName"] for s in k8s["secretAsEnv"]} == {"llmfab-s3", "llmfab-mlflow", "llmfab-hf-token"}
        assert [m["mountPath"] for m in k8s["pvcMount"]] == ["/var/cache/llmfab/hf"]  # the shared hub cache
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
        assert set(outputs) == {*spec.outputs, *(f"{o}_uri" for o in spec.outputs), *spec.values, "metrics"}
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
        pipeline_run = dsl.Artifact(name="pipeline_run", uri=str(tmp_path / "kfp" / "run"), metadata={})
        write_run_context(pipeline_run, parent.run_id, store)
        common = dict(
            recipe="qwen2",
            preset="tiny",
            overrides=SMALL,
            tracking_uri=tracking_uri,
            experiment="",
            pipeline_run=pipeline_run,
            variant="",
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
description: data, tokenizer, two short pretrains (a parallel step) averaged, evaluated, registered, promoted
steps:
  - {id: data, stage: prepare_data}
  - {id: tokenizer, stage: train_tokenizer, inputs: {corpus: data.text}}
  - {id: pre, stage: pretrain, inputs: {corpus: data.text, tokenizer: tokenizer.tokenizer},
     parallel: [{seed: 0}, {seed: 1}]}
  - {id: avg, stage: average, inputs: {models: pre.model}}
  - {id: evaluate, stage: evaluate, inputs: {model: avg.model, data: data.sft, prompts: data.prompts}}
  - {id: register, stage: register, inputs: {model: avg.model, report: evaluate.report}}
  - {id: promote, stage: promote, inputs: {registration: register.registration}, when: register.decision == promote}
presets:
  tiny:
    models:
      m: {arch: llama, vocab_size: 400, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1,
          intermediate_size: 64, max_position_embeddings: 64}
    config:
      data: {prose_docs: 40, code_docs: 20, task_docs: 40, sft_examples: 20, prompts: 10, preference_pairs: 20}
      tokenizer: {vocab_size: 400}
      pre: {model: "${models.m}", seq_len: 64, train: {max_steps: 2, batch_size: 2}}
      evaluate: {prompts: 8, heldout_conversations: 8, sample_prompts: 0, needle_samples: 0, max_new_tokens: 8}
      register: {name: mini, gate: [{metric: gold_reward, margin: 0.0}]}
"""


def _run_mini(tmp_path, tracking_uri, run_name: str):
    """The mini pipeline under kfp.local as a cluster runs it: open-run creates the parent MLflow run (no
    `parent_run_id`), the exit task ends it."""
    from kfp import local

    from llmfab.kubeflow.pipelines import build_pipeline

    path = tmp_path / "mini.yaml"
    path.write_text(MINI_RECIPE)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"), raise_on_error=True)
    build_pipeline(str(path))(store=str(tmp_path / "store"), tracking_uri=tracking_uri, run_name=run_name)
    tracker = Tracker(tracking_uri)
    (parent,) = tracker.client.search_runs([tracker.experiment_id], f"attributes.run_name = '{run_name}'")
    return tracker, parent, {r.info.run_name: r for r in tracker.child_runs(parent.info.run_id)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mini_pipeline_runs_under_kfp_local(tmp_path, tracking_uri):
    """A 9-task pipeline through kfp.local (~2 min): ParallelFor + Collected (average's models), artifact edges,
    a dsl.If on register's decision, the exit handler ending the parent MLflow run; run twice, the second run
    reproduces the weights, so it reuses the registered version and the gate keeps the champion."""
    from llmfab.registry.loading import generate_text, load_registered

    tracker, parent, children = _run_mini(tmp_path, tracking_uri, "mini-1")
    assert parent.info.status == "FINISHED"  # set by the exit task
    assert sorted(children) == sorted(
        ["data", "tokenizer", "pre/seed-0", "pre/seed-1", "avg", "evaluate", "register", "promote"]
    )
    assert all(r.info.status == "FINISHED" for r in children.values())
    run_store = (tmp_path / "store" / "runs" / "mini-1").as_uri()
    avg = children["avg"].data.tags
    assert avg["llmfab.output.model"] == f"{run_store}/avg/model"
    assert sorted(ast.literal_eval(avg["llmfab.input.models"])) == [
        f"{run_store}/pre/seed-0/model",
        f"{run_store}/pre/seed-1/model",
    ]
    assert children["pre/seed-1"].data.params["seed"] == "1"
    assert children["register"].data.tags["llmfab.value.decision"] == "promote"  # no champion yet
    assert parent.data.metrics["pre/seed-0.train_loss"] > 0  # the steps' final metrics, copied by the exit task
    mv = tracker.client.get_model_version_by_alias("mini", "champion")
    assert mv.tags["llmfab.pipeline_run_id"] == parent.info.run_id and mv.tags["llmfab.family"] == "mini"
    assert float(mv.tags["llmfab.metric.heldout_loss"]) == children["evaluate"].data.metrics["heldout_loss"]
    model, _ = load_registered("models:/mini@champion", tracking_uri=tracking_uri)
    assert model.config.hidden_size == 32
    (text,) = generate_text("models:/mini@champion", ["What is 2 + 3?"], tracking_uri=tracking_uri, max_new_tokens=4)
    assert isinstance(text, str)

    tracker, again, children = _run_mini(tmp_path, tracking_uri, "mini-2")
    assert again.info.status == "FINISHED"
    assert children["register"].data.tags["llmfab.value.decision"] == "keep"
    assert "promote" not in children  # the condition was false
    versions = tracker.client.search_model_versions("name = 'mini'")
    assert [v.version for v in versions] == [mv.version]  # same weights: no second version


class FakeKfp(BaseHTTPRequestHandler):
    """The few KFP v2beta1 endpoints kfp.Client calls to create a run or a recurring run."""

    requests: ClassVar[list] = []
    run_state: ClassVar[str] = "SUCCEEDED"

    def _send(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        self.requests.append(("GET", path, None))
        if path == "/apis/v2beta1/runs/run-1":  # what kfp.Client.wait_for_run_completion polls
            self._send({"run_id": "run-1", "experiment_id": "exp-1", "state": self.run_state})
        else:
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
    FakeKfp.run_state = "SUCCEEDED"
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
    path = compile_pipeline("afm", tmp_path / "afm.yaml", preset="afm-3b-replica")
    assert "afm-3b-replica" in path.read_text()


def test_open_and_close_run_on_a_cluster(tracking_uri, tmp_path):
    """What open-run and the exit task do in pods: the parent run stays RUNNING through the steps, carries the
    data fingerprint, and ends with the pipeline's state and every step's final metrics; an adopted run (a local
    `llmfab run`) is left to its owner."""
    from llmfab.data.version import DATA_FINGERPRINT_TAG, data_fingerprint
    from llmfab.kubeflow.runtime import KFP_RUN_TAG, close_run, open_run

    store = (tmp_path / "store").as_uri()
    args = ("qwen2", "tiny", SMALL, store, tracking_uri, "", "nightly-1", "")
    run_id, run_store = open_run(*args, kfp_run_id="kfp-1")
    assert run_store == f"{store}/runs/nightly-1"
    tracker = Tracker(tracking_uri)
    parent = tracker.client.get_run(run_id)
    assert parent.info.status == "RUNNING" and parent.data.tags[KFP_RUN_TAG] == "kfp-1"
    assert parent.data.tags[DATA_FINGERPRINT_TAG] == data_fingerprint(load_recipe("qwen2", "tiny", SMALL))
    assert parent.data.tags[DATA_FINGERPRINT_TAG] != data_fingerprint(
        load_recipe("qwen2", "tiny", [*SMALL, "data.seed=1"])
    )
    with tracker.run("sft", parent_run_id=run_id) as child:
        child.log_metrics({"eval_loss": 1.5})
    close_run("kfp-1", "", tracking_uri, "", "FAILED")
    parent = tracker.client.get_run(run_id)
    assert parent.info.status == "FAILED" and parent.data.metrics["sft.eval_loss"] == 1.5
    with pytest.raises(Exception, match=r"no MLflow run tagged llmfab\.kfp_run_id=kfp-2"):
        close_run("kfp-2", "", tracking_uri, "", "SUCCEEDED")
    with tracker.run("held by the CLI") as held:
        assert open_run(*args[:-1], held.run_id, kfp_run_id="kfp-3") == (held.run_id, f"{store}/runs/nightly-1")
        close_run("kfp-3", held.run_id, tracking_uri, "", "SUCCEEDED")  # adopted: not touched
        assert tracker.client.get_run(held.run_id).info.status == "RUNNING"


def test_trainjob_steps_compile_without_gpus_on_their_tasks(tmp_path, default_images):
    from llmfab.errors import ConfigError
    from llmfab.kube.trainjob import LaunchConfig

    launch = LaunchConfig(num_nodes=2, gpus_per_node=8, cpu="90", memory="900Gi")
    path = compile_pipeline("llama31", tmp_path / "l.yaml", trainjobs={"pretrain": launch})
    spec, platform = yaml.safe_load_all(path.read_text())
    platform = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    task = _steps_dag(spec)["pretrain"][0]
    assert (
        LaunchConfig.model_validate_json(task["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"]) == launch
    )
    executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    assert "accelerator" not in spec["deploymentSpec"]["executors"][executor]["container"].get("resources", {})
    assert "tolerations" not in platform[executor]
    sft = _steps_dag(spec)["sft"][0]
    assert "launch" not in sft["inputs"]["parameters"]  # the other training steps run in their own (GPU) task
    with pytest.raises(ConfigError, match="stage prepare_data does not train"):
        compile_pipeline("llama31", tmp_path / "x.yaml", trainjobs={"data": launch})
    with pytest.raises(ConfigError, match="'nope': no such step"):
        compile_pipeline("llama31", tmp_path / "x.yaml", trainjobs={"nope": launch})


def test_recipe_uri_inputs_become_importers_that_run_under_kfp_local(tmp_path, tracking_uri):
    """An input written as a URI in the recipe (data prepared elsewhere) is a dsl.importer whose artifact carries
    the URI as store_uri; under kfp.local the step reads it like any step output (~20 s)."""
    from kfp import local

    from llmfab.kubeflow.pipelines import build_pipeline
    from llmfab.stages.runner import run_stage
    from llmfab.storage import open_store

    data = run_stage(
        "prepare_data",
        dict(prose_docs=20, code_docs=10, task_docs=20, sft_examples=10, prompts=10, preference_pairs=10),
        store=open_store(tmp_path / "prepared"),
        track=False,
        show_progress=False,
    ).outputs["text"]
    path = tmp_path / "imported.yaml"
    path.write_text(
        "family: imported\nsteps:\n"
        f"  - {{id: tokenizer, stage: train_tokenizer, inputs: {{corpus: '{data}'}}}}\n"
        "presets: {tiny: {config: {tokenizer: {vocab_size: 300}}}}\n"
    )
    path_yaml = compile_pipeline(str(path), tmp_path / "imported-ir.yaml")
    spec = next(yaml.safe_load_all(path_yaml.read_text()))
    (importer,) = [e["importer"] for e in spec["deploymentSpec"]["executors"].values() if "importer" in e]
    assert importer["artifactUri"]["constant"] == data and importer["metadata"] == {STORE_URI: data}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"), raise_on_error=True)
    build_pipeline(str(path))(store=str(tmp_path / "store"), tracking_uri=tracking_uri, run_name="imported")
    tracker = Tracker(tracking_uri)
    (parent,) = tracker.client.search_runs([tracker.experiment_id], "attributes.run_name = 'imported'")
    (child,) = tracker.child_runs(parent.info.run_id)
    assert child.data.tags["llmfab.input.corpus"] == data and child.info.status == "FINISHED"
    assert parent.info.status == "FINISHED" and parent.data.metrics["tokenizer.vocab_size"] == 300
