"""Datasets as the hub publishes them, in every TRL format: read through `datasets`, split by the hub's names
(never merged), held out when a test split is missing, columns mapped, normalised to llmfab's form; and stages
that train on them (DPO on implicit-prompt conversations, SFT on data the gold reward cannot score)."""

import json
import logging

import pytest
import trl_datasets as trl

from conftest import pretrain_tiny
from llmfab.data.io import iter_records, read_dataset
from llmfab.data.options import DataOptions
from llmfab.errors import ConfigError, DataError, NoSplitError
from llmfab.stages.base import all_stages
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store

QUICK = {"train": {"max_steps": 2, "batch_size": 4, "optim": {"lr": 1e-3}}}


@pytest.fixture(scope="module")
def tiny(testbed, tmp_path_factory):
    return pretrain_tiny(testbed, tmp_path_factory.mktemp("tiny"), 2).outputs["model"]


def _expected(fmt: str, i: int) -> dict:
    q, good, bad = f"What is {i} plus {i}?", f"It is {2 * i}.", f"It is {2 * i + 1}."
    user, answer = {"role": "user", "content": q}, {"role": "assistant", "content": good}
    return {
        "language_modeling": {"text": f"{q} {good}", "source": "text"},
        "conversational": {"messages": [user, answer]},
        "prompt_only": {"prompt": q},
        "prompt_only_conversational": {"prompt": [user]},
        "prompt_completion": {"messages": [user, answer]},
        "prompt_completion_conversational": {"messages": [user, answer]},
        "preference": {"prompt": q, "chosen": good, "rejected": bad},
        "preference_conversational": {
            "prompt": [user],
            "chosen": [answer],
            "rejected": [{"role": "assistant", "content": bad}],
        },
        "preference_implicit_conversational": {
            "prompt": [user],
            "chosen": [answer],
            "rejected": [{"role": "assistant", "content": bad}],
        },
    }.get(fmt)


@pytest.mark.parametrize("layout", ["save_to_disk", "hub_parquet"])
@pytest.mark.parametrize("fmt", sorted(trl.KIND))
def test_every_trl_format_reads_in_its_normal_form(fmt, layout, tmp_path):
    kind = trl.KIND[fmt]
    train, test = trl.split_names(kind)
    save = trl.save_to_disk if layout == "save_to_disk" else trl.save_hub_parquet
    uri = save(tmp_path / "ds", {train: trl.rows(fmt, 6), test: trl.rows(fmt, 2, start=100)})
    options = DataOptions(train_split=train, test_split=test)
    records = read_dataset(uri, kind, "train", options=options)
    held = read_dataset(uri, kind, "test", options=options)
    assert len(records) == 6 and len(held) == 2
    for i, record in enumerate(records):
        if fmt == "preference_implicit":  # the shared text before the answers is the prompt
            original = trl.rows(fmt, 6)[i]
            assert record["prompt"] and record["prompt"] + record["chosen"] == original["chosen"]
            assert record["prompt"] + record["rejected"] == original["rejected"]
        else:
            assert {k: record[k] for k in _expected(fmt, i)} == _expected(fmt, i)


def _ultrachat(tmp_path, n=5):
    splits = {name: trl.rows("conversational", n, start=k * 10) for k, name in enumerate(trl.SPLITS_ULTRACHAT)}
    return trl.save_hub_parquet(tmp_path / "ultrachat", splits)


def test_hub_split_names_are_read_apart_never_merged(tmp_path):
    uri = _ultrachat(tmp_path)
    for k, name in enumerate(trl.SPLITS_ULTRACHAT):
        records = read_dataset(uri, "chat", name)
        assert len(records) == 5 and records[0]["messages"][0]["content"] == f"What is {k * 10} plus {k * 10}?"
    # `train` is a prefix of train_sft and train_gen: it names neither, and is no split of this dataset.
    with pytest.raises(NoSplitError, match="no split 'train'; its splits: test_gen, test_sft, train_gen, train_sft"):
        read_dataset(uri, "chat", "train")


