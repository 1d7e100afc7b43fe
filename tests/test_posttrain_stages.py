"""Post-training stages on the shared tiny testbed: each runs, writes what it declares, logs what
users look for, and (where it trains) resumes exactly. Efficacy lives in test_posttrain_efficacy."""

import pytest
import torch

from conftest import pretrain_tiny
from llmfab.data.chat import encode_chat, encode_response, stop_token_ids
from llmfab.data.io import read_dataset
from llmfab.models import load_model, load_tokenizer
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.train.sft_data import encode_conversations, pack_examples
from llmfab.train.trainer import FAULT_ENV, InjectedFault

QUICK_EVAL = {"prompts": 8, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def models(testbed, tmp_path_factory):
    """A tiny base (pretrained 30 steps) and a 'teacher' pretrained longer, same shapes."""
    root = tmp_path_factory.mktemp("post")
    base = pretrain_tiny(testbed, root / "base", 30).outputs["model"]
    teacher = pretrain_tiny(testbed, root / "teacher", 60).outputs["model"]
    return {"base": base, "teacher": teacher}


def _run(stage, cfg, inputs, folder):
    return run_stage(stage, cfg, inputs, store=open_store(folder), track=False, show_progress=False)


def test_chat_masks_cover_the_answer_and_its_end_token(testbed):
    tok = load_tokenizer(testbed["tokenizer"])
    ids, mask = encode_response(tok, "Spell the word apple backwards.", "elppa")
    answer = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(answer) == "elppa<|im_end|>"
    assert answer[-1] in stop_token_ids(tok)
    # A template without {% generation %} marks (most hub tokenizers) gives the same mask.
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    plain_ids, plain_mask = encode_response(tok, "Spell the word apple backwards.", "elppa")
    assert plain_ids == ids
    assert plain_mask[: mask.index(1)] == mask[: mask.index(1)] and sum(plain_mask) >= sum(mask)


def test_packed_sft_rows_keep_examples_whole(testbed):
    tok = load_tokenizer(testbed["tokenizer"])
    convs = [r["messages"] for r in read_dataset(testbed["sft"], "chat", "train", limit=40)]
    examples, dropped = encode_conversations(tok, convs, 128)
    rows = pack_examples(examples, 128, tok.pad_token_id, seed=0)
    assert dropped + len(examples) == 40
    starts = int((rows["position_ids"] == 0).sum())
    assert starts == len(examples)  # every example starts a fresh position run: none was split
    n_labels = int((rows["labels"] != -100).sum())
    assert n_labels == sum(sum(m) for _, m in examples)


def test_prompt_tokens_carry_no_gradient(testbed, models):
    """The SFT loss's gradient w.r.t. the logits is zero wherever the next token is a prompt (or
    padding) token, and non-zero where it is an answer token."""
    tok = load_tokenizer(testbed["tokenizer"])
    model = load_model(models["base"])
    convs = [r["messages"] for r in read_dataset(testbed["sft"], "chat", "train", limit=6)]
    rows = pack_examples(encode_conversations(tok, convs, 256)[0], 256, tok.pad_token_id)
    out = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], labels=rows["labels"])
    out.logits.retain_grad()
    out.loss.backward()
    grad = out.logits.grad[:, :-1].abs().sum(-1)  # position t predicts token t+1
    answer = rows["labels"][:, 1:] != -100
    assert answer.any() and (~answer).any()
    assert torch.all(grad[~answer] == 0)
    assert torch.all(grad[answer] > 0)


def test_sft_lowers_answer_loss_and_logs_gold_reward(testbed, models, tmp_path):
    cfg = {"max_len": 256, "train": {"max_steps": 8, "batch_size": 4, "optim": {"lr": 2e-3}}, "eval": QUICK_EVAL}
    res = _run("sft", cfg, {"model": models["base"], "data": testbed["sft"]}, tmp_path)
    m = res.metrics
    assert m["eval_loss"] < m["eval_loss_before"]
    assert {"gold_reward_before", "gold_reward", "gold_reward_format"} <= set(m)
    assert load_model(res.outputs["model"]).config.vocab_size == 512


