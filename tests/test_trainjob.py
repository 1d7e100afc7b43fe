"""llmfab.kube.trainjob: the TrainJob a training stage is launched as (fields, runtime, image, no credential
values; strictly valid against the trimmed Trainer v2.2.0 CRD schema in manifests/schemas/), and submitting and
following it through a real kubernetes client talking to a fake API server on 127.0.0.1 whose TrainJob goes
Pending -> Created -> Running -> Complete, or Failed, or never finishes."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import typer
import yaml
from pydantic import Field
from test_manifests import K8S_VERSIONS, crd_validator
from typer.testing import CliRunner

from conftest import TINY_MODEL
from llmfab.cli import app
from llmfab.config.base import apply_overrides
from llmfab.errors import ConfigError
from llmfab.images import image_for
from llmfab.kube.trainjob import (
    RESULT_FILE,
    LaunchConfig,
    LaunchError,
    TrainJobFailed,
    TrainJobTimeout,
    launch_stage,
    render_trainjob,
    submit_trainjob,
    wait_for_trainjob,
)
from llmfab.stages import get_stage
from llmfab.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "manifests" / "schemas" / "trainjob-trainer-v1alpha1.json"
RUNTIMES = ROOT / "manifests" / "base" / "runtimes"
CONFIG = {"model": TINY_MODEL, "seq_len": 64, "train": {"max_steps": 20, "batch_size": 4}}
INPUTS = {"corpus": "s3://llmfab/data/text", "tokenizer": "s3://llmfab/tok"}
OUTPUT = "s3://llmfab/runs/r1/pretrain"
GPU_NODES = LaunchConfig(name="pretrain-r1", num_nodes=2, gpus_per_node=8, cpu="90", memory="900Gi")


def _render(stage="pretrain", config=CONFIG, inputs=INPUTS, output=OUTPUT, **launch) -> dict:
    return render_trainjob(stage, config, inputs, output, LaunchConfig(**{"name": "pretrain-r1", **launch}))


def _runtimes() -> dict[str, dict]:
    docs = [yaml.safe_load(p.read_text()) for p in sorted(RUNTIMES.glob("llmfab-*.yaml"))]
    return {d["metadata"]["name"]: d for d in docs}


def _parse_stage_args(args: list[str]) -> dict:
    """The TrainJob's args as `llmfab` parses them (after the runtime's `torchrun --no-python llmfab`)."""
    group = typer.main.get_command(app)
    ctx = group.make_context("llmfab", list(args))
    name, *rest = ctx._protected_args + ctx.args
    return group.get_command(ctx, name).make_context(name, rest, parent=ctx).params


# -- rendering ------------------------------------------------------------------------------------------


def test_render_fields():
    obj = render_trainjob("pretrain", CONFIG, INPUTS, OUTPUT, GPU_NODES)
    assert (obj["apiVersion"], obj["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert obj["metadata"]["name"] == "pretrain-r1"
    assert obj["metadata"]["namespace"] == "kubeflow"
    assert obj["metadata"]["labels"]["llmfab.dev/stage"] == "pretrain"
    assert obj["metadata"]["annotations"]["llmfab.dev/output"] == OUTPUT
    assert obj["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "llmfab-train",
    }
    trainer = obj["spec"]["trainer"]
    assert trainer["image"] == image_for("pretrain") == "ghcr.io/llmfab/llmfab-pretrain:0.1.0"
    assert trainer["numNodes"] == 2
    assert "numProcPerNode" not in trainer  # the runtime's `auto`: one rank per GPU
    amounts = {"cpu": "90", "memory": "900Gi", "nvidia.com/gpu": "8"}
    assert trainer["resourcesPerNode"] == {"requests": amounts, "limits": amounts}
    assert trainer["args"][:6] == ["--verbose", "stage", "pretrain", "--output", OUTPUT, "--write-result"]


def test_args_rebuild_the_config_and_inputs_through_the_cli():
    spec = get_stage("pretrain")
    params = _parse_stage_args(_render()["spec"]["trainer"]["args"])
    assert params["name"] == "pretrain" and params["output"] == OUTPUT and params["write_result"] is True
    assert spec.make_config(apply_overrides({}, params["set_"])) == spec.make_config(CONFIG)
    assert sorted(params["input_"]) == sorted(f"{k}={v}" for k, v in INPUTS.items())


def test_runtime_follows_deepspeed_and_exists_in_manifests():
    runtimes = _runtimes()
    plain = _render()
    ds_config = {**CONFIG, "train": {**CONFIG["train"], "deepspeed": {"zero_optimization": {"stage": 2}}}}
    ds = _render(config=ds_config)
    assert plain["spec"]["runtimeRef"]["name"] == "llmfab-train"
    assert ds["spec"]["runtimeRef"]["name"] == "llmfab-deepspeed"
    assert "numProcPerNode" not in ds["spec"]["trainer"]  # ZeRO shards over the runtime's `auto` ranks, as DDP
    for obj in (plain, ds):
        runtime = runtimes[obj["spec"]["runtimeRef"]["name"]]
        assert runtime["kind"] == obj["spec"]["runtimeRef"]["kind"]
        pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        node = next(c for c in pod["spec"]["containers"] if c["name"] == "node")
        # The TrainJob gives args only: the runtime's torchrun starts `llmfab` with them on every rank.
        assert node["command"] == ["torchrun", "--no-python", "llmfab"]
        assert "command" not in obj["spec"]["trainer"]
    multi = _render(config=ds_config, num_nodes=2, procs_per_node=4)  # multi-node ZeRO: every rank uploads its shards
    assert (multi["spec"]["trainer"]["numNodes"], multi["spec"]["trainer"]["numProcPerNode"]) == (2, 4)


def test_image_registry_and_tag(monkeypatch):
    monkeypatch.setenv("LLMFAB_IMAGE_REGISTRY", "registry.example:5000/team")
    monkeypatch.setenv("LLMFAB_IMAGE_TAG", "1.2.3")
    sft = _render(stage="sft", config={}, inputs={"model": "s3://b/pretrained", "data": "s3://b/sft"})
    assert sft["spec"]["trainer"]["image"] == "registry.example:5000/team/llmfab-sft:1.2.3"
    assert _render(image="other/img:9")["spec"]["trainer"]["image"] == "other/img:9"


def test_credentials_only_by_secret_reference(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "launcher-s3-secret")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "launcher-mlflow-password")
    monkeypatch.setenv("LLMFAB_PARENT_RUN_ID", "parent123")
    obj = _render(tracking_uri="http://mlflow.llmfab.svc:5000", experiment="exp", env={"HF_HUB_OFFLINE": "1"})
    text = yaml.safe_dump(obj)
    assert "launcher-s3-secret" not in text and "launcher-mlflow-password" not in text
    env = {e["name"]: e for e in obj["spec"]["trainer"]["env"]}
    plain = {name: e["value"] for name, e in env.items() if "value" in e}
    assert plain == {
        "MLFLOW_TRACKING_URI": "http://mlflow.llmfab.svc:5000",
        "MLFLOW_EXPERIMENT_NAME": "exp",
        "LLMFAB_PARENT_RUN_ID": "parent123",
        "HF_HUB_OFFLINE": "1",
    }
    refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    assert {name: (ref["name"], ref["key"]) for name, ref in refs.items()} == {
        "AWS_ACCESS_KEY_ID": ("llmfab-s3", "AWS_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": ("llmfab-s3", "AWS_SECRET_ACCESS_KEY"),
        "MLFLOW_TRACKING_USERNAME": ("llmfab-mlflow", "MLFLOW_TRACKING_USERNAME"),
        "MLFLOW_TRACKING_PASSWORD": ("llmfab-mlflow", "MLFLOW_TRACKING_PASSWORD"),
        "HF_TOKEN": ("llmfab-hf-token", "token"),  # gated hub repos
    }
    assert refs["HF_TOKEN"]["optional"] is True  # public repos need no token
    # The same Secrets the runtimes' pods get (whole as envFrom, the hub token as HF_TOKEN), and the only ones the
    # runner's Role may read.
    for runtime in _runtimes().values():
        pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        from_runtime = {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s}
        runtime_env = {e["name"]: e for e in container["env"]}
        assert runtime_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == refs["HF_TOKEN"]
        assert {ref["name"] for ref in refs.values()} == from_runtime | {"llmfab-hf-token"}
    rbac = list(yaml.safe_load_all((ROOT / "manifests/base/runner/rbac.yaml").read_text()))
    role = next(d for d in rbac if d["kind"] == "Role")
    readable = next(r["resourceNames"] for r in role["rules"] if r["resources"] == ["secrets"])
    assert set(readable) == {ref["name"] for ref in refs.values()}

    with pytest.raises(ConfigError, match="credentials are never passed as values"):
        _render(env={"AWS_SECRET_ACCESS_KEY": "x"})
    with pytest.raises(ConfigError, match="tracking_uri carries a password"):
        _render(tracking_uri="http://admin:pw@mlflow:5000")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage": "prepare_data", "config": {}, "inputs": {}}, "does not run the Trainer"),
        ({"output": "/tmp/out"}, "cannot see this machine's files"),
        ({"inputs": {**INPUTS, "corpus": "file:///data/text"}}, "input corpus"),
        ({"inputs": {"corpus": "s3://b/t"}}, "missing input"),
        ({"config": {"train": {"max_stepz": 1}}}, "max_stepz"),
        ({"gpus_per_node": 8}, "give cpu and memory"),
        ({"cpu": "8", "memory": "lots"}, "not a Kubernetes quantity"),
        ({"name": "Pretrain_1"}, "RFC 1035"),
        ({"labels": {"team": "a b"}}, "not a valid label value"),
        ({"labels": {"llmfab.dev/stage": "sft"}}, "set by the launcher"),
        ({"env": {"1X": "y"}}, "not a valid environment variable name"),
    ],
)
def test_render_refuses(change, message):
    with pytest.raises(ConfigError, match=message):
        _render(**change)


# -- the schema -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_trainjobs_validate_strictly(version):
    validator = crd_validator(version, SCHEMA)
    ds_config = {**CONFIG, "train": {**CONFIG["train"], "deepspeed": {"zero_optimization": {"stage": 2}}}}
    for obj in (
        _render(),
        render_trainjob("pretrain", CONFIG, INPUTS, OUTPUT, GPU_NODES),
        _render(config=ds_config, tracking_uri="http://mlflow:5000", labels={"team": "nlp"}, env={"A": "b"}),
        _render(stage="dpo", config={}, inputs={"model": "s3://b/sft", "data": "s3://b/prefs"}),
    ):
        validator.validate(obj)


def test_schema_is_strict_and_pinned():
    validator = crd_validator(K8S_VERSIONS[0], SCHEMA)
    good = _render()
    for path, bad in [
        (("spec", "trainer"), {"numNode": 2}),  # a typo in Trainer's part
        (("spec",), {"runtimeref": {"name": "x"}}),
        (("metadata",), {"name": "Pretrain"}),  # the CRD's RFC 1035 rule
        (("spec", "trainer"), {"env": [{"name": "A", "valu": "b"}]}),  # inside a Kubernetes type
        (("spec", "trainer"), {"args": ["x"] * 129}),
    ]:
        obj = json.loads(json.dumps(good))
        target = obj
        for key in path:
            target = target[key]
        target.update(bad)
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(obj)
    upstream = yaml.safe_load((ROOT / "manifests/upstream/trainer/kustomization.yaml").read_text())
    release = upstream["resources"][0].rpartition("?ref=")[2]
    assert f"Kubeflow Trainer {release}" in json.loads(SCHEMA.read_text())["description"]


# -- the fake API transport -----------------------------------------------------------------------------

PREFIX = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"
CREATED = {"conditions": [{"type": "Created", "status": "True", "reason": "JobsCreationSucceeded"}]}
RUNNING = {
    **CREATED,
    "jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0, "suspended": 0}],
}
COMPLETE = {
    "conditions": [
        *CREATED["conditions"],
        {"type": "Complete", "status": "True", "reason": "AllJobsCompleted", "message": "jobset completed"},
    ],
    "jobsStatus": [{"name": "node", "active": 0, "ready": 0, "succeeded": 2, "failed": 0, "suspended": 0}],
}
FAILED = {
    "conditions": [
        *CREATED["conditions"],
        {"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "jobset failed: node-0 failed"},
    ],
    "jobsStatus": [{"name": "node", "active": 0, "ready": 0, "succeeded": 0, "failed": 1, "suspended": 0}],
}


class FakeTrainJobAPI:
    """Just enough of the Kubernetes API for trainjobs.trainer.kubeflow.org, on 127.0.0.1: POST stores the
    object (409 if the name exists, or `create_status`), each GET serves the next scripted status (the last
    repeats; an int answers that HTTP error instead), DELETE removes it. Every request is recorded."""

    def __init__(self, statuses: list, *, on_get=None, create_status: int | None = None):
        self.statuses, self.on_get, self.create_status = list(statuses), on_get, create_status
        self.requests: list[tuple[str, str, dict | None]] = []
        self.objects: dict[tuple[str, str], dict] = {}
        self.gets = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, code: int, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message})

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path = urlparse(self.path).path
                api.requests.append((method, path, body))
                if not path.startswith(PREFIX):
                    return self._error(404, f"the server could not find the requested resource {path}")
                namespace, plural, *name = path[len(PREFIX) :].split("/")
                if plural != "trainjobs":
                    return self._error(404, f"no resource {plural}")
                key = (namespace, name[0] if name else body["metadata"]["name"])
                if method == "POST":
                    if api.create_status:
                        return self._error(api.create_status, f"trainjobs is forbidden: {key[1]}")
                    if key in api.objects:
                        return self._error(409, f'trainjobs.trainer.kubeflow.org "{key[1]}" already exists')
                    api.objects[key] = {**body, "metadata": {**body["metadata"], "uid": "u-1"}}
                    return self._send(201, api.objects[key])
                if key not in api.objects:
                    return self._error(404, f'trainjobs.trainer.kubeflow.org "{key[1]}" not found')
                if method == "DELETE":
                    del api.objects[key]
                    return self._send(200, {"kind": "Status", "status": "Success"})
                status = api.statuses[min(api.gets, len(api.statuses) - 1)]
                api.gets += 1
                if isinstance(status, int):
                    return self._error(status, "etcdserver: request timed out")
                obj = {**api.objects[key], "status": status}
                if api.on_get:
                    api.on_get(obj)
                return self._send(200, obj)

            def do_POST(self):
                self._handle("POST")

            def do_GET(self):
                self._handle("GET")

            def do_DELETE(self):
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def client(self):
        from kubernetes import client

        return client.ApiClient(client.Configuration(host=self.host))

    def methods(self) -> list[str]:
        return [method for method, _, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_api():
    servers = []

    def start(statuses, **kwargs) -> FakeTrainJobAPI:
        servers.append(FakeTrainJobAPI(statuses, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _pod_writes_result(payload: dict):
    """What rank 0 of the job does before the JobSet completes: `llmfab stage --write-result`."""

    def on_get(obj: dict) -> None:
        if any(c["type"] == "Complete" for c in obj["status"].get("conditions", [])):
            output = obj["metadata"]["annotations"]["llmfab.dev/output"]
            open_store(output).put_text(RESULT_FILE, json.dumps(payload))

    return on_get


def test_launch_follows_created_running_complete(fake_api, s3_bucket):
    output = f"s3://{s3_bucket}/runs/r1/pretrain"
    payload = {"outputs": {"model": f"{output}/model"}, "metrics": {"eval_loss": 5.1}, "run_id": "run-1"}
    # One GET answers 500 (a hiccup of the API server): retried, not fatal. Running is served twice, reported once.
    api = fake_api([{}, CREATED, RUNNING, 500, RUNNING, COMPLETE], on_get=_pod_writes_result(payload))
    changes = []
    result = launch_stage(
        "pretrain",
        CONFIG,
        INPUTS,
        output=output,
        launch=LaunchConfig(name="pretrain-r1", num_nodes=2, poll_s=0.01),
        api_client=api.client(),
        on_status=changes.append,
    )
    assert [c.phase for c in changes] == ["Pending", "Created", "Running", "Complete"]
    assert changes[1].text == "Created | conditions: Created=True (JobsCreationSucceeded)"
    assert changes[2].text.endswith("| jobs: node: 2 active, 2 ready, 0 succeeded, 0 failed")
    assert "Complete=True (AllJobsCompleted)" in changes[3].text
    assert (result.outputs, result.metrics, result.run_id) == (payload["outputs"], payload["metrics"], "run-1")
    assert result.status == COMPLETE and (result.namespace, result.name) == ("kubeflow", "pretrain-r1")

    # What went over the wire: the rendered TrainJob (schema-valid), polls, then the cleanup after success.
    assert api.methods() == ["POST", *["GET"] * 6, "DELETE"]
    _, path, posted = api.requests[0]
    assert path == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/kubeflow/trainjobs"
    assert posted == render_trainjob("pretrain", CONFIG, INPUTS, output, LaunchConfig(name="pretrain-r1", num_nodes=2))
    crd_validator(K8S_VERSIONS[0], SCHEMA).validate(posted)
    assert api.requests[-1][1].endswith("/trainjobs/pretrain-r1") and not api.objects


@pytest.mark.parametrize("cleanup", ["on_success", "always"])
def test_failed_trainjob_raises_with_what_to_look_at(fake_api, cleanup):
    api = fake_api([CREATED, RUNNING, FAILED])
    changes = []
    with pytest.raises(TrainJobFailed) as err:
        launch_stage(
            "pretrain",
            CONFIG,
            INPUTS,
            output=OUTPUT,
            launch=LaunchConfig(name="pretrain-bad", poll_s=0.01, cleanup=cleanup),
            api_client=api.client(),
            on_status=changes.append,
        )
    message = str(err.value)
    assert [c.phase for c in changes] == ["Created", "Running", "Failed"]
    assert "TrainJob kubeflow/pretrain-bad failed (FailedJobs: jobset failed: node-0 failed)" in message
    assert "Jobs: node: 0 active, 0 ready, 0 succeeded, 1 failed." in message
    assert "kubectl -n kubeflow logs -l jobset.sigs.k8s.io/jobset-name=pretrain-bad" in message
    kept = "The TrainJob is kept; remove it with: kubectl -n kubeflow delete trainjob pretrain-bad"
    if cleanup == "always":
        assert api.methods()[-1] == "DELETE" and kept not in message
    else:
        assert "DELETE" not in api.methods() and kept in message


@pytest.mark.parametrize("cleanup", ["on_success", "always"])
def test_never_finishing_trainjob_times_out(fake_api, cleanup):
    api = fake_api([CREATED, RUNNING])
    start = time.monotonic()
    with pytest.raises(TrainJobTimeout, match=r"did not finish within 0.3 s \(last status: Running \| conditions"):
        launch_stage(
            "pretrain",
            CONFIG,
            INPUTS,
            output=OUTPUT,
            launch=LaunchConfig(name="pretrain-slow", poll_s=0.02, timeout_s=0.3, cleanup=cleanup),
            api_client=api.client(),
        )
    assert 0.3 <= time.monotonic() - start < 10
    assert api.methods().count("GET") >= 3
    assert ("DELETE" in api.methods()) == (cleanup == "always")


def test_submit_conflict_and_attach(fake_api):
    api = fake_api([RUNNING, COMPLETE])
    obj = _render(name="pretrain-again")
    submit_trainjob(obj, api.client())
    with pytest.raises(LaunchError, match=r"HTTP 409 .*already exists.*attach to it"):
        submit_trainjob(obj, api.client())
    assert submit_trainjob(obj, api.client(), attach=True)["metadata"]["uid"] == "u-1"
    final = wait_for_trainjob("pretrain-again", "kubeflow", api.client(), poll_s=0.01, on_status=lambda c: None)
    assert final["status"] == COMPLETE


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (403, "may not create trainjobs.trainer.kubeflow.org in namespace kubeflow"),
        (404, "is Kubeflow Trainer installed?"),
    ],
)
def test_submit_errors_say_why(fake_api, code, hint):
    api = fake_api([RUNNING], create_status=code)
    with pytest.raises(LaunchError, match=f"creating TrainJob kubeflow/pretrain-r1: HTTP {code} .*{hint}"):
        submit_trainjob(_render(), api.client())


def test_vanished_trainjob_and_unreachable_api(fake_api):
    api = fake_api([RUNNING])
    with pytest.raises(LaunchError, match="no longer exists"):
        wait_for_trainjob("never-created", "kubeflow", api.client(), poll_s=0.01)
    host = api.host
    api.close()
    from kubernetes import client

    offline = client.ApiClient(client.Configuration(host=host))
    offline.configuration.retries = 0
    with pytest.raises(LaunchError, match=f"cannot reach the Kubernetes API at {host}"):
        submit_trainjob(_render(), offline)


# -- the command line ------------------------------------------------------------------------------------


def test_cli_launch_dry_run_prints_a_valid_trainjob():
    args = ["launch", "pretrain", "--dry-run", "--output", OUTPUT, "--nodes", "2", "--gpus", "8", "--cpu", "90"]
    args += ["--memory", "900Gi", "--name", "pretrain-r1", "--set", "train.max_steps=20"]
    args += ["--set", "train.batch_size=4"]
    args += [f"--input={k}={v}" for k, v in INPUTS.items()]
    result = CliRunner().invoke(app, [*args, "--set", "seq_len=64", "--set", f"model={json.dumps(TINY_MODEL)}"])
    assert result.exit_code == 0, result.output
    obj = yaml.safe_load(result.stdout)
    assert obj == render_trainjob("pretrain", CONFIG, INPUTS, OUTPUT, GPU_NODES)
    crd_validator(K8S_VERSIONS[0], SCHEMA).validate(obj)

    refused = CliRunner().invoke(app, [*args, "--env", "AWS_SECRET_ACCESS_KEY=x"])
    assert refused.exit_code == 2 and "credentials are never passed as values" in refused.output


def _launch_options() -> dict:
    return {p.opts[0]: p for p in typer.main.get_command(app).commands["launch"].params}


def test_cli_launch_options_are_the_launch_config_fields():
    """Each LaunchConfig field is an option of `llmfab launch` with the field's description as help, but the
    cluster's Secret and GPU resource names. Pinned: the command line is an interface."""
    options = _launch_options()
    assert list(options) == [
        "name", "--config", "--input", "--output", "--store", "--set",
        "--namespace", "--name", "--nodes", "--procs-per-node", "--gpus", "--cpu", "--memory", "--runtime", "--image",
        "--registry", "--tag", "--tracking-uri", "--experiment", "--parent-run-id", "--env", "--label", "--timeout",
        "--poll", "--cleanup", "--attach",
        "--dry-run", "--gpu-memory", "--plan-check",  # launch's own: the memory plan checked before launching
    ]  # fmt: skip
    short = {"num_nodes": "nodes", "gpus_per_node": "gpus", "labels": "label", "timeout_s": "timeout", "poll_s": "poll"}
    for field, info in LaunchConfig.model_fields.items():
        flag = "--" + short.get(field, field).replace("_", "-")
        if field in ("gpu_resource", "s3_secret", "mlflow_secret"):
            assert flag not in options
        else:
            assert options[flag].help == info.description, field
    defaults = {flag: options[flag].default for flag in ("--nodes", "--poll", "--cleanup")}
    assert defaults == {"--nodes": 1, "--poll": 15.0, "--cleanup": "on_success"}
    assert options["--timeout"].default is None  # not given: LaunchConfig's own 72 h
    assert options["--attach"].secondary_opts == ["--no-attach"]
    assert options["--env"].multiple and options["--label"].multiple


