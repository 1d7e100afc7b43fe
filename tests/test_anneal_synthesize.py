import pytest
import torch

from conftest import pretrain_tiny
from llmfab.config.base import validate
from llmfab.data.io import read_dataset
from llmfab.data.tasks import gold_reward
from llmfab.errors import ConfigError, DataError
from llmfab.models import load_model
from llmfab.models.merge import average_state_dicts
from llmfab.stages.anneal import AnnealConfig
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store


@pytest.fixture(scope="module")
def base(testbed, tmp_path_factory):
    return pretrain_tiny(testbed, tmp_path_factory.mktemp("base"), 40)


def test_average_state_dicts():
    a = {"w": torch.tensor([1.0, 3.0]), "step": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 5.0]), "step": torch.tensor(9)}
    avg = average_state_dicts([a, b])
    torch.testing.assert_close(avg["w"], torch.tensor([2.0, 4.0]))
    assert avg["step"].item() == 7, "integer buffers are not averaged"
    torch.testing.assert_close(average_state_dicts([a, b], [3, 1])["w"], torch.tensor([1.5, 3.5]))
    torch.testing.assert_close(average_state_dicts([a])["w"], a["w"])
    with pytest.raises(ValueError, match="different parameters"):
        average_state_dicts([a, {"v": torch.zeros(2)}])
    with pytest.raises(ValueError, match="non-negative weights"):
        average_state_dicts([a, b], [1, -1])


def test_anneal_config_rules():
    with pytest.raises(ConfigError, match="must be 'linear'"):
        validate(AnnealConfig, {"train": {"optim": {"schedule": "cosine"}}})
    with pytest.raises(ConfigError, match="multiple of average_last"):
        validate(AnnealConfig, {"average_last": 3, "train": {"max_steps": 10}})


def test_anneal_averages_checkpoints_and_lowers_loss_on_the_slice(testbed, base, tmp_path):
    cfg = {
        "seq_len": 128,
        "sources": ["tasks"],
        "average_last": 3,
        "train": {"max_steps": 30, "batch_size": 8, "optim": {"lr": 2e-3, "schedule": "linear", "warmup_steps": 0}},
    }
    res = run_stage(
        "anneal",
        cfg,
        {"init": base.outputs["model"], "corpus": testbed["text"]},
        store=open_store(tmp_path / "anneal"),
        track=False,
    )
    m = res.metrics
    assert m["averaged_eval_loss"] < m["eval_loss_before"] - 0.3, m
    # The output really is the mean of the three checkpoints (steps 10, 20, 30).
    from llmfab.storage.checkpoint import fetch_checkpoint
    from llmfab.train.trainer import load_weights

    ckpts = open_store(tmp_path / "anneal" / "checkpoints")
    model = load_model(res.outputs["model"])
    states = []
    for step in (10, 20, 30):
        other = load_model(base.outputs["model"])
        load_weights(other, fetch_checkpoint(ckpts.sub(f"step-{step:08d}")))
        states.append(other.state_dict())
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(model.state_dict()[name], sum(s[name] for s in states) / 3)


def test_synthesize_text_from_a_model(testbed, base, tmp_path):
    cfg = {"n_docs": 12, "max_new_tokens": 24, "min_tokens": 4, "min_distinct_ratio": 0.1, "eval_fraction": 0.25}
    res = run_stage(
        "synthesize_text",
        cfg,
        {"model": base.outputs["model"], "corpus": testbed["text"]},
        store=open_store(tmp_path / "syn"),
        track=False,
    )
    docs = read_dataset(res.outputs["text"], "text") + read_dataset(res.outputs["text"], "text", "test")
    assert 0 < len(docs) <= 12 and res.metrics["kept"] == len(docs)
    assert all(d["source"] == "synthetic" for d in docs)
    # The synthetic set feeds pretraining as an extra mixture component.
    pre = run_stage(
        "pretrain",
        {"seq_len": 64, "mixture": {"synthetic": 2.0}, "train": {"max_steps": 2, "batch_size": 2}},
        {
            "corpus": testbed["text"],
            "tokenizer": testbed["tokenizer"],
            "init": base.outputs["model"],
            "extra": res.outputs["text"],
        },
        store=open_store(tmp_path / "pt"),
        track=False,
    )
    assert pre.outputs["model"]
    with pytest.raises(DataError, match="filtered out"):
        run_stage(
            "synthesize_text",
            {**cfg, "min_tokens": 10_000},
            {"model": base.outputs["model"], "corpus": testbed["text"]},
            store=open_store(tmp_path / "none"),
            track=False,
        )


def test_long_qa_plants_answerable_facts(testbed, tmp_path):
    res = run_stage(
        "synthesize_long_qa",
        {"n_docs": 20, "doc_chars": 3000, "facts_per_doc": 3},
        {"corpus": testbed["text"]},
        store=open_store(tmp_path / "lqa"),
        track=False,
    )
    chats = read_dataset(res.outputs["sft"], "chat")
    assert len(chats) == 18
    for chat in chats:
        question, answer = chat["messages"][0]["content"], chat["messages"][1]["content"]
        subject = question.rsplit("secret number of the ", 1)[1].rstrip("?")
        assert f"The secret number of the {subject} is {answer}." in question
        assert len(question) > 3000
        assert gold_reward("long_qa", chat["meta"], answer) == 1.0
    depths = [c["meta"]["depth"] for c in chats]
    assert min(depths) < 0.3 and max(depths) > 0.7
    texts = read_dataset(res.outputs["text"], "text")
    assert texts[0]["source"] == "long_qa"