@pytest.mark.parametrize("mode", ["logits", "on_policy"])
def test_sft_distills_from_a_teacher(testbed, models, tmp_path, mode):
    cfg = {
        "distill": mode,
        "max_new_tokens": 8,
        "train": {"max_steps": 3, "batch_size": 4, "optim": {"lr": 1e-3}},
        "eval": {"prompts": 0},
    }
    inputs = {"model": models["base"], "data": testbed["sft"], "teacher": models["teacher"]}
    m = _run("sft", cfg, inputs, tmp_path).metrics
    assert m["train_teacher_kl"] > 0 and torch.isfinite(torch.tensor(m["train_loss"]))


def test_reward_model_warm_soft_labels_margins(testbed, models, tmp_path):
    cfg = {
        "warm": 2,
        "soft_labels": True,
        "margin": "level",
        "drop_levels": [3],
        "eval_pairs": 32,
        "train": {"max_steps": 4, "batch_size": 8, "optim": {"lr": 1e-3}},
    }
    res = _run("reward_model", cfg, {"init": models["base"], "data": testbed["preferences"]}, tmp_path)
    m = res.metrics
    assert {"eval_accuracy_before", "rm0.eval_accuracy", "rm1.eval_accuracy", "eval_accuracy"} <= set(m)
    assert any(k.startswith("eval_accuracy_level") for k in m)
    rm = load_model(res.outputs["model"], kind="reward")
    assert rm.score.out_features == 1