def test_a_new_launch_config_field_is_a_new_option():
    from llmfab.cli import _model_options

    class Wider(LaunchConfig):
        priority_class: str | None = Field(None, description="PriorityClass of the pods")
        annotations: dict[str, str] = Field(default_factory=dict, description="More annotations, KEY=VALUE")

    given = {}
    command = typer.Typer()

    @command.command()
    @_model_options(Wider, into="options", before="dry_run", flags={"num_nodes": "--nodes"}, skip={"s3_secret"})
    def go(name: str, dry_run: bool = False, options=dict) -> None:
        given.update(options(), stage=name, dry_run=dry_run)

    help_text = CliRunner().invoke(command, ["--help"], env={"COLUMNS": "200"}).output
    assert "--priority-class" in help_text and "PriorityClass of the pods" in help_text
    assert "--nodes" in help_text and "--s3-secret" not in help_text
    args = ["pretrain", "--priority-class", "high", "--annotations", "a=b", "--name", "job-1", "--dry-run"]
    assert CliRunner().invoke(command, args).exit_code == 0
    assert {k: given[k] for k in ("stage", "name", "priority_class", "annotations", "dry_run", "num_nodes")} == {
        "stage": "pretrain", "name": "job-1", "priority_class": "high", "annotations": {"a": "b"}, "dry_run": True,
        "num_nodes": 1,
    }  # fmt: skip
    assert "timeout_s" not in given  # may be None, so not given: the model's default applies
    settings = Wider.model_validate({k: v for k, v in given.items() if k not in ("stage", "dry_run")})
    assert settings.timeout_s == 72 * 3600 and settings.annotations == {"a": "b"}
    with pytest.raises(TypeError, match="no field"):
        _model_options(Wider, into="options", before="dry_run", flags={"nodes": "--n"}, skip=set())


