"""Model registry: the register stage records lineage and is idempotent, the gate promotes by alias only on a
margin and records every verdict, `llmfab promote` does it by hand, and `models:/NAME@champion` loads and
generates (transformers flavour and URI-registered), on sqlite and on a real `mlflow server` with S3 artifacts."""

import itertools
import json
import shutil

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from llmfab.cli import app
from llmfab.config.recipe import load_recipe
from llmfab.data.version import data_fingerprint
from llmfab.errors import ConfigError, LlmfabError
from llmfab.models import load_model, load_tokenizer, save_model
from llmfab.registry import generate_text, load_registered, parse_model_uri
from llmfab.registry.lineage import parse_uris
from llmfab.registry.register import metric_tags, register_checkpoint
from llmfab.runs import InProcess
from llmfab.runs.plan import plan_recipe
from llmfab.stages.register import read_report, report_metrics
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.storage.checkpoint import read_manifest, write_checkpoint
from llmfab.storage.content import checkpoint_hash
from llmfab.tracking import Tracker

runner = CliRunner()
PROMPTS = ["What is 2 + 3?", "Repeat the word cat twice."]
_RUNS = itertools.count()


def _experiment(uri: str, artifacts) -> None:
    """The `llmfab` experiment with its artifacts under the test's folder, not ./mlruns."""
    client = MlflowClient(uri)
    if client.get_experiment_by_name("llmfab") is None:
        client.create_experiment("llmfab", artifact_location=str(artifacts))