def test_reward_scores_ignore_padding(testbed, models):
    from llmfab.train.pairs import reward_scores

    tok = load_tokenizer(testbed["tokenizer"])
    rm = load_model(models["base"], kind="reward")
    prompts, answers = ["What is 2 + 2?", "Spell the word apple backwards."], ["4", "elppa, which is long"]
    together = reward_scores(rm, tok, prompts, answers)
    alone = torch.cat([reward_scores(rm, tok, [p], [a]) for p, a in zip(prompts, answers, strict=True)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


DPO_LLAMA_OMO = {
    "beta": 0.1,
    "nll_weight": 0.2,
    "mask_formatting": True,
    "optimizer": "online_merging",
    "keep_prob": 0.5,
    "merge_alpha": 1e-4,
    "train": {"max_steps": 6, "batch_size": 4, "checkpoint_every": 2, "optim": {"lr": 1e-3}},
    "eval": {"prompts": 0},
}


def test_dpo_llama_variant_with_online_merging_resumes_exactly(testbed, models, tmp_path, monkeypatch):
    import llmfab.stages.dpo as dpo_stage

    scored = []  # the reference scores only the pairs the run's 6 steps x 4 read, not the whole dataset
    real = dpo_stage.reference_logps
    monkeypatch.setattr(dpo_stage, "reference_logps", lambda m, rows, *a: scored.append(rows) or real(m, rows, *a))
    inputs = {"model": models["teacher"], "data": testbed["preferences"], "base": models["base"]}
    full = _run("dpo", DPO_LLAMA_OMO, inputs, tmp_path / "full")
    assert {"train_nll_chosen", "train_reward_accuracy", "train_reward_margin"} <= set(full.metrics)
    assert len(scored[0]["chosen_ids"]) == 6 * 4 < len(read_dataset(testbed["preferences"], "preference", "train"))

    monkeypatch.setenv(FAULT_ENV, "5")
    with pytest.raises(InjectedFault):
        _run("dpo", DPO_LLAMA_OMO, inputs, tmp_path / "resumed")
    monkeypatch.delenv(FAULT_ENV)
    resumed = _run("dpo", DPO_LLAMA_OMO, inputs, tmp_path / "resumed")
    assert resumed.metrics["resumed_from_step"] == 4
    a, b = load_model(full.outputs["model"]).state_dict(), load_model(resumed.outputs["model"]).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_online_merging_needs_base(testbed, models, tmp_path):
    from llmfab.errors import ConfigError

    with pytest.raises(ConfigError, match="base"):
        _run("dpo", DPO_LLAMA_OMO, {"model": models["teacher"], "data": testbed["preferences"]}, tmp_path)


def test_online_dpo_episodes(testbed, models, tmp_path):
    rm = _run(
        "reward_model",
        {"train": {"max_steps": 2, "batch_size": 8}, "eval_pairs": 8},
        {"init": models["base"], "data": testbed["preferences"]},
        tmp_path / "rm",
    ).outputs["model"]
    cfg = {
        "episodes": 2,
        "prompts_per_episode": 8,
        "samples_per_prompt": 3,
        "max_new_tokens": 8,
        "keep_truncated": True,  # a 60-step model rarely ends its turn
        "train": {"max_steps": 4, "batch_size": 4, "optim": {"lr": 1e-3}},
        "eval": QUICK_EVAL,
    }
    inputs = {"model": models["teacher"], "reward_model": rm, "prompts": testbed["prompts"]}
    m = _run("online_dpo", cfg, inputs, tmp_path / "odpo").metrics
    assert m["episode"] == 1 and m["episode_pairs"] > 0
    assert {"episode_rm_score", "episode_gold_reward", "gold_reward", "gold_reward_before"} <= set(m)


def test_rejection_sampling_with_a_committee(testbed, models, tmp_path):
    rm = models["base"]  # any causal LM becomes a (random-headed) reward model; ranking still happens
    cfg = {
        "samples_per_model": 2,
        "max_new_tokens": 8,
        "keep_truncated": True,  # a 30-step model rarely ends its turn
        "max_prompts": 12,
        "sft": {"train": {"max_steps": 2, "batch_size": 4}, "eval": QUICK_EVAL},
    }
    inputs = {
        "model": models["base"],
        "committee": [models["teacher"]],
        "reward_model": rm,
        "prompts": testbed["prompts"],
    }
    res = _run("rejection_sampling", cfg, inputs, tmp_path)
    m = res.metrics
    assert m["candidates"] == 12 * 2 * 2
    assert m["winner_share_sampler0"] + m["winner_share_sampler1"] == pytest.approx(1.0)
    assert m["rm_score_kept"] >= m["rm_score_all"]
    kept = read_dataset(res.outputs["data"], "chat", "train") + read_dataset(res.outputs["data"], "chat", "test")
    assert len(kept) == m["kept"] and all("rm_score" in r["meta"] for r in kept)


def test_collect_preferences_pairs_own_answers_by_the_verifier(testbed, models, tmp_path):
    """Each pair is two of the models' own answers to one prompt, the verifier's best over its
    worst; a prompt whose answers all score alike gives no pair."""
    from llmfab.data.tasks import gold_reward

    cfg = {"samples_per_model": 3, "temperature": 1.5, "max_new_tokens": 8, "keep_truncated": True, "max_prompts": 40}
    res = _run(
        "collect_preferences",
        cfg,
        {"models": [models["base"], models["teacher"]], "prompts": testbed["prompts"]},
        tmp_path,
    )
    m = res.metrics
    pairs = read_dataset(res.outputs["data"], "preference", "train") + read_dataset(
        res.outputs["data"], "preference", "test"
    )
    assert len(pairs) == m["pairs"] > 0 and m["answers"] <= 40 * 3 * 2
    for p in pairs:
        chosen, rejected = (
            gold_reward(p["task"], p["meta"], p["chosen"]),
            gold_reward(p["task"], p["meta"], p["rejected"]),
        )
        assert chosen - rejected == pytest.approx(p["margin"]) and p["margin"] > 0
        assert {p["meta"]["chosen_model"], p["meta"]["rejected_model"]} <= {0, 1}
    assert m["score_chosen"] > m["score_rejected"]
    if m["pairs"] > 1:  # the RM stage evaluates on the test split: never left empty
        assert read_dataset(res.outputs["data"], "preference", "test")
        assert read_dataset(res.outputs["data"], "preference", "train")


def test_a_committee_must_share_the_tokenizer_not_just_its_size(models, tmp_path):
    import random

    from llmfab.errors import DataError
    from llmfab.generation import answers_from_models
    from llmfab.tokenizer import train_bpe_tokenizer

    rng = random.Random(0)
    words = {k: ["".join(rng.choices(letters, k=rng.randint(2, 6))) for _ in range(3000)] for k, letters in
             (("a", "abcdefghijklm"), ("b", "nopqrstuvwxyz"))}  # fmt: skip
    texts = {k: [" ".join(w[i : i + 10]) for i in range(0, len(w), 10)] for k, w in words.items()}
    toks = {k: train_bpe_tokenizer(v, vocab_size=300) for k, v in texts.items()}
    assert len(toks["a"]) == len(toks["b"]) and toks["a"].get_vocab() != toks["b"].get_vocab()
    model = load_model(models["base"])
    for k, tok in toks.items():
        model.save_pretrained(tmp_path / k)
        tok.save_pretrained(tmp_path / k)
    with pytest.raises(DataError, match="different tokenizer"):
        answers_from_models([str(tmp_path / "a"), str(tmp_path / "b")], toks["a"], ["hi"], n=1, seed=0)


def test_preference_level_and_tie_breaking():
    import random

    from llmfab.stages.collect_preferences import best_and_worst, preference_level

    assert [preference_level(g) for g in (1.0, 0.6, 0.3, 0.1)] == [0, 1, 2, 3]
    picks = {best_and_worst([1.0, 0.0, 1.0, 0.0], random.Random(seed)) for seed in range(20)}
    assert picks == {(0, 1), (0, 3), (2, 1), (2, 3)}  # ties broken at random, not by position


def test_average_is_the_weighted_mean(models, tmp_path):
    res = _run("average", {"weights": [1, 3]}, {"models": [models["base"], models["teacher"]]}, tmp_path)
    a, b = load_model(models["base"]).state_dict(), load_model(models["teacher"]).state_dict()
    avg = load_model(res.outputs["model"]).state_dict()
    for k in avg:
        torch.testing.assert_close(avg[k], 0.25 * a[k] + 0.75 * b[k])


def test_encode_chat_rejects_a_template_less_tokenizer(testbed):
    from llmfab.errors import DataError

    tok = load_tokenizer(testbed["tokenizer"])
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])