def test_names_stay_importable_from_trainjob():
    """The module was split by concern; what other code imports from llmfab.kube.trainjob is the same object."""
    import llmfab.kube
    from llmfab.kube import api, errors, launch_config, manifest, pod_env, stage_command, status, trainjob

    homes = {
        launch_config: ["LaunchConfig"],
        errors: ["LaunchError", "TrainJobFailed", "TrainJobTimeout"],
        manifest: ["render_trainjob", "trainjob_name", "default_namespace", "TRAINER_IMAGE_GROUP", "GROUP"],
        pod_env: ["S3_SECRET", "MLFLOW_SECRET", "S3_KEYS", "MLFLOW_KEYS", "CREDENTIAL_NAME", "PARENT_RUN_ENV"],
        stage_command: ["RESULT_FILE", "config_overrides"],
        status: ["StatusChange", "describe_status", "trainjob_phase", "COMPLETE"],
        api: ["submit_trainjob", "wait_for_trainjob", "delete_trainjob", "kube_client"],
    }
    for module, names in homes.items():
        for name in names:
            assert getattr(trainjob, name) is getattr(module, name), name
    assert all(hasattr(trainjob, name) for name in trainjob.__all__)
    assert all(getattr(llmfab.kube, name) is getattr(trainjob, name) for name in llmfab.kube.__all__)