CHAIN_RECIPE = """
family: mini
steps:
  - {id: data, stage: prepare_data}
  - {id: tokenizer, stage: train_tokenizer, inputs: {corpus: data.text}}
  - {id: pre, stage: pretrain, inputs: {corpus: data.text, tokenizer: tokenizer.tokenizer},
     parallel: [{seed: 0}, {seed: 1}]}
  - {id: avg, stage: average, inputs: {models: pre.model}}
presets:
  tiny:
    models:
      m: {arch: llama, vocab_size: 400, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1,
          intermediate_size: 64, max_position_embeddings: 64}
    config:
      data: {prose_docs: 40, code_docs: 20, task_docs: 40, sft_examples: 20, prompts: 10, preference_pairs: 20}
      tokenizer: {vocab_size: 400}
      pre: {model: "${models.m}", seq_len: 64, train: {max_steps: 2, batch_size: 2}}
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A pipeline run of data -> tokenizer -> two 2-step pretrains (a parallel step) -> average (a list input),
    run by the in-process recipe runner: each stage a nested run tagged with its input and output URIs."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    _experiment(uri, root / "artifacts")
    path = root / "mini.yaml"
    path.write_text(CHAIN_RECIPE)
    recipe = load_recipe(path)
    plan = plan_recipe(recipe, store_uri=str(root / "store"), tracking_uri=uri, run_name="mini-tiny")
    result = InProcess(show_progress=False).run(plan)
    tracker = Tracker(uri, "llmfab")
    store = open_store(result.store_uri)
    outputs = {name: res.outputs for name, res in result.steps.items()}
    parent = result
    report = store.sub("eval/report")
    report.put_text(
        "evaluation.json",
        json.dumps({"model": outputs["avg"]["model"], "metrics": {"gold_reward": 0.25, "heldout_ppl": 40.0}}),
    )
    return dict(
        uri=uri, tracker=tracker, parent=parent.run_id, outputs=outputs, store=store, report=report.uri,
        data_fingerprint=data_fingerprint(recipe),
    )  # fmt: skip


def _register(chain, cfg, inputs, step="register"):
    return run_stage(
        "register",
        cfg,
        inputs,
        step_id=step,
        store=chain["store"].sub(f"{step}-{next(_RUNS)}"),
        tracker=chain["tracker"],
        parent_run_id=chain["parent"],
        show_progress=False,
    )


def _promote(chain, registration, cfg=None):
    return run_stage(
        "promote",
        cfg or {},
        {"registration": registration},
        store=chain["store"].sub(f"promote-{next(_RUNS)}"),
        tracker=chain["tracker"],
        parent_run_id=chain["parent"],
        show_progress=False,
    )


def holder(client, name: str, alias: str) -> str:
    return str(client.get_model_version_by_alias(name, alias).version)


def _registration(result) -> dict:
    return json.loads(open_store(result.outputs["registration"]).get_text("registration.json"))


def _variant(chain, name: str, delta: float, meta: dict) -> str:
    """The average model with one weight nudged (new content, new fingerprint), the metrics in its manifest."""
    src = chain["outputs"]["avg"]["model"]
    model, tok = load_model(src), load_tokenizer(src)
    with torch.no_grad():
        next(model.parameters()).add_(delta)
    return save_model(model, tok, chain["store"].sub(f"variants/{name}"), meta)


def test_register_records_lineage_and_reruns_reuse_the_version(chain):
    outs = chain["outputs"]
    model = outs["avg"]["model"]
    cfg = {"log_model": "transformers", "gate": [{"metric": "gold_reward", "margin": 0.01}]}
    first = _register(chain, cfg, {"model": model, "report": chain["report"]})
    reg = _registration(first)
    assert reg["name"] == "llmfab-mini" and reg["version"] == "1" and reg["created"] is True
    assert reg["model_uri"] == "models:/llmfab-mini/1" and reg["format"] == "transformers"
    assert reg["decision"] == "promote" and first.values == {"decision": "promote"}  # no champion yet
    assert reg["aliases"] == ["candidate"] and reg["metrics"]["gold_reward"] == 0.25

    client = MlflowClient(chain["uri"])
    mv = client.get_model_version("llmfab-mini", "1")
    tags = mv.tags
    assert tags["llmfab.pipeline_run_id"] == chain["parent"]
    assert (tags["llmfab.family"], tags["llmfab.preset"]) == ("mini", "tiny")
    assert tags["llmfab.data_fingerprint"] == chain["data_fingerprint"]
    assert tags["llmfab.git_commit"] and tags["llmfab.model_uri"] == model and tags["llmfab.model_step"] == "avg.model"
    assert set(tags["llmfab.lineage.steps"].split(",")) == {"avg", "pre/seed-0", "pre/seed-1", "tokenizer", "data"}
    for step in ("pre/seed-0", "pre/seed-1"):  # both members of the list input are parents, with content hashes
        assert tags[f"llmfab.parent.{step}.model"] == outs[step]["model"]
        assert tags[f"llmfab.parent.{step}.model.sha256"] == checkpoint_hash(
            read_manifest(open_store(outs[step]["model"]))
        )
    assert tags["llmfab.parent.tokenizer.tokenizer"] == outs["tokenizer"]["tokenizer"]
    assert tags["llmfab.data.data.text"] == outs["data"]["text"] and len(tags["llmfab.data.data.text.sha256"]) == 64
    assert float(tags["llmfab.metric.gold_reward"]) == 0.25 and float(tags["llmfab.metric.heldout_ppl"]) == 40.0
    assert tags["llmfab.registration"] == "transformers" and "load_model" in tags["llmfab.load"]
    assert tags["llmfab.gate.decision"] == "promote" and "no champion yet" in tags["llmfab.gate.reasons"]
    assert "**Evaluation** (held out): gold_reward" in mv.description and "**Gate**: promote" in mv.description
    assert mv.run_id == first.run_id and mv.aliases == ["candidate"]
    run = client.get_run(first.run_id)
    assert run.data.tags["llmfab.value.decision"] == "promote" and run.data.tags["llmfab.registered_version"] == "1"

    # The same weights again (another run of the same inputs): the version is reused, nothing new is logged.
    again = _register(chain, cfg, {"model": model, "report": chain["report"]})
    assert _registration(again)["version"] == "1" and _registration(again)["created"] is False
    assert client.get_model_version("llmfab-mini", "1").tags["llmfab.reregistered_by_run"] == again.run_id
    assert [str(v.version) for v in client.search_model_versions("name = 'llmfab-mini'")] == ["1"]
    # The weights are an MLflow 3 LoggedModel of the first registering run, the version registered from it.
    logged = client.get_logged_model(mv.tags["llmfab.model_id"])
    assert logged.source_run_id == first.run_id and str(logged.status) == "READY"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "llmfab-mini", "version": 1}]
    assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    experiment = client.get_run(first.run_id).info.experiment_id
    assert [m.model_id for m in client.search_logged_models([experiment])] == [logged.model_id]  # none for `again`


def test_register_needs_a_name_outside_a_pipeline_and_a_matching_report(chain, tracking_uri, tmp_path):
    _experiment(tracking_uri, tmp_path / "artifacts")
    model = chain["outputs"]["pre/seed-0"]["model"]
    with pytest.raises(ConfigError, match="register: name"):
        run_stage("register", {}, {"model": model}, store=open_store(tmp_path / "r"), show_progress=False)
    with pytest.raises(LlmfabError, match=r"evaluates .*avg/model, not"):
        run_stage(
            "register",
            {"name": "x"},
            {"model": model, "report": chain["report"]},
            store=open_store(tmp_path / "r2"),
            show_progress=False,
        )


def test_gate_promotes_on_a_margin_and_records_refusals(chain):
    client = MlflowClient(chain["uri"])
    cfg = {"name": "gated", "log_model": "uri", "gate": [{"metric": "gold_reward", "margin": 0.01}]}
    models = {
        n: _variant(chain, n, d, {"gold_reward": g})
        for n, d, g in (("v1", 1e-3, 0.30), ("v2", 2e-3, 0.305), ("v3", 3e-3, 0.40))
    }

    registered = _register(chain, cfg, {"model": models["v1"]})
    first = _registration(registered)
    assert (first["version"], first["decision"], first["format"]) == ("1", "promote", "uri")
    assert first["source"] == models["v1"]  # the checkpoint itself, no copy
    promoted = _registration(_promote(chain, registered.outputs["registration"]))
    assert promoted["promotion"]["status"] == "promoted" and promoted["aliases"] == ["candidate", "champion"]
    assert holder(client, "gated", "champion") == "1"

    # Within the margin: kept; the refusal is on the version, and promote will not run on a "keep".
    worse = _register(chain, cfg, {"model": models["v2"]})
    assert worse.values == {"decision": "keep"}
    tags = client.get_model_version("gated", "2").tags
    assert tags["llmfab.gate.decision"] == "keep" and tags["llmfab.gate.against"] == "1"
    assert "gain +0.005 <= margin 0.01" in tags["llmfab.gate.reasons"]
    with pytest.raises(LlmfabError, match="register decided 'keep'"):
        _promote(chain, worse.outputs["registration"])
    assert holder(client, "gated", "champion") == "1"
    assert holder(client, "gated", "candidate") == "2"

    better = _register(chain, cfg, {"model": models["v3"]})
    assert better.values == {"decision": "promote"}
    result = _registration(_promote(chain, better.outputs["registration"]))
    assert result["promotion"]["previous"] == "1"
    assert holder(client, "gated", "champion") == "3"
    v3, v1 = client.get_model_version("gated", "3").tags, client.get_model_version("gated", "1").tags
    assert v3["llmfab.promotion.previous"] == "1" and v3["llmfab.promotion.alias"] == "champion"
    assert v3["llmfab.promotion.forced"] == "false" and v3["llmfab.promotion.by"].startswith("stage promote")
    assert "gain +0.1 > margin 0.01" in v3["llmfab.promotion.reason"]
    assert v1["llmfab.demotion.replaced_by"] == "3"
    events = [e["event"] for e in json.loads(v1["llmfab.history"])]
    assert events == ["alias", "gate", "gate", "promoted", "demoted"], events
    # Aliases only: MLflow's deprecated stages stay untouched.
    assert {v.current_stage for v in client.search_model_versions("name = 'gated'")} == {"None"}


def test_champion_loads_by_alias_and_generates_for_both_formats(chain, monkeypatch):
    """The transformers-flavour version and a URI-registered one of the same weights give the same text."""
    client = MlflowClient(chain["uri"])
    model = chain["outputs"]["avg"]["model"]
    flavour = _registration(_register(chain, {"name": "loadme", "log_model": "transformers"}, {"model": model}))
    client.set_registered_model_alias("loadme", "champion", flavour["version"])
    by_uri = register_checkpoint(client, "loadme-uri", model, mode="uri", run_id=None)
    assert by_uri.format == "uri" and by_uri.source == model
    client.set_registered_model_alias("loadme-uri", "champion", by_uri.version)

    m1, tok1 = load_registered("models:/loadme@champion", tracking_uri=chain["uri"])
    m2, _ = load_registered("models:/loadme-uri@champion", tracking_uri=chain["uri"])
    ref = load_model(model).state_dict()
    for m in (m1, m2):
        assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())
    assert tok1.chat_template  # the tokenizer's chat template travels with the flavour
    texts = generate_text(
        "models:/loadme@champion", PROMPTS, tracking_uri=chain["uri"], max_new_tokens=12, temperature=1.0
    )
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts) and any(texts)
    assert (
        generate_text(
            "models:/loadme-uri@champion", PROMPTS, tracking_uri=chain["uri"], max_new_tokens=12, temperature=1.0
        )
        == texts
    )
    # MLflow's own loader resolves the alias too.
    import mlflow.transformers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", chain["uri"])
    parts = mlflow.transformers.load_model("models:/loadme@champion", return_type="components")
    assert set(parts) >= {"model", "tokenizer"}
    with pytest.raises(LlmfabError, match="has no alias 'nope'"):
        load_registered("models:/loadme@nope", tracking_uri=chain["uri"])


def test_promote_by_hand(chain):
    uri = chain["uri"]
    client = MlflowClient(uri)
    rules = json.dumps([{"metric": "gold_reward", "margin": 0.05, "higher_is_better": True}])
    versions = []
    for name, delta, gold, ppl in (("h1", 4e-3, 0.5, 30.0), ("h2", 5e-3, 0.52, 29.5), ("h3", 6e-3, 0.7, 20.0)):
        ckpt = _variant(chain, name, delta, {})
        tags = {**metric_tags({"gold_reward": gold, "heldout_ppl": ppl}), "llmfab.gate.rules": rules}
        versions.append(register_checkpoint(client, "byhand", ckpt, mode="uri", tags=tags).version)
    client.set_registered_model_alias("byhand", "candidate", versions[0])

    def promote(*args, name="byhand"):
        return runner.invoke(app, ["promote", name, *args, "--tracking-uri", uri])

    ok = promote("--reason", "first release")  # --from-alias candidate by default, the version's own rules
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["status"] == "promoted" and "byhand v1 is now 'champion'" in ok.output
    assert client.get_model_version("byhand", "1").tags["llmfab.promotion.reason"] == "first release"

    # v2 beats v1 by 0.02 < the registered margin 0.05: refused, exit 1, recorded.
    refused = promote("--version", "2")
    assert refused.exit_code == 1 and "refused:" in refused.output and "margin 0.05" in refused.output
    assert json.loads(refused.stdout)["status"] == "refused"
    tags = client.get_model_version("byhand", "2").tags
    assert tags["llmfab.gate.decision"] == "keep" and tags["llmfab.promotion.refused.alias"] == "champion"
    assert "(llmfab promote)" in tags["llmfab.gate.by"] and "llmfab.promotion.time" not in tags
    # A looser rule given by hand lets it through.
    looser = promote("--version", "2", "--rule", "gold_reward:0.01")
    assert looser.exit_code == 0, looser.output
    assert holder(client, "byhand", "champion") == "2"
    # --force skips the gate (a rollback to v1), recorded as forced; the previous champion is noted.
    forced = promote("--version", "1", "--force", "--reason", "rollback")
    assert forced.exit_code == 0, forced.output
    tags = client.get_model_version("byhand", "1").tags
    assert tags["llmfab.promotion.forced"] == "true" and tags["llmfab.promotion.previous"] == "2"
    again = promote("--version", "1")
    assert again.exit_code == 0 and json.loads(again.stdout)["status"] == "unchanged"
    # Another alias, and a lower-is-better rule: v2's perplexity 29.5 does not beat v3's 20; v3's beats v1's 30.
    assert promote("--version", "3", "--alias", "staging").exit_code == 0
    assert promote("--version", "2", "--alias", "staging", "--rule", "heldout_ppl:1:lower").exit_code == 1
    assert promote("--version", "3", "--rule", "heldout_ppl:1:lower").exit_code == 0
    assert holder(client, "byhand", "champion") == "3"
    assert holder(client, "byhand", "staging") == "3"

    for args, message in (
        (["--version", "9"], "registered model 'byhand' has no version 9"),
        (["--from-alias", "gone"], "registered model 'byhand' has no alias 'gone'"),
        (["--version", "1", "--from-alias", "candidate"], "not both"),
        (["--version", "3", "--rule", "gold_reward:x"], "margin 'x' is not a number"),
        (["--version", "3", "--rule", "gold_reward:-1"], "gate rule 0: margin"),
        (["--version", "3", "--alias", "latest"], "not a usable alias"),
    ):
        result = promote(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    missing = promote(name="nosuch")
    assert missing.exit_code == 2 and "no registered model 'nosuch'" in missing.output


def test_report_formats_and_uri_parsing(tmp_path):
    rows = [{"metric": "gold_reward", "value": 0.5, "on": "x", "n": 3}, {"metric": "rm_score", "value": -1}]
    assert report_metrics({"metrics": {"a": 1, "b": "x", "c": True}}) == {"a": 1.0}
    assert report_metrics({"rows": rows}) == {"gold_reward": 0.5, "rm_score": -1.0}
    assert report_metrics({"columns": ["metric", "value"], "data": [["k", 2]]}) == {"k": 2.0}
    assert report_metrics({"loss": 1.5}) == {"loss": 1.5}
    (tmp_path / "r.json").write_text(json.dumps(rows))
    assert read_report(str(tmp_path / "r.json")) == ({"gold_reward": 0.5, "rm_score": -1.0}, None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "evaluation.json").write_text("{")
    with pytest.raises(LlmfabError, match="invalid JSON"):
        read_report(str(tmp_path / "bad"))
    assert parse_uris("['s3://b/a', 's3://b/c']") == ["s3://b/a", "s3://b/c"] and parse_uris("s3://b/x") == ["s3://b/x"]
    assert parse_model_uri("models:/m@champion") == ("m", None, "champion")
    assert parse_model_uri("models:/team/m/3") == ("team/m", "3", None)
    with pytest.raises(LlmfabError, match="expected models:/NAME@ALIAS"):
        parse_model_uri("runs:/abc/model")


@pytest.mark.timeout(300)
def test_register_and_load_against_mlflow_server_with_s3(chain, mlflow_server, monkeypatch, tmp_path):
    """Through a real server: the flavour's artifacts are proxied into S3, the URI version points at the S3
    checkpoint; both load by alias and generate."""
    uri, bucket = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    folder = tmp_path / "final"
    shutil.copytree(
        open_store(chain["outputs"]["avg"]["model"]).root, folder, ignore=shutil.ignore_patterns("MANIFEST.json")
    )
    ckpt = write_checkpoint(open_store(f"s3://{bucket}/store/final"), folder)
    tracker = Tracker(uri, "llmfab")
    with tracker.run("server-pipeline", tags={"llmfab.family": "srv", "llmfab.preset": "tiny"}) as parent:
        res = run_stage(
            "register",
            {"log_model": "transformers"},
            {"model": ckpt},
            store=open_store(f"s3://{bucket}/reg"),
            tracker=tracker,
            parent_run_id=parent.run_id,
            show_progress=False,
        )
        assert res.values == {"decision": "promote"}
        promoted = run_stage(
            "promote",
            {},
            {"registration": res.outputs["registration"]},
            store=open_store(f"s3://{bucket}/promo"),
            tracker=tracker,
            parent_run_id=parent.run_id,
            show_progress=False,
        )
    reg = json.loads(open_store(promoted.outputs["registration"]).get_text("registration.json"))
    assert reg["name"] == "llmfab-srv" and reg["promotion"]["status"] == "promoted"
    from llmfab.storage.s3 import make_client

    keys = [o["Key"] for o in make_client().list_objects_v2(Bucket=bucket, Prefix="mlartifacts/").get("Contents", [])]
    assert any(k.startswith("mlartifacts/1/models/m-") and k.endswith("/artifacts/MLmodel") for k in keys), keys
    texts = generate_text("models:/llmfab-srv@champion", PROMPTS, max_new_tokens=12, temperature=1.0)
    assert len(texts) == 2 and any(texts)
    client = MlflowClient(uri)
    by_uri = register_checkpoint(client, "srv-uri", ckpt, mode="uri")
    client.set_registered_model_alias("srv-uri", "champion", by_uri.version)
    assert by_uri.source.startswith(f"s3://{bucket}/")
    assert generate_text("models:/srv-uri@champion", PROMPTS, max_new_tokens=12, temperature=1.0) == texts
