"""The gate across pipeline runs: a later run of a recipe, with another seed, is promoted to `champion` only if
its gate metrics beat the champion's; otherwise it stays `candidate` and the refusal is recorded on its version.
Three in-process runs of a mini recipe (pretrain -> evaluate -> register -> promote-if-the-gate-passed) whose
gate is the held-out loss: a first champion, a better run (promoted) and a worse one (refused)."""

import pytest

from llmfab.config.recipe import load_recipe
from llmfab.runs import InProcess
from llmfab.runs.plan import plan_recipe
from llmfab.tracking import Tracker

GATED_RECIPE = """
family: gated
description: a model pretrained, evaluated, registered, promoted when it beats the champion
steps:
  - {id: data, stage: prepare_data}
  - {id: tokenizer, stage: train_tokenizer, inputs: {corpus: data.text}}
  - {id: pre, stage: pretrain, inputs: {corpus: data.text, tokenizer: tokenizer.tokenizer}}
  - {id: evaluate, stage: evaluate, inputs: {model: pre.model, data: data.sft, prompts: data.prompts}}
  - {id: register, stage: register, inputs: {model: pre.model, report: evaluate.report}}
  - {id: promote, stage: promote, inputs: {registration: register.registration}, when: register.decision == promote}
presets:
  tiny:
    models:
      m: {arch: llama, vocab_size: 400, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1,
          intermediate_size: 64, max_position_embeddings: 64}
    config:
      data: {prose_docs: 200, code_docs: 50, task_docs: 400, sft_examples: 40, prompts: 10, heldout_prompts: 16,
             preference_pairs: 20}
      tokenizer: {vocab_size: 400}
      pre: {model: "${models.m}", seq_len: 64, train: {max_steps: 10, batch_size: 4, optim: {lr: 3.0e-3}}}
      evaluate: {prompts: 8, heldout_conversations: 16, sample_prompts: 0, needle_samples: 0, max_new_tokens: 4}
      register:
        name: gated
        log_model: uri
        gate: [{metric: heldout_loss, higher_is_better: false, margin: 0.01}]
"""


@pytest.mark.timeout(600)
def test_a_later_run_is_promoted_only_when_it_beats_the_champion(tmp_path, tracking_uri):
    path = tmp_path / "gated.yaml"
    path.write_text(GATED_RECIPE)
    tracker = Tracker(tracking_uri)
    first = None

    def run(name: str, seed: int, steps: int):
        nonlocal first
        recipe = load_recipe(path, "tiny", [f"pre.seed={seed}", f"pre.train.max_steps={steps}"])
        reuse = {"data": first.steps["data"].outputs, "tokenizer": first.steps["tokenizer"].outputs} if first else None
        plan = plan_recipe(recipe, store_uri=str(tmp_path / "store"), tracking_uri=tracking_uri, run_name=name)
        result = InProcess(reuse=reuse or {}, show_progress=False).run(plan)
        first = first or result
        return result, tracker.client.get_model_version_by_alias("gated", "candidate")  # what register just wrote

    def champion():
        return tracker.client.get_model_version_by_alias("gated", "champion")

    one, v1 = run("gated-1", seed=0, steps=10)
    assert one.steps["register"].values["decision"] == "promote" and champion().version == v1.version

    better, v2 = run("gated-2", seed=1, steps=80)  # more training: a lower held-out loss
    loss = {v.version: float(v.tags["llmfab.metric.heldout_loss"]) for v in (v1, v2)}
    assert loss[v2.version] < loss[v1.version] - 0.01
    assert better.steps["register"].values["decision"] == "promote" and "promote" in better.steps
    assert champion().version == v2.version

    worse, v3 = run("gated-3", seed=2, steps=2)  # barely trained: refused, the champion stays
    assert float(v3.tags["llmfab.metric.heldout_loss"]) > loss[v2.version]
    assert worse.steps["register"].values["decision"] == "keep" and "promote" not in worse.steps
    assert champion().version == v2.version
    refused = tracker.client.get_model_version("gated", v3.version).tags
    assert refused["llmfab.gate.decision"] == "keep" and refused["llmfab.gate.against"] == str(v2.version)
    assert len({v1.version, v2.version, v3.version}) == 3