def _use_kubeconfig(api, tmp_path, monkeypatch) -> None:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": api.host}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
        "current-context": "fake",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_cli_launch_through_a_kubeconfig(fake_api, s3_bucket, tmp_path, monkeypatch):
    output = f"s3://{s3_bucket}/runs/r2/pretrain"
    payload = {"outputs": {"model": f"{output}/model"}, "metrics": {}, "run_id": None}
    api = fake_api([CREATED, RUNNING, COMPLETE], on_get=_pod_writes_result(payload))
    _use_kubeconfig(api, tmp_path, monkeypatch)
    args = ["launch", "pretrain", "--output", output, "--name", "pretrain-r2", "--poll", "0.01", "--cleanup", "never"]
    result = CliRunner().invoke(app, [*args, *(f"--input={k}={v}" for k, v in INPUTS.items())])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == payload
    lines = result.stderr.splitlines()
    assert lines[1] == (
        "TrainJob pretrain-r2: Running | conditions: Created=True (JobsCreationSucceeded) "
        "| jobs: node: 2 active, 2 ready, 0 succeeded, 0 failed"
    )
    assert "TrainJob kubeflow/pretrain-r2 complete" in result.stderr
    assert "DELETE" not in api.methods() and ("kubeflow", "pretrain-r2") in api.objects


