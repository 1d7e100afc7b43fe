"""The tokenizer stage: family chat formats with the chat helpers, byte-level coverage of every
language, the multilingual report (sweep, MLflow table and plot), adoption, embedding resize."""

import itertools
import json

import pytest
import torch

from llmfab.config.model import ModelConfig
from llmfab.config.recipe import load_recipe
from llmfab.data import multilingual
from llmfab.data.chat import encode_chat, encode_response, formatting_mask, prompt_text, stop_token_ids
from llmfab.errors import ConfigError
from llmfab.evaluation.tokenizer_report import language_rows
from llmfab.models import build_model, init_model, load_tokenizer, match_vocab, resize_embeddings, save_model
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.tokenizer import CHAT_FORMATS, special_token_ids, train_bpe_tokenizer, train_char_bpe_tokenizer
from llmfab.tracking import Tracker

NON_LATIN = [c for c, lang in multilingual.LANGUAGES.items() if lang.script != "Latin"]
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Привет, 世界?"},
    {"role": "assistant", "content": "Hello, world."},
]


@pytest.fixture(scope="module")
def ml_texts():
    return [d for code in multilingual.LANGUAGES for d in multilingual.documents(code, "train")]


@pytest.fixture(scope="module")
def held_out():
    return {code: multilingual.documents(code, "test") for code in multilingual.LANGUAGES}


def test_multilingual_text_is_local_deterministic_and_split():
    scripts = {lang.script for lang in multilingual.LANGUAGES.values()} - {"Latin"}
    assert len(multilingual.LANGUAGES) >= 6 and len(scripts) >= 3
    for code in multilingual.LANGUAGES:
        train, test = multilingual.documents(code, "train"), multilingual.documents(code, "test")
        train_phrases = {p for d in train for p in d.split("\n")}
        test_phrases = {p for d in test for p in d.split("\n")}
        assert len(train_phrases) > 1000 and len(test_phrases) > 200, code
        assert not train_phrases & test_phrases, code
        # nor case variants of one phrase ("Kyrgyz Som" / "Kyrgyz som") on both sides
        assert not {p.casefold() for p in train_phrases} & {p.casefold() for p in test_phrases}, code
        assert multilingual.documents(code, "train", seed=0) == train
        assert multilingual.documents(code, "train", seed=1) != train
        assert {p for d in multilingual.documents(code, "train", seed=1) for p in d.split("\n")} == train_phrases
    assert "Россия" in multilingual.phrases("ru") and "日本" in multilingual.phrases("ja")


@pytest.mark.parametrize("fmt", sorted(CHAT_FORMATS))
def test_family_chat_formats_work_with_chat_helpers(fmt, ml_texts, tmp_path):
    tok = train_bpe_tokenizer(ml_texts[:200], 600, chat_format_name=fmt)
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)  # what later stages see
    spec = CHAT_FORMATS[fmt]
    for token in {*spec.special_tokens}:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (spec.eos, spec.pad, spec.bos)
    terminator = spec.turn_tokens[-1]
    stops = stop_token_ids(tok)
    assert set(stops) == {tok.eos_token_id, tok.convert_tokens_to_ids(terminator)}

    ids, mask = encode_chat(tok, CHAT)
    assert len(ids) == len(mask) and 0 < sum(mask) < len(ids)
    pairs = zip(ids, mask, strict=True)
    spans = [[i for i, _ in group] for masked, group in itertools.groupby(pairs, key=lambda p: p[1]) if masked]
    assert [tok.decode(s) for s in spans] == [f"5{terminator}", f"Hello, world.{terminator}"]
    assert all(s[-1] in stops for s in spans)
    assert "Answer briefly." in tok.decode(ids)  # the system message is kept (Gemma: in the user turn)

    ids, mask = encode_response(tok, "Say hi", "hi")
    prompt = prompt_text(tok, "Say hi")
    assert tok.decode(ids).startswith(prompt)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == f"hi{terminator}"
    masked = formatting_mask(tok, ids)  # turn tokens are formatting tokens (Llama 3.1 DPO masks them)
    assert sum(masked) >= 2 and all(m for i, m in zip(ids, masked, strict=True) if i in stops)