def test_truncated_answers_are_not_kept(testbed, models, tmp_path):
    """An answer cut off by max_new_tokens is not an answer: rejection sampling refuses to train on it."""
    from llmfab.errors import DataError

    cfg = {"samples_per_model": 2, "max_new_tokens": 1, "max_prompts": 4, "sft": {"train": {"max_steps": 1}}}
    inputs = {"model": models["base"], "reward_model": models["base"], "prompts": testbed["prompts"]}
    with pytest.raises(DataError, match="cut off by max_new_tokens"):
        _run("rejection_sampling", cfg, inputs, tmp_path)


def test_generated_samples_are_logged_to_mlflow(testbed, models, tmp_path, tracking_uri):
    from llmfab.tracking import Tracker

    tracker = Tracker(tracking_uri)
    cfg = {"train": {"max_steps": 2, "batch_size": 4}, "eval": QUICK_EVAL}
    res = run_stage(
        "sft",
        cfg,
        {"model": models["base"], "data": testbed["sft"], "eval_prompts": testbed["prompts"]},
        store=open_store(tmp_path),
        tracker=tracker,
        show_progress=False,
    )
    logged = {a.path for a in tracker.client.list_artifacts(res.run_id, "samples")}
    assert logged == {"samples/gold_eval_before.json", "samples/gold_eval_after.json"}
    table = tracker.client.download_artifacts(res.run_id, "samples/gold_eval_after.json", str(tmp_path))
    import json
    from pathlib import Path

    rows = json.loads(Path(table).read_text())
    assert set(rows["columns"]) == {"task", "prompt", "response", "gold_reward"}
    assert 0 < len(rows["data"]) <= QUICK_EVAL["prompts"]
