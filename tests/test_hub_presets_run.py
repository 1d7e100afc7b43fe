"""The qwen2 `qwen2-0.5b` post-training preset run end to end as a user runs it (`llmfab run qwen2 --preset
qwen2-0.5b --runner inprocess --set ...`), offline: the released model and the hub datasets the preset names come
from a hub cache (HF_HUB_OFFLINE=1) holding a tiny Qwen2 saved by transformers as `Qwen/Qwen2-0.5B` (the official
Qwen2 chat template), `HuggingFaceH4/ultrachat_200k` and `trl-lib/ultrafeedback_binarized` in their published
layouts and columns; `--set` overrides shrink every step to seconds (fp32 for the preset's bf16 on CPU)."""

import hashlib
import json

import pytest
import trl_datasets as trl
from hub_fixtures import fake_hub_cache, save_hub_model
from typer.testing import CliRunner

from llmfab.chat_templates import QWEN2
from llmfab.cli import app
from llmfab.evaluation.gold import SKIPPED

MODEL = "hf://Qwen/Qwen2-0.5B"
ULTRACHAT = "hf://datasets/HuggingFaceH4/ultrachat_200k"
ULTRAFEEDBACK = "hf://datasets/trl-lib/ultrafeedback_binarized"
COMMITS = {"HuggingFaceH4/ultrachat_200k": "c" * 40, "trl-lib/ultrafeedback_binarized": "f" * 40}
PRETRAINING = {"data", "tokenizer", "generator", "synthetic", "pretrain", "long_context"}
# promote runs when register decides so: always here, the first candidate of a new registered model
STEPS = ["sft", "dpo", "reward", "online_dpo", "evaluate", "register", "promote"]
WORDS = ["fox", "dog", "apple", "Paris", "France", "hello", "world", "tools", "dates"]


def _msg(role: str, content: str) -> dict:
    return {"content": content, "role": role}  # the hub's key order


def ultrachat_rows(n: int, start: int) -> list[dict]:
    """HuggingFaceH4/ultrachat_200k's rows: prompt, prompt_id (the prompt's sha256), messages (one or two
    exchanges; the first user turn is the prompt)."""
    out = []
    for i in range(start, start + n):
        word, other = WORDS[i % len(WORDS)], WORDS[(i + 3) % len(WORDS)]
        prompt = f"Spell {word} backwards."
        messages = [_msg("user", prompt), _msg("assistant", word[::-1])]
        if i % 2:
            messages += [_msg("user", f"And {other}?"), _msg("assistant", other[::-1])]
        out.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages})
    return out


def ultrafeedback_rows(n: int, start: int) -> list[dict]:
    """trl-lib/ultrafeedback_binarized's rows: chosen and rejected conversations whose shared user turn is the
    (implicit) prompt, score_chosen and score_rejected."""
    out = []
    for i in range(start, start + n):
        question = f"What is {i} plus {i}?"
        out.append(
            {
                "chosen": [_msg("user", question), _msg("assistant", f"It is {2 * i}.")],
                "rejected": [_msg("user", question), _msg("assistant", f"Maybe {2 * i + 1}, I think.")],
                "score_chosen": 8.0 + i % 2,
                "score_rejected": 3.0 + i % 3 / 2,
            }
        )
    return out


def _card(splits) -> str:
    """The dataset card's YAML header, as the hub's datasets carry it: split -> data files."""
    files = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in splits)
    return f"---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files:\n{files}---\n"


def build_hub_cache(cache, scratch) -> None:
    """The three repos the preset reads, as `hf download` leaves them in HF_HUB_CACHE: data/SPLIT-*.parquet files
    (ultrachat's train_sft, test_sft, train_gen, test_gen; ultrafeedback's train, test)."""
    fake_hub_cache(cache, "Qwen/Qwen2-0.5B", save_hub_model("qwen2", scratch / "qwen2"))
    chat = {name: ultrachat_rows(12, start=20 * k) for k, name in enumerate(trl.SPLITS_ULTRACHAT)}
    prefs = {"train": ultrafeedback_rows(24, 0), "test": ultrafeedback_rows(8, 100)}
    for repo_id, splits in (("HuggingFaceH4/ultrachat_200k", chat), ("trl-lib/ultrafeedback_binarized", prefs)):
        repo = trl.fake_hub_cache(cache, repo_id, splits, commit=COMMITS[repo_id])
        (repo / "snapshots" / COMMITS[repo_id] / "README.md").write_text(_card(splits))