def test_byte_level_bpe_round_trips_every_language_without_unknowns(ml_texts, held_out):
    tok = train_bpe_tokenizer(ml_texts, 1024)
    assert tok.unk_token is None
    for code, docs in held_out.items():
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        assert [tok.decode(x) for x in ids] == docs, code
    rows = language_rows("t", tok, held_out)
    assert all(r["unk_rate"] == 0 and r["roundtrip"] == 1.0 for r in rows)


def test_char_bpe_without_byte_fallback_has_unknowns(ml_texts, held_out):
    rows = {r["language"]: r for r in language_rows("c", train_char_bpe_tokenizer(ml_texts, 1024), held_out)}
    for code in ("zh", "ja", "ko"):  # scripts with thousands of characters: held-out text has unseen ones
        assert rows[code]["unk_rate"] > 0 and rows[code]["roundtrip"] < 1, rows[code]


@pytest.fixture(scope="module")
def sweep(testbed, tmp_path_factory):
    """The stage with a 512/2048 sweep, tracked in a sqlite MLflow store."""
    tmp = tmp_path_factory.mktemp("sweep")
    tracker = Tracker(f"sqlite:///{tmp / 'mlflow.db'}", "tok")
    result = run_stage(
        "train_tokenizer",
        {"vocab_size": 512, "chat_format": "llama3", "report": {"vocab_sizes": [512, 2048], "corpus_chars": 50_000}},
        {"corpus": testbed["text"]},
        store=open_store(tmp / "store"),
        tracker=tracker,
        show_progress=False,
    )
    return result, tracker


def test_report_fertility_falls_as_vocabulary_grows(sweep):
    m = sweep[0].metrics
    for code in NON_LATIN:
        assert m[f"tokens_per_char_{code}_2048"] < 0.85 * m[f"tokens_per_char_{code}_512"], code
        assert m[f"bytes_per_token_{code}_2048"] > m[f"bytes_per_token_{code}_512"], code
        if multilingual.LANGUAGES[code].spaced:
            assert m[f"fertility_{code}_2048"] < m[f"fertility_{code}_512"], code
        else:
            assert f"fertility_{code}_2048" not in m  # no word spaces: only per-character fertility
    for code in multilingual.LANGUAGES:
        assert m[f"unk_rate_{code}_512"] == m[f"unk_rate_{code}_2048"] == m[f"unk_rate_{code}"] == 0.0
    assert any(m[f"unk_rate_{code}_nobyte"] > 0 for code in ("zh", "ja", "ko"))
    # The stage's own tokenizer saw only the English testbed: non-Latin text falls back to ~1 byte a token.
    assert m["bytes_per_token_ru"] < 1.3 < m["bytes_per_token_ru_2048"]


def test_report_is_logged_to_mlflow_as_table_and_plot(sweep, tmp_path):
    result, tracker = sweep
    run = tracker.client.get_run(result.run_id)
    assert run.data.params["chat_format"] == "llama3" and run.data.params["report.vocab_sizes"] == "[512, 2048]"
    assert run.data.metrics["fertility_ru_2048"] == pytest.approx(result.metrics["fertility_ru_2048"])
    assert {a.path for a in tracker.client.list_artifacts(result.run_id)} >= {
        "tokenizer_report.json",
        "tokenizer_report.png",
    }
    png = tracker.client.download_artifacts(result.run_id, "tokenizer_report.png", str(tmp_path))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    path = tracker.client.download_artifacts(result.run_id, "tokenizer_report.json", str(tmp_path))
    with open(path) as f:
        table = json.load(f)
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    n_lang = len(multilingual.LANGUAGES)
    assert [r["tokenizer"] for r in rows[::n_lang]] == ["output", "512", "2048", "char-bpe 2048"]
    ru = {r["tokenizer"]: r for r in rows if r["language"] == "ru"}
    assert ru["2048"]["fertility"] == pytest.approx(result.metrics["fertility_ru_2048"])
    assert next(r for r in rows if r["language"] == "zh")["fertility"] is None


