"""Bring your own model: hf:// refs from the hub cache, tokenizers without a pad token, the official
Qwen2 / Llama 3.1 / Gemma 2 chat templates (kept, with masks on every assistant turn), a reward model
with its own tokenizer, and clear errors for inputs that are not models. Tiny models from
tests/hub_fixtures.py, saved by transformers as a hub repo holds them."""

import json

import pytest
import torch
from hub_fixtures import FAMILIES, fake_hub_cache, save_hub_model, tiny_tokenizer

from llmfab.chat_templates import GEMMA2, LLAMA31, MARKED, QWEN2
from llmfab.data.chat import encode_chat, stop_token_ids
from llmfab.errors import CheckpointError, DataError, StoreError
from llmfab.models import load_model, load_tokenizer
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store

TURNS = [
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "Five."},
    {"role": "user", "content": "Spell apple backwards."},
    {"role": "assistant", "content": "elppa"},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello, world!"},
]
SYSTEM = {"role": "system", "content": "Answer briefly."}
TOOL = {"type": "function", "function": {"name": "add", "description": "Add", "parameters": {"type": "object"}}}
TOOL_CALL = [
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": "2"}}}]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "It is 5."},
]


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {name: save_hub_model(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: tiny_tokenizer(family) for name, family in FAMILIES.items()}


def _conversations(name: str) -> list[list[dict]]:
    convs = [TURNS[:2], TURNS[:4], TURNS, TURNS[:3], TURNS[:5]]
    if name != "gemma2":  # Gemma 2 has no system role (its template refuses one)
        convs += [[SYSTEM, *TURNS[:2]], [SYSTEM, *TURNS]]
    return convs


# -- chat templates ----------------------------------------------------------------------------------


def test_official_templates_are_the_shipped_ones():
    """TRL keeps byte-exact copies of the hub's templates for identity checks, as we do."""
    from trl.chat_template_utils import _CHAT_TEMPLATES_DIR

    assert (_CHAT_TEMPLATES_DIR / "llama3_1.jinja").read_text() == LLAMA31
    assert (_CHAT_TEMPLATES_DIR / "gemma.jinja").read_text() == GEMMA2
    assert "You are a helpful assistant." in QWEN2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_marked_copies_render_exactly_like_the_official_templates(tokenizers, name):
    tok = tokenizers[name]
    official = FAMILIES[name].template
    marked = MARKED[official]
    assert marked != official
    cases = [(c, {}) for c in _conversations(name)]
    if name == "llama":  # tools in the system message or the first user message, and a tool call
        cases += [(TURNS[:4], {"tools": [TOOL]}), (TURNS[:2], {"tools": [TOOL], "tools_in_user_message": False})]
        cases += [(TOOL_CALL, {}), (TOOL_CALL, {"builtin_tools": ["add"]}), (TURNS[:2], {"date_string": "1 Jan 2025"})]
    for messages, extra in cases:
        for prompt in (False, True):
            kw = dict(tokenize=False, add_generation_prompt=prompt, **extra)
            expected = tok.apply_chat_template(messages, chat_template=official, **kw)
            assert tok.apply_chat_template(messages, chat_template=marked, **kw) == expected, (messages, extra)
    if name == "gemma2":
        from jinja2 import TemplateError

        for template in (official, marked):
            with pytest.raises(TemplateError, match="System role not supported"):
                tok.apply_chat_template([SYSTEM, *TURNS[:2]], chat_template=template, tokenize=False)


def _masked_runs(tok, ids, mask) -> list[str]:
    runs, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


TERMINATOR = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>", "gemma2": "<end_of_turn>"}


@pytest.mark.parametrize("unmarked", [False, True], ids=["marked-copy", "turn-by-turn"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_assistant_turn_is_masked_and_nothing_else(tokenizers, name, unmarked):
    """Content + terminator of each assistant turn, whether through the marked copy of the official
    template or (a template we do not know) by rendering turn by turn; the template is the model's own."""
    tok = tokenizers[name]
    if unmarked:  # not string-equal to the official one: no marked copy applies
        tok = tiny_tokenizer(FAMILIES[name])
        tok.chat_template = FAMILIES[name].template + "{# a local edit #}"
    for messages in _conversations(name):
        ids, mask = encode_chat(tok, messages)
        assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        answers = [m["content"] + TERMINATOR[name] for m in messages if m["role"] == "assistant"]
        assert _masked_runs(tok, ids, mask) == answers
        assert ids[[i for i, m in enumerate(mask) if m][-1]] in stop_token_ids(tok)


def test_qwen_default_system_prompt_and_llama_date_header_are_kept(hub_models):
    qwen, llama = load_tokenizer(hub_models["qwen2"]), load_tokenizer(hub_models["llama"])
    assert qwen.chat_template == QWEN2 and llama.chat_template == LLAMA31
    assert "You are a helpful assistant." in qwen.decode(encode_chat(qwen, TURNS[:2])[0])
    assert "Today Date: 26 Jul 2024" in llama.decode(encode_chat(llama, TURNS[:2])[0])


def test_a_template_that_rewrites_earlier_turns_is_a_data_error(tokenizers):
    tok = tiny_tokenizer(FAMILIES["qwen2"])
    # Qwen1.5's template: a turn is closed only when another follows, so turns change as the conversation grows.
    tok.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}"
        "{% if not loop.last %}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-stable"):
        encode_chat(tok, TURNS[:4])


def test_adopting_keeps_a_template_and_adds_ours_only_without_one(hub_models, tmp_path):
    from llmfab.tokenizer import CHAT_FORMATS, adopt_tokenizer

    kept = adopt_tokenizer(str(hub_models["llama"]), "llama3")
    assert kept.chat_template == LLAMA31 and len(kept) == len(load_tokenizer(hub_models["llama"]))
    bare = tiny_tokenizer(FAMILIES["llama"])
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare")
    assert adopt_tokenizer(str(tmp_path / "bare"), "llama3").chat_template == CHAT_FORMATS["llama3"].template


# -- pad tokens --------------------------------------------------------------------------------------


def test_a_missing_pad_is_an_existing_token_in_tokenizer_and_model(hub_models, tmp_path):
    from dataclasses import replace

    from llmfab.tokenizer import ensure_pad_token

    tok = load_tokenizer(hub_models["llama"])
    assert tok.pad_token == "<|finetune_right_pad_id|>" and len(tok) == 400  # reserved: no token added
    for kind in ("causal_lm", "reward"):
        assert load_model(hub_models["llama"], kind=kind).config.pad_token_id == tok.pad_token_id
    assert load_model(hub_models["llama"]).generation_config.pad_token_id == tok.pad_token_id
    gemma = tiny_tokenizer(FAMILIES["gemma2"])
    gemma.pad_token = None
    assert ensure_pad_token(gemma).pad_token == "<pad>"
    # Without a pad-like token in the vocabulary, EOS pads.
    family = FAMILIES["llama"]
    bare = tiny_tokenizer(replace(family, special=tuple(t for t in family.special if "pad" not in t)))
    assert ensure_pad_token(bare).pad_token == "<|eot_id|>"


def _write_jsonl(folder, records):
    """A dataset folder with train and test splits."""
    folder.mkdir(exist_ok=True)
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def _chat_data(tmp_path):
    return _write_jsonl(tmp_path / "chat", [{"messages": TURNS[: 2 * (1 + i % 3)]} for i in range(12)])


def _pairs_data(tmp_path):
    records = [
        {"prompt": f"What is {i} plus 1?", "chosen": str(i + 1), "rejected": f"It is {i + 7}, I think."}
        for i in range(12)
    ]
    return _write_jsonl(tmp_path / "pairs", records)


TWO_STEPS = {"max_steps": 2, "batch_size": 4, "optim": {"lr": 1e-3}}
NO_EVAL = {"prompts": 0}


def _run(stage, cfg, inputs, folder, **kw):
    return run_stage(stage, cfg, inputs, store=open_store(folder), show_progress=False, **{"track": False, **kw})


def test_llama_without_pad_trains_sft_dpo_and_a_reward_model(hub_models, tmp_path):
    """Every Llama 3.x base: SFT packing and DPO batches used to fail on a None pad id (TypeError), and a
    reward model from it on the config's missing pad_token_id (ValueError)."""
    llama = str(hub_models["llama"])
    sft = _run("sft", {"max_len": 128, "train": TWO_STEPS, "eval": NO_EVAL},
               {"model": llama, "data": _chat_data(tmp_path)}, tmp_path / "sft")  # fmt: skip
    tuned = load_tokenizer(sft.outputs["model"])
    assert tuned.chat_template == LLAMA31 and tuned.pad_token == "<|finetune_right_pad_id|>"
    dpo = _run("dpo", {"max_len": 128, "train": TWO_STEPS, "eval": NO_EVAL},
               {"model": llama, "data": _pairs_data(tmp_path)}, tmp_path / "dpo")  # fmt: skip
    assert "model" in dpo.outputs
    rm = _run("reward_model", {"max_len": 128, "train": TWO_STEPS},
              {"init": llama, "data": _pairs_data(tmp_path)}, tmp_path / "rm")  # fmt: skip
    assert load_model(rm.outputs["model"], kind="reward").config.pad_token_id == tuned.pad_token_id


# -- hf:// -------------------------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, hub_models, monkeypatch):
    """hf://tiny-org/tiny-qwen2 in an offline hub cache (huggingface_hub reads its settings at import)."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf-cache"
    fake_hub_cache(cache, "tiny-org/tiny-qwen2", hub_models["qwen2"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return cache


def test_an_hf_uri_loads_from_the_hub_cache_and_trains(hub_cache, tmp_path, monkeypatch):
    import mlflow

    uri = "hf://tiny-org/tiny-qwen2"
    model, tok = load_model(uri), load_tokenizer(f"{uri}@main")
    assert model.config.model_type == "qwen2" and tok.chat_template == QWEN2
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_logged")
    res = _run("sft", {"max_len": 128, "train": TWO_STEPS, "eval": NO_EVAL},
               {"model": uri, "data": _chat_data(tmp_path)}, tmp_path / "out", track=True)  # fmt: skip
    assert load_model(res.outputs["model"]).config.model_type == "qwen2"
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    logged = json.dumps([[r.data.params, r.data.tags] for r in runs])
    assert uri in logged and "hf_secret_never_logged" not in logged
    with pytest.raises(StoreError, match="not in the hub cache"):
        load_model("hf://tiny-org/absent")


# -- a reward model with its own tokenizer -----------------------------------------------------------


def test_a_reward_model_with_another_tokenizer_reads_its_own_encoding(hub_models):
    from llmfab.generation import Samples
    from llmfab.train.pairs import reward_scores_of_ids
    from llmfab.train.reward_inputs import OWN_TOKENIZER, load_reward_model
    from llmfab.train.rollouts import sample_scores

    policy_tok = load_tokenizer(hub_models["qwen2"])
    same = load_reward_model(str(hub_models["qwen2"]), policy_tok)
    assert not hasattr(same, OWN_TOKENIZER)  # same tokenizer: scored from the sampled ids, as always
    rm = load_reward_model(str(hub_models["llama"]), policy_tok)
    rm_tok = getattr(rm, OWN_TOKENIZER)
    prompts, answers = ["What is two plus three?", "Say hello."], ["Five.", "Hello"]
    prompt_ids = [policy_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                  for p in prompts]  # fmt: skip
    prompt_ids = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompt_ids]
    completion = [policy_tok("Five.<|im_end|>", add_special_tokens=False)["input_ids"],
                  policy_tok("Hello", add_special_tokens=False)["input_ids"]]  # fmt: skip
    samples = Samples(prompt_ids, completion, [True, False], answers)
    scores = sample_scores(rm, policy_tok, samples, prompts=prompts)
    finished = encode_chat(rm_tok, [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": "Five."}])
    head = rm_tok.apply_chat_template([{"role": "user", "content": prompts[1]}], add_generation_prompt=True)
    head = list(head["input_ids"]) if isinstance(head, dict) or hasattr(head, "keys") else list(head)
    cut_off = head + rm_tok("Hello", add_special_tokens=False)["input_ids"]
    expected = reward_scores_of_ids(rm, [finished[0], cut_off], rm_tok.pad_token_id)
    torch.testing.assert_close(scores, expected)
    assert "<|eot_id|>" in rm_tok.decode(finished[0]) and "<|im_end|>" not in rm_tok.decode(finished[0])


# -- inputs that are not models ----------------------------------------------------------------------


def test_a_tokenizer_folder_or_a_jsonl_file_as_model_is_a_clear_error(hub_models, tmp_path):
    tokenizer_only = tmp_path / "tok"
    load_tokenizer(hub_models["qwen2"]).save_pretrained(tokenizer_only)
    data = _chat_data(tmp_path)
    for ref, message in ((tokenizer_only, "no config.json"), (f"{data}/train.jsonl", "a file, not a model")):
        out = tmp_path / f"out-{tokenizer_only == ref}"
        with pytest.raises(CheckpointError, match=message):
            _run("sft", {"train": TWO_STEPS, "eval": NO_EVAL}, {"model": str(ref), "data": data}, out)
        assert not any(p.is_file() for p in out.rglob("*"))  # nothing written
    with pytest.raises(CheckpointError, match="no such folder"):
        load_model(str(tmp_path / "missing"))


def test_long_corpus_lines_are_cut_into_bounded_pieces_for_bpe_training():
    from llmfab.tokenizer import MAX_TRAIN_CHUNK, bounded_chunks

    line = " ".join(["word"] * 500_000)  # one 2.5 MB line
    pieces = list(bounded_chunks(["short", line, "x" * (MAX_TRAIN_CHUNK * 2 + 5)]))
    assert pieces[0] == "short" and "".join(pieces[1:-3]) == line
    assert all(len(p) <= MAX_TRAIN_CHUNK for p in pieces)
    assert all(p.startswith(" ") for p in pieces[2:-3])  # cut before a space: every word kept whole
    assert pieces[-3:] == ["x" * MAX_TRAIN_CHUNK] * 2 + ["x" * 5]