TRAINED = ("sft", "dpo", "reward", "online_dpo")
OVERRIDES = {
    **{f"{s}.train.max_steps": 2 for s in TRAINED},
    **{f"{s}.train.batch_size": 2 for s in TRAINED},
    **{f"{s}.train.grad_accum": 1 for s in TRAINED},
    **{f"{s}.train.precision": "fp32" for s in TRAINED},  # the preset's bf16, on CPU
    **{f"{s}.train.checkpoint_every": 1000 for s in TRAINED},
    **{f"{s}.train.optim.warmup_steps": 0 for s in TRAINED},
    **{f"{s}.max_len": 128 for s in TRAINED},
    "reward.eval_pairs": 4,
    "online_dpo.episodes": 1,
    "online_dpo.prompts_per_episode": 4,
    "online_dpo.samples_per_prompt": 2,
    "online_dpo.max_new_tokens": 8,
    "online_dpo.keep_truncated": "true",  # a random tiny model seldom ends an answer within 8 tokens
    "evaluate.prompts": 4,
    "evaluate.heldout_conversations": 4,
    "evaluate.sample_prompts": 2,
    "evaluate.samples_per_prompt": 2,
    "evaluate.max_new_tokens": 8,
    "evaluate.max_len": 128,
    "evaluate.batch_size": 4,
    # The preset's MMLU/GSM8K/IFEval need their datasets in the cache; test_lm_eval runs a hub task offline.
    "evaluate.lm_eval.tasks": "[]",
}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """The preset's hub repos in an offline hub cache; the working directory (MLflow's default artifact root,
    ./mlruns) in tmp_path."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf-cache"
    build_hub_cache(cache, tmp_path / "scratch")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))  # huggingface_hub reads its settings at import
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("LLMFAB_SYSTEM_METRICS", "0")
    monkeypatch.chdir(tmp_path)
    return cache


def test_qwen2_post_training_preset_runs_offline_from_the_hub_cache(hub_cache, tmp_path, capfd):
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmfab.storage.checkpoint import fetch_checkpoint

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [arg for key, value in OVERRIDES.items() for arg in ("--set", f"{key}={value}")]
    args = ["run", "qwen2", "--preset", "qwen2-0.5b", "--runner", "inprocess", "--store", str(tmp_path / "store"),
            "--tracking-uri", db, "--run-name", "qwen2-hub", *sets]  # fmt: skip
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output + repr(out.exception)
    shown = out.output + capfd.readouterr().out  # the run's console writes to sys.__stdout__
    assert "qwen2-hub finished" in shown and "registered llmfab-qwen2 version 1" in shown

    client = MlflowClient(db)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.mlflow.runName = 'qwen2-hub'")
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    runs = {r.data.tags["llmfab.step"]: r for r in children}

    # Every kept step finished; no pretraining step ran (their outputs came from the hub).
    assert parent.info.status == "FINISHED"
    assert sorted(runs) == sorted(STEPS) and not set(runs) & PRETRAINING
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["sft"].data.tags["llmfab.input.model"] == runs["online_dpo"].data.tags["llmfab.input.base"] == MODEL

    # The aligned model is the registered version, aliased `candidate` (and `champion`: the first one).
    version = client.get_model_version_by_alias("llmfab-qwen2", "candidate")
    assert client.get_model_version_by_alias("llmfab-qwen2", "champion").version == version.version
    assert runs["register"].data.tags["llmfab.value.decision"] == "promote"
    # Its lineage: the released model a parent checkpoint (no data), the hub datasets its data.
    lineage = version.tags
    assert lineage["llmfab.lineage.steps"] == "online_dpo,dpo,reward,sft" and lineage["llmfab.preset"] == "qwen2-0.5b"
    assert lineage["llmfab.parent.online_dpo.base"] == MODEL and MODEL not in {
        v for k, v in lineage.items() if k.startswith("llmfab.data.")
    }
    assert lineage["llmfab.data.sft.data"] == ULTRACHAT and ULTRAFEEDBACK in lineage.values()

    # The output model loads with transformers and keeps the official Qwen2 chat template.
    folder = fetch_checkpoint(runs["online_dpo"].data.tags["llmfab.output.model"])
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "qwen2" and tokenizer.chat_template == QWEN2

    # The hub datasets are run inputs (hf:// URI, the commit as digest); SFT read ultrachat's train_sft and could
    # not score hub prompts with the gold reward.
    def inputs(step):
        return {
            (d.dataset.name, json.loads(d.dataset.source)["uri"], d.dataset.digest, d.tags[0].value)
            for d in runs[step].inputs.dataset_inputs
        }

    chat, feedback = COMMITS["HuggingFaceH4/ultrachat_200k"][:36], COMMITS["trl-lib/ultrafeedback_binarized"][:36]
    assert inputs("sft") == {("data", ULTRACHAT, chat, "train"), ("eval_prompts", ULTRAFEEDBACK, feedback, "test")}
    assert ("data", ULTRAFEEDBACK, feedback, "train") in inputs("dpo") and inputs("reward") == {
        ("data", ULTRAFEEDBACK, feedback, "train")
    }
    assert ("prompts", ULTRAFEEDBACK, feedback, "train") in inputs("online_dpo")
    sft = runs["sft"].data.params
    assert sft["gold_eval"] == SKIPPED and sft["train_split"] == "train_sft" and sft["train.precision"] == "fp32"
    assert int(runs["sft"].data.metrics["tokens_per_sec"]) > 0


def test_averaging_on_hub_prompts_skips_the_gold_reward(hub_cache, tmp_path):
    """llama31-8b averages each round's DPO models with ultrafeedback's prompts as eval_prompts: the gold reward
    cannot score them (no testbed tasks), which skips the measurement, as every other stage does, instead of
    failing the step."""
    from llmfab.stages.runner import run_stage
    from llmfab.storage import open_store

    res = run_stage(
        "average",
        {"eval": {"prompts": 2}},
        {"models": [MODEL, MODEL], "eval_prompts": ULTRAFEEDBACK},
        store=open_store(tmp_path / "avg"),
        show_progress=False,
        track=False,
    )
    assert "model" in res.outputs and not any(k.startswith("gold_reward") for k in res.metrics)