@pytest.mark.parametrize("layout", ["save_to_disk", "hub_parquet"])
def test_a_missing_split_names_the_splits_there_are(layout, tmp_path):
    save = trl.save_to_disk if layout == "save_to_disk" else trl.save_hub_parquet
    uri = save(tmp_path / "ds", {"train_sft": trl.rows("conversational", 3), "test_sft": trl.rows("conversational", 2)})
    with pytest.raises(NoSplitError, match="test_sft, train_sft"):
        read_dataset(uri, "chat", "test", options=DataOptions(train_split="train_sft", test_size=0))
    with pytest.raises(NoSplitError, match=r"no split 'train'.*test_sft, train_sft.*train_split"):
        read_dataset(uri, "chat", "train", options=DataOptions())


def test_held_out_share_is_seeded_disjoint_and_the_same_on_every_read(tmp_path):
    uri = trl.save_to_disk(tmp_path / "ds", {"train_sft": trl.rows("conversational", 40)})
    options = DataOptions(train_split="train_sft", test_size=0.1)

    def questions(role):
        return [r["messages"][0]["content"] for r in iter_records(uri, "chat", role, options)]

    train, test = questions("train"), questions("test")
    assert len(test) == 4 and len(train) == 36
    assert not set(train) & set(test) and len(set(train) | set(test)) == 40
    assert questions("test") == test and questions("train") == train
    assert test != [f"What is {i} plus {i}?" for i in range(4)]  # drawn, not the first ones
    count = DataOptions(train_split="train_sft", test_size=7)
    assert len(read_dataset(uri, "chat", "test", options=count)) == 7
    assert len(read_dataset(uri, "chat", "train", options=count)) == 33


def test_jsonl_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [json.dumps(r) for r in trl.rows("conversational", 2)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    assert len(read_dataset(path, "chat")) == 2


def test_columns_map_llmfab_fields_to_dataset_columns(tmp_path):
    recs = [{"conversation": r["messages"], "id": i} for i, r in enumerate(trl.rows("conversational", 3))]
    uri = trl.save_hub_parquet(tmp_path / "ds", {"train": recs, "test": recs[:1]})
    options = DataOptions(columns={"messages": "conversation"})
    records = read_dataset(uri, "chat", "train", options=options)
    assert records[2]["messages"][1]["content"] == "It is 4." and records[2]["id"] == 2
    with pytest.raises(DataError, match=r"row 0: field 'messages'"):
        read_dataset(uri, "chat", "train", options=DataOptions())
    backwards = DataOptions(columns={"conversation": "messages"})
    with pytest.raises(DataError, match=r"row 0: no column 'messages' \(columns maps llmfab field -> dataset column"):
        read_dataset(uri, "chat", "train", options=backwards)


def test_a_bad_row_names_its_file_row_and_field(tmp_path):
    recs = trl.rows("preference", 5)
    recs[3]["chosen"] = None
    uri = trl.save_hub_parquet(tmp_path / "ds", {"train_prefs": recs})
    with pytest.raises(DataError, match=r"train_prefs-00000-of-00001\.parquet: row 3: field 'chosen'"):
        read_dataset(uri, "preference", "train_prefs")


def test_text_parts_tools_and_non_text_parts(tmp_path):
    tool_call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 1}}}
    conversation = [
        {"role": "system", "content": "You can add."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "1 plus 1?"}]},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "name": "add", "content": "2"},
        {"role": "assistant", "content": "It is 2."},
    ]
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    (record,) = read_dataset(path, "chat")
    assert record["messages"][1]["content"] == "What is 1 plus 1?"
    assert record["messages"][2]["tool_calls"] == [tool_call] and record["messages"][3]["role"] == "tool"
    image = {"role": "user", "content": [{"type": "image", "url": "x.png"}]}
    path.write_text(json.dumps({"messages": conversation}) + "\n" + json.dumps({"messages": [image]}) + "\n")
    with pytest.raises(DataError, match=r"tools\.jsonl:2: field 'messages\[0\]\.content': .*type 'image'"):
        read_dataset(path, "chat")