def test_pipeline_step_as_a_trainjob(fake_api, s3_bucket, tmp_path, monkeypatch):
    """A pipeline compiled with `trainjobs` hands that step to a TrainJob: its task submits it (with the pipeline's
    MLflow run as parent), follows it to Complete and passes the stage's outputs on as its own artifacts."""
    from kfp import dsl

    from llmfab.kubeflow.runtime import STORE_URI, run_component, write_run_context

    run_store = f"s3://{s3_bucket}/llmfab/runs/r3"
    payload = {"outputs": {"model": f"{run_store}/pretrain/model"}, "metrics": {"eval_loss": 4.5}, "run_id": "run-3"}
    api = fake_api([CREATED, RUNNING, COMPLETE], on_get=_pod_writes_result(payload))
    _use_kubeconfig(api, tmp_path, monkeypatch)
    ins = {n: dsl.Dataset(name=n, uri=str(tmp_path / n), metadata={STORE_URI: u}) for n, u in INPUTS.items()}
    model = dsl.Model(name="model", uri=str(tmp_path / "kfp" / "model"), metadata={})
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "kfp" / "metrics"))
    pipeline_run = dsl.Artifact(name="pipeline_run", uri=str(tmp_path / "kfp" / "run"), metadata={})
    write_run_context(pipeline_run, "parent-run", run_store)
    launch = LaunchConfig(name="pretrain-r3", num_nodes=2, poll_s=0.01).model_dump_json(exclude_none=True)
    uris = run_component(
        "pretrain", recipe="llama31", preset="tiny", overrides=[], step_id="pretrain", variant="",
        tracking_uri="http://mlflow.kubeflow:5000", experiment="nightly", pipeline_run=pipeline_run, inputs=ins,
        list_inputs={}, outputs={"model": model}, metrics=metrics,
        launch=launch,
    )  # fmt: skip
    assert uris == (payload["outputs"]["model"],) and model.metadata[STORE_URI] == payload["outputs"]["model"]
    posted = api.requests[0][2]
    env = {e["name"]: e.get("value") for e in posted["spec"]["trainer"]["env"]}
    assert env["LLMFAB_PARENT_RUN_ID"] == "parent-run" and env["MLFLOW_EXPERIMENT_NAME"] == "nightly"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.kubeflow:5000"
    assert posted["spec"]["trainer"]["numNodes"] == 2
    args = posted["spec"]["trainer"]["args"]
    assert args[args.index("--output") + 1] == f"{run_store}/pretrain"
    assert "--set" in args and "seq_len=128" in args  # the recipe step's own config (llama31 tiny)