def test_adopt_from_folder_and_store_uri(sweep, testbed, tmp_path):
    trained_uri = sweep[0].outputs["tokenizer"]
    trained = load_tokenizer(trained_uri)
    folder = tmp_path / "plain"
    trained.save_pretrained(folder)  # a plain HF folder, no manifest
    store = open_store(tmp_path / "s")
    cfg = {"source": "adopt", "chat_format": None, "report": {"languages": ["en", "ru", "zh"]}}
    out = run_stage(
        "train_tokenizer", {**cfg, "path": str(folder)}, {"corpus": testbed["text"]}, store=store.sub("a"), track=False
    )
    adopted = load_tokenizer(out.outputs["tokenizer"])
    assert adopted.get_vocab() == trained.get_vocab() and adopted.chat_template == trained.chat_template
    assert out.metrics["unk_rate_zh"] == 0 and "fertility_ru_512" not in out.metrics

    # From a store URI with chat_format: a tokenizer with a template keeps it (nothing added) ...
    cfg.update(path=trained_uri, chat_format="chatml", model_max_length=512)
    out = run_stage("train_tokenizer", cfg, {"corpus": testbed["text"]}, store=store.sub("b"), track=False)
    kept = load_tokenizer(out.outputs["tokenizer"])
    assert kept.get_vocab() == trained.get_vocab() and kept.chat_template == trained.chat_template
    assert kept.model_max_length == 512
    # ... and one without a template gets the family's, its turn tokens added (the vocabulary grows).
    trained.chat_template = None
    trained.save_pretrained(tmp_path / "untemplated")
    cfg.update(path=str(tmp_path / "untemplated"))
    out = run_stage("train_tokenizer", cfg, {"corpus": testbed["text"]}, store=store.sub("c"), track=False)
    chatml = load_tokenizer(out.outputs["tokenizer"])
    assert len(chatml) == len(trained) + 2 and chatml.chat_template == CHAT_FORMATS["chatml"].template
    assert chatml.pad_token == trained.pad_token
    assert chatml.decode([i for i, m in zip(*encode_response(chatml, "q", "a"), strict=True) if m]) == "a<|im_end|>"


def test_adopting_a_tokenizer_without_byte_fallback_reports_unknowns(testbed, ml_texts, tmp_path):
    folder = tmp_path / "charbpe"
    base = train_char_bpe_tokenizer(ml_texts, 1024)
    base.save_pretrained(folder)
    out = run_stage(
        "train_tokenizer",
        {"source": "adopt", "path": str(folder), "chat_format": "chatml", "report": {"languages": ["en", "zh", "ko"]}},
        {"corpus": testbed["text"]},
        store=open_store(tmp_path / "s"),
        track=False,
    )
    assert out.metrics["unk_rate_zh"] > 0 and out.metrics["unk_rate_ko"] > 0
    tok = load_tokenizer(out.outputs["tokenizer"])
    # The two ChatML turn tokens are added; the pad is the vocabulary's own end-of-text (no token added).
    assert tok.pad_token == "<|endoftext|>" and len(tok) == len(base) + 2


def test_multilingual_training_covers_other_scripts(testbed, tmp_path):
    def run(multi: bool) -> dict:
        cfg = {"vocab_size": 1024, "multilingual": multi, "report": {"languages": ["en", "ru", "zh"]}}
        return run_stage(
            "train_tokenizer", cfg, {"corpus": testbed["text"]}, store=open_store(tmp_path / str(multi)), track=False
        ).metrics

    english, mixed = run(False), run(True)
    assert mixed["train_chars"] > english["train_chars"]
    assert mixed["fertility_ru"] < 0.6 * english["fertility_ru"]  # measured on phrases it did not train on
    assert mixed["tokens_per_char_zh"] < 0.8 * english["tokens_per_char_zh"]


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"source": "adopt"}, "needs `path`"),
        ({"path": "x"}, "only for source 'adopt'"),
        ({"chat_format": None}, "needs a chat_format"),
        ({"report": {"languages": ["xx"]}}, "unknown language"),
        ({"report": {"vocab_sizes": [100]}}, ">= 300"),
    ],
)
def test_config_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        run_stage("train_tokenizer", cfg, {"corpus": "file:///nowhere"}, track=False)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_resize_embeddings_keeps_old_rows_and_adds_mean_rows(arch, tied):
    model = build_model(ModelConfig(arch=arch, vocab_size=50, tie_word_embeddings=tied, **SMALL)).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(ids).logits
    old_in = model.get_input_embeddings().weight.clone()
    old_out = model.get_output_embeddings().weight.clone()
    assert resize_embeddings(model, 53) == 50
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == model.config.vocab_size == 53
    torch.testing.assert_close(emb[:50], old_in)
    torch.testing.assert_close(emb[50:], old_in.mean(0).expand(3, -1))
    torch.testing.assert_close(head[50:], old_out.mean(0).expand(3, -1))
    assert (head.data_ptr() == emb.data_ptr()) == tied
    after = model(ids).logits
    torch.testing.assert_close(after[..., :50], before)
    torch.testing.assert_close(after[..., 50:], after[..., 50:51].expand(-1, -1, 3))  # new tokens score alike