def test_hf_dataset_id_reads_from_an_offline_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    trl.fake_hub_cache(
        cache, "HuggingFaceH4/tiny_ultrachat", {n: trl.rows("conversational", 3) for n in trl.SPLITS_ULTRACHAT}
    )
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    for uri in ("hf://datasets/HuggingFaceH4/tiny_ultrachat", f"hf://HuggingFaceH4/tiny_ultrachat@{trl.COMMIT}"):
        records = read_dataset(
            uri, "chat", "train", options=DataOptions(train_split="train_sft", test_split="test_sft")
        )
        assert len(records) == 3 and records[0]["messages"][1]["content"] == "It is 0."
    with pytest.raises(NoSplitError, match="test_gen, test_sft, train_gen, train_sft"):
        read_dataset("hf://datasets/HuggingFaceH4/tiny_ultrachat", "chat", "train")


def test_a_hub_dataset_is_an_mlflow_run_input_at_its_commit(tiny, tmp_path, monkeypatch):
    """An hf:// dataset a stage trains on shows in MLflow as a run input: its hf:// URI, the commit it resolved to."""
    import huggingface_hub.constants as hub_constants
    import mlflow

    cache = tmp_path / "hub"
    trl.fake_hub_cache(
        cache, "HuggingFaceH4/tiny_ultrachat", {n: trl.rows("conversational", 8) for n in trl.SPLITS_ULTRACHAT}
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    uri = "hf://datasets/HuggingFaceH4/tiny_ultrachat"
    cfg = {**QUICK, "train_split": "train_sft", "test_split": "test_sft", "eval": {"prompts": 4}}
    res = run_stage("sft", cfg, {"model": tiny, "data": uri}, store=open_store(tmp_path / "out"), show_progress=False)
    inputs = mlflow.get_run(res.run_id).inputs.dataset_inputs
    logged = {(i.dataset.name, i.dataset.digest, i.dataset.source_type) for i in inputs}
    assert ("data", trl.COMMIT[:36], "hf") in logged
    assert any(uri in i.dataset.source for i in inputs if i.dataset.name == "data")


def test_every_data_stage_takes_the_data_options():
    readers = {
        "sft", "dpo", "reward_model", "online_dpo", "rejection_sampling", "collect_preferences", "mdloo",
        "rlhf_warp", "evaluate", "train_tokenizer", "pretrain", "anneal", "distill", "extend_context",
    }  # fmt: skip
    stages = all_stages()
    for name in readers:
        assert issubclass(stages[name].config_cls, DataOptions), name
    cfg = stages["dpo"].make_config({"train_split": "train_prefs", "test_split": "test_prefs", "test_size": 10})
    assert cfg.split_for("train") == "train_prefs" and cfg.split_for("test") == "test_prefs" and cfg.test_size == 10
    with pytest.raises(ConfigError, match="test_size"):
        stages["sft"].make_config({"test_size": 1.5})
    with pytest.raises(ConfigError, match="train_splt"):
        stages["sft"].make_config({"train_splt": "x"})


def test_preference_pairs_encode_the_same_through_dataset_map(testbed):
    from llmfab.data.chat import encode_response
    from llmfab.models import load_tokenizer
    from llmfab.train.pairs import encode_exchange, encode_pairs

    tok = load_tokenizer(testbed["tokenizer"])
    records = read_dataset(testbed["preferences"], "preference", "train", limit=12)
    rows = encode_pairs(tok, records, 512)
    for i, rec in enumerate(records):
        ids, mask = encode_response(tok, rec["prompt"], rec["chosen"])
        assert rows["chosen_ids"][i, : len(ids)].tolist() == ids and rows["chosen_mask"][i, : len(ids)].tolist() == mask
    # A conversational pair encodes as the one-turn text pair does, mask on the answer only.
    conv = encode_exchange(tok, [{"role": "user", "content": "Hi?"}], [{"role": "assistant", "content": "Yo."}])
    assert conv == encode_response(tok, "Hi?", "Yo.")


@pytest.mark.parametrize("stage", ["dpo", "reward_model"])
def test_preference_stages_train_on_implicit_prompt_conversational_pairs(stage, tiny, tmp_path):
    fmt = "preference_implicit_conversational"
    splits = {"train_prefs": trl.rows(fmt, 12), "test_prefs": trl.rows(fmt, 4, 50)}
    uri = trl.save_hub_parquet(tmp_path / "prefs", splits)
    cfg = {**QUICK, "train_split": "train_prefs", "test_split": "test_prefs"}
    if stage == "dpo":
        cfg["eval"] = {"prompts": 4}
    inputs = {"model" if stage == "dpo" else "init": tiny, "data": uri}
    res = run_stage(stage, cfg, inputs, store=open_store(tmp_path / "out"), track=False, show_progress=False)
    assert "model" in res.outputs and res.metrics["train_loss"] > 0
    assert "gold_reward" not in res.metrics  # not testbed data: no gold reward to score


def test_sft_on_hub_chat_data_uses_its_splits_and_skips_the_gold_eval(tiny, tmp_path, caplog):
    import mlflow

    uri = _ultrachat(tmp_path, n=8)
    cfg = {**QUICK, "train_split": "train_sft", "test_split": "test_sft", "eval": {"prompts": 4}}
    with caplog.at_level(logging.WARNING):
        res = run_stage("sft", cfg, {"model": tiny, "data": uri}, store=open_store(tmp_path / "out"),
                        show_progress=False)  # fmt: skip
    assert res.metrics["eval_loss"] > 0 and "gold_reward" not in res.metrics
    assert "gold-reward evaluation skipped" in caplog.text
    params = mlflow.get_run(res.run_id).data.params
    assert params["gold_eval"] == "skipped: no testbed tasks" and params["train_examples"] == "8"


def test_preference_pairs_and_conversations_serve_as_prompts(tmp_path):
    """Online DPO on UltraFeedback's pairs (the qwen2-0.5b preset): a pair's implicit prompt is the prompt to sample
    from; a conversation's turns before its last answer are one too."""
    user, system = {"role": "user", "content": "Hi?"}, {"role": "system", "content": "Be brief."}
    rows = [
        {"chosen": [user, {"role": "assistant", "content": "Hello."}],
         "rejected": [user, {"role": "assistant", "content": "Go away."}], "score_chosen": 8.0},
        {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Seven."},
        {"messages": [system, user, {"role": "assistant", "content": "Hello."}]},
    ]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [r["prompt"] for r in read_dataset(str(path), "prompt", "train")]
    assert prompts == [[user], "Name a colour.", [system, user]]


def test_a_new_commit_of_a_hub_dataset_is_a_new_data_version(tmp_path, monkeypatch):
    """`llmfab retrain` sees a hub dataset change: the data fingerprint counts an hf:// input as the commit its
    revision points at (from the cache under HF_HUB_OFFLINE), and a pinned commit stays as it is."""
    import huggingface_hub.constants as hub_constants

    from llmfab.config.recipe import load_recipe
    from llmfab.data.version import data_fingerprint

    cache = tmp_path / "hub"
    repo = trl.fake_hub_cache(cache, "HuggingFaceH4/ultrachat_200k", {"train_sft": trl.rows("conversational", 3)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    given = ["inputs.data.sft=hf://datasets/HuggingFaceH4/ultrachat_200k"]
    before = data_fingerprint(load_recipe("qwen2", "tiny", given))
    assert data_fingerprint(load_recipe("qwen2", "tiny", given)) == before
    newer = "f" * 40
    trl.save_hub_parquet(repo / "snapshots" / newer, {"train_sft": trl.rows("conversational", 4)})
    (repo / "refs" / "main").write_text(newer)
    assert data_fingerprint(load_recipe("qwen2", "tiny", given)) != before
    pinned = [f"inputs.data.sft=hf://datasets/HuggingFaceH4/ultrachat_200k@{trl.COMMIT}"]
    assert data_fingerprint(load_recipe("qwen2", "tiny", pinned)) != data_fingerprint(
        load_recipe("qwen2", "tiny", given)
    )
