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


def _record_load_devices(monkeypatch, loads_in, device_in) -> list:
    """Point training_device (as `device_in` sees it) at a stand-in device, meta, and record the device every
    load_model call of `loads_in` asks for; the model still loads on the CPU, where these tests run. The models a
    stage runs on the training device (a GPU when there is one) show up as meta."""
    asked, real_load = [], loads_in.load_model
    monkeypatch.setattr(device_in, "training_device", lambda: torch.device("meta"))

    def load_recording(ref, **kwargs):
        asked.append((ref, kwargs.get("device")))
        return real_load(ref, **{**kwargs, "device": "cpu"})

    monkeypatch.setattr(loads_in, "load_model", load_recording)
    return asked


@pytest.mark.parametrize("mode", ["logits", "on_policy"])
def test_sft_distills_from_a_teacher(testbed, models, tmp_path, mode, monkeypatch):
    import llmfab.train.sft as sft_training

    asked = _record_load_devices(monkeypatch, sft_training, sft_training)
    cfg = {
        "distill": mode,
        "max_new_tokens": 8,
        "train": {"max_steps": 3, "batch_size": 4, "optim": {"lr": 1e-3}},
        "eval": {"prompts": 0},
    }
    inputs = {"model": models["base"], "data": testbed["sft"], "teacher": models["teacher"]}
    m = _run("sft", cfg, inputs, tmp_path).metrics
    assert m["train_teacher_kl"] > 0 and torch.isfinite(torch.tensor(m["train_loss"]))
    assert (models["teacher"], torch.device("meta")) in asked  # the teacher runs on the training device


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


def test_warm_members_start_from_one_init_and_differ_in_data_order(testbed, models, tmp_path, monkeypatch):
    """WARM averages weights, so its reward models share one init, the new score head's included."""
    import llmfab.train.lora as rm_loading  # the stage loads through train.lora.load_trainable

    starts, real_load = [], rm_loading.load_model

    def load_recording(*args, **kwargs):
        model = real_load(*args, **kwargs)
        starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(rm_loading, "load_model", load_recording)
    cfg = {"warm": 2, "eval_pairs": 8, "train": {"max_steps": 1, "batch_size": 4}}
    m = _run("reward_model", cfg, {"init": models["base"], "data": testbed["preferences"]}, tmp_path).metrics
    assert len(starts) == 2 and starts[0].keys() == starts[1].keys()
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0]), "members start from different inits"
    assert m["rm0.train_loss"] != m["rm1.train_loss"]  # same init, other pairs first


@pytest.mark.parametrize("pad", ["pad", "end_of_turn"])
def test_a_reward_is_read_at_the_same_token_in_training_evaluation_and_rl(testbed, models, pad):
    """One place: the conversation's last token (ChatML's "\n" after <|im_end|>), alone, inside a padded and
    trimmed training batch, in reward_scores (evaluation) and reward_scores_of_ids (RL); also when the pad
    token is the end-of-turn token every answer holds."""
    from llmfab.tokenizer import IM_END
    from llmfab.train.pairs import encode_pairs, pair_batch, pair_rewards, reward_scores, reward_scores_of_ids

    tok = load_tokenizer(testbed["tokenizer"])
    if pad == "end_of_turn":
        tok.pad_token = IM_END
    rm = load_model(models["base"], kind="reward").eval()
    rm.config.pad_token_id = tok.pad_token_id
    records = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5, or maybe six, I think"},
        {"prompt": "Spell the word apple backwards.", "chosen": "elppa is apple backwards", "rejected": "apple"},
    ]
    prompts = [r["prompt"] for r in records] * 2
    answers = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    encoded = [encode_response(tok, p, a)[0] for p, a in zip(prompts, answers, strict=True)]
    with torch.no_grad():
        # An unpadded conversation: transformers' own pooling reads its last token too.
        alone = torch.cat([rm(input_ids=torch.tensor([ids])).logits[:, 0] for ids in encoded])
        chosen, rejected = pair_rewards(rm, pair_batch(encode_pairs(tok, records, 256), 0, 0, 2, 1))
    training = torch.cat([chosen, rejected])
    evaluation = reward_scores(rm, tok, prompts, answers)
    rl = reward_scores_of_ids(rm, encoded, tok.pad_token_id, batch_size=3)
    for name, got in (("training", training), ("evaluation", evaluation), ("rl", rl)):
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5, msg=name)


def test_samplers_answer_on_the_training_device(models, monkeypatch):
    """rejection_sampling's and collect_preferences' samplers (answers_from_models) load on the training device."""
    import llmfab.models
    import llmfab.train.distributed
    from llmfab.generation import answers_from_models

    asked = _record_load_devices(monkeypatch, llmfab.models, llmfab.train.distributed)
    tok = load_tokenizer(models["base"])
    answers_from_models([models["base"]], tok, ["What is 2 + 2?"], n=1, seed=0, max_new_tokens=2)
    assert asked == [(models["base"], torch.device("meta"))]


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

    from llmfab.stages.collect_preferences import preference_level
    from llmfab.train.pairs import best_and_worst

    assert [preference_level(g) for g in (1.0, 0.6, 0.3, 0.1)] == [0, 1, 2, 3]
    picks = {best_and_worst([1.0, 0.0, 1.0, 0.0], random.Random(seed)) for seed in range(20)}
    assert picks == {(0, 1), (0, 3), (2, 1), (2, 3)}  # ties broken at random, not by position
    assert best_and_worst([0.5, 0.5, 0.5], random.Random(0)) is None  # all alike: no preference