def test_match_vocab_grows_never_shrinks_and_sets_pad():
    tok = train_bpe_tokenizer(["hello world"] * 20, 300)
    model = build_model(ModelConfig(vocab_size=len(tok) - 5, **SMALL))
    assert model.config.pad_token_id is None
    assert match_vocab(model, tok) and model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    padded = build_model(ModelConfig(vocab_size=len(tok) + 64, **SMALL))
    assert not match_vocab(padded, tok) and padded.config.vocab_size == len(tok) + 64


def test_init_model_grows_a_from_scratch_vocabulary_never_shrinks_it():
    tok = train_bpe_tokenizer(["hello world"] * 20, 300)
    larger = init_model(ModelConfig(vocab_size=len(tok) + 64, **SMALL), None, tok)
    assert larger.config.vocab_size == larger.get_input_embeddings().weight.shape[0] == len(tok) + 64
    smaller = init_model(ModelConfig(vocab_size=len(tok) - 5, **SMALL), None, tok)
    assert smaller.config.vocab_size == smaller.get_input_embeddings().weight.shape[0] == len(tok)


def test_a_stage_loading_a_smaller_model_resizes_it(sweep, testbed, tmp_path):
    trained = load_tokenizer(sweep[0].outputs["tokenizer"])
    model = build_model(ModelConfig(vocab_size=len(trained), **SMALL), **special_token_ids(trained))
    uri = save_model(model, trained, open_store(tmp_path / "m"))
    folder = tmp_path / "grown"
    trained.chat_template = None  # adopting gives a tokenizer without a template the family's, with its turn tokens
    trained.save_pretrained(folder)
    grown = run_stage(
        "train_tokenizer",
        {"source": "adopt", "path": str(folder), "chat_format": "gemma", "report": None},
        {"corpus": testbed["text"]},
        store=open_store(tmp_path / "t"),
        track=False,
    )
    tok = load_tokenizer(grown.outputs["tokenizer"])
    assert len(tok) == len(trained) + 3  # <bos>, <start_of_turn>, <end_of_turn>
    loaded = init_model(None, uri, tok)
    assert loaded.get_input_embeddings().weight.shape[0] == len(tok)
    ids = torch.tensor([encode_response(tok, "q", "a")[0]])
    assert ids.max() >= len(trained) and torch.isfinite(loaded(ids).logits).all()


FAMILY_TOKENIZERS = {
    "qwen2": ("qwen2-0.5b-replica", "Qwen/Qwen2-0.5B", "chatml"),
    "llama31": ("llama31-8b-replica", "meta-llama/Llama-3.1-8B", "llama3"),
    "gemma2": ("gemma2-2b-replica", "google/gemma-2-2b", "gemma"),
}


@pytest.mark.parametrize("family", ["afm", "gemma2", "llama31", "qwen2"])
def test_recipes_train_on_tiny_and_take_a_real_tokenizer_on_real_presets(family):
    tiny = load_recipe(family, "tiny")
    assert tiny.steps[1].stage == "train_tokenizer" and tiny.steps[1].id == "tokenizer"
    cfg = tiny.step("tokenizer").config
    assert cfg.source == "train" and cfg.report is None  # the multilingual report is off in tiny runs (#24)
    assert cfg.chat_format == FAMILY_TOKENIZERS.get(family, (None, None, "chatml"))[2]
    if family == "afm":  # no released tokenizer: trained at AFM's 49k vocabulary, multilingual
        real = load_recipe(family, "afm-3b-replica").step("tokenizer").config
        assert (real.source, real.vocab_size, real.multilingual) == ("train", 49152, True)
    else:
        preset, hub_id, fmt = FAMILY_TOKENIZERS[family]
        real = load_recipe(family, preset).step("tokenizer").config
        assert (real.source, real.path, real.chat_format) == ("adopt", hub_id, fmt)