def _episode_samples():
    """Two prompts' four samples each, as sample_policy returns them (10 = <|im_end|> here)."""
    from llmfab.generation import Samples

    completions = [[5, 10], [6, 10], [7, 10], [8, 9], [20, 10], [21, 10], [22, 10], [23, 10]]
    finished = [True, True, True, False] + [True] * 4
    return Samples([[1, 2]] * 4 + [[3]] * 4, completions, finished, [str(c) for c in completions])


def test_online_dpo_breaks_ties_like_collect_preferences():
    """One rule: the best and worst answers of a prompt, ties broken at random with the episode's seed; a
    prompt whose answers all tie gives no pair (argmax/argmin would always pair the first two)."""
    import random

    from llmfab.stages.online_dpo import OnlineDPOConfig, pick_pairs

    samples, config = _episode_samples(), OnlineDPOConfig(samples_per_prompt=4)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0] + [0.5] * 4)
    picks = {tuple(pick_pairs(samples, scores, 4, config, random.Random(seed))) for seed in range(20)}
    assert picks == {((0, 1),), ((2, 1),)}  # sample 3 was cut off (keep_truncated off); prompt 2 all ties
    keep = config.model_copy(update={"keep_truncated": True})
    picks = {tuple(pick_pairs(samples, scores, 4, keep, random.Random(seed))) for seed in range(20)}
    assert picks == {((0, 1),), ((0, 3),), ((2, 1),), ((2, 3),)}


def test_online_dpo_trains_on_the_ids_it_sampled():
    """A pair's rows are the prompt ids + the answers' ids as sampled: a cut-off answer gets no end token
    appended; with mask_formatting the chosen mask drops special tokens and the NLL mask keeps them."""
    from types import SimpleNamespace

    from llmfab.stages.online_dpo import pair_rows

    # A tokenizer as formatting_mask sees it: pad 0, end token 10, no other turn terminators.
    tok = SimpleNamespace(
        pad_token_id=0, eos_token_id=10, all_special_ids=[0, 10], convert_tokens_to_ids=lambda t: None
    )
    rows = pair_rows(tok, _episode_samples(), [(0, 3)], mask_formatting=True)
    assert rows["chosen_ids"].tolist() == [[1, 2, 5, 10]] and rows["rejected_ids"].tolist() == [[1, 2, 8, 9]]
    assert rows["chosen_full_mask"].tolist() == [[0, 0, 1, 1]] and rows["chosen_mask"].tolist() == [[0, 0, 1, 0]]
    assert rows["rejected_mask"].tolist() == [[0, 0, 1, 1]]
    assert rows["chosen_length"].tolist() == [4] and rows["rejected_length"].tolist() == [4]


def test_online_dpo_checkpoints_only_at_episode_boundaries():
    """A resume rebuilds the episode's pairs from the restored policy: exact only at an episode boundary."""
    from llmfab.stages.online_dpo import OnlineDPOConfig

    OnlineDPOConfig(episodes=2, train={"max_steps": 4, "checkpoint_every": 2})
    with pytest.raises(ValueError, match=r"train.checkpoint_every \(1\) must be a multiple of an episode's steps"):
        OnlineDPOConfig(episodes=2, train={"max_steps": 4, "checkpoint_every": 1})


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


def test_online_dpo_under_bf16_holds_its_frozen_models_in_bf16(testbed, models, tmp_path, monkeypatch):
    """precision bf16: the reference and the reward model load in bf16 (half the memory; they only run forwards)
    while the policy keeps fp32 master weights, and the episode's numbers stay finite."""
    import math

    import llmfab.train.rl_setup as rl_setup

    loaded = {}
    real_load, real_rm = rl_setup.load_model, rl_setup.load_reward_model
    monkeypatch.setattr(rl_setup, "load_model", lambda *a, **k: loaded.setdefault("reference", real_load(*a, **k)))
    monkeypatch.setattr(
        rl_setup, "load_reward_model", lambda *a, **k: loaded.setdefault("reward_model", real_rm(*a, **k))
    )
    cfg = {
        "episodes": 1,
        "prompts_per_episode": 4,
        "samples_per_prompt": 2,
        "max_new_tokens": 6,
        "keep_truncated": True,
        "train": {"max_steps": 2, "batch_size": 2, "precision": "bf16"},
        "eval": QUICK_EVAL,
    }
    inputs = {"model": models["teacher"], "reward_model": models["base"], "prompts": testbed["prompts"]}
    m = _run("online_dpo", cfg, inputs, tmp_path / "odpo").metrics
    assert {name: next(model.parameters()).dtype for name, model in loaded.items()} == {
        "reference": torch.bfloat16,
        "reward_model": torch.bfloat16,
    }
    assert all(math.isfinite(v) for v in m.values())
