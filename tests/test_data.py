import json
import random

import pytest

from llmfab.data.io import read_dataset, write_dataset
from llmfab.data.tasks import TASKS, gold_reward
from llmfab.errors import DataError
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store


@pytest.mark.parametrize("task", ["arithmetic", "format", "wordlist", "kv_retrieval"])
def test_reference_scores_one_and_corruption_less(task):
    rng = random.Random(0)
    for _ in range(200):
        ex = TASKS[task].sample(rng)
        assert gold_reward(task, ex.meta, ex.answer) == 1.0, ex
        assert gold_reward(task, ex.meta, TASKS[task].slip(ex)) < 1.0, ex  # the annotators' typical mistake
        wrong, level = TASKS[task].corrupt(rng, ex)
        assert wrong != ex.answer
        assert gold_reward(task, ex.meta, wrong) < 1.0, (ex, wrong)
        assert level in (0, 1, 2, 3)


def test_gold_reward_reads_responses():
    assert gold_reward("arithmetic", {"answer": -7}, "The answer is -7.") == 1.0
    assert gold_reward("arithmetic", {"answer": 7}, "no number") == 0.0
    meta = {"kind": "repeat", "word": "cat", "n": 4, "answer": "cat, cat, cat, cat"}
    assert gold_reward("format", meta, "cat, cat") == pytest.approx(0.25)
    assert gold_reward("format", {"kind": "upper", "word": "cat", "answer": "CAT"}, "cat") == 0.5
    meta = {"kind": "reverse", "items": ["a", "b", "c", "d"], "answer": "d, c, b, a"}
    assert gold_reward("wordlist", meta, "d, c, b, a.") == 1.0
    assert gold_reward("wordlist", meta, "d, c, a, b") == pytest.approx(0.25)  # half the positions, half credit
    assert gold_reward("wordlist", {"kind": "last", "items": ["a", "b"], "answer": "b"}, "a") == 0.0
    with pytest.raises(KeyError, match="unknown task"):
        gold_reward("nope", {}, "")


def test_kv_retrieval_depth_and_length():
    ex = TASKS["kv_retrieval"].sample(random.Random(1), n_pairs=200, depth=0.5)
    assert ex.prompt.count("\n") >= 200
    assert 0.45 <= ex.meta["depth"] <= 0.55
    assert f"{ex.meta['key']}: {ex.answer}" in ex.prompt


@pytest.fixture
def good_jsonl(tmp_path):
    path = tmp_path / "chat.jsonl"
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    return path


def test_read_jsonl(good_jsonl):
    records = read_dataset(good_jsonl, "chat")
    assert len(records) == 2 and records[0]["messages"][1]["content"] == "hello"


def test_malformed_record_names_file_and_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path.write_text("\n".join([json.dumps(good), json.dumps(good), json.dumps({"prompt": "p", "chosen": "a"})]))
    with pytest.raises(DataError, match=r"prefs\.jsonl:3: field 'rejected': Field required"):
        read_dataset(path, "preference")
    path.write_text(json.dumps(good) + "\n{broken\n")
    with pytest.raises(DataError, match=r"prefs\.jsonl:2: invalid JSON"):
        read_dataset(path, "preference")
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    with pytest.raises(DataError, match=r"prefs\.jsonl:1: field 'messages\[0\]\.role'"):
        read_dataset(path, "chat")
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(DataError, match="at least one assistant"):
        read_dataset(path, "chat")


def test_parquet_and_hf_dir(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "task": "arithmetic", "meta": {"answer": i}} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert [r["prompt"] for r in read_dataset(tmp_path / "p.parquet", "prompt")] == [f"q{i}" for i in range(5)]
    bad = [{"prompt": "ok"}, {"prompt": ""}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: row 1: field 'prompt'"):
        read_dataset(tmp_path / "bad.parquet", "prompt")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"text": "hello world"}] * 3),
            "test": datasets.Dataset.from_list([{"text": "held out"}]),
        }
    )
    dd.save_to_disk(tmp_path / "hf")
    assert len(read_dataset(tmp_path / "hf", "text", split="train")) == 3
    assert read_dataset(tmp_path / "hf", "text", split="test")[0]["text"] == "held out"
    with pytest.raises(DataError, match="splits"):
        read_dataset(tmp_path / "hf", "text", split="validation")


def test_write_and_read_from_store(store):
    uri = write_dataset(store.sub("ds"), {"train": [{"text": "a"}, {"text": "b"}], "test": [{"text": "c"}]}, "text")
    assert [r["text"] for r in read_dataset(uri, "text", "train")] == ["a", "b"]
    assert [r["text"] for r in read_dataset(uri, "text", "test")] == ["c"]
    assert [r["text"] for r in read_dataset(f"{uri}/test.jsonl", "text", None)] == ["c"]
    with pytest.raises(DataError, match="no split 'validation'"):
        read_dataset(uri, "text", "validation")
    with pytest.raises(DataError, match="train record 0: field 'text'"):
        write_dataset(store.sub("bad"), {"train": [{"txt": "a"}]}, "text")


def test_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="no dataset found"):
        read_dataset(tmp_path / "nothing", "text")
    with pytest.raises(DataError, match="no such dataset file"):
        read_dataset(tmp_path / "nothing.jsonl", "text")


def _prepare(tmp_path, name, **cfg):
    small = dict(prose_docs=30, code_docs=20, task_docs=30, sft_examples=30, prompts=20, preference_pairs=30)
    return run_stage("prepare_data", {**small, **cfg}, store=open_store(tmp_path / name), track=False)


def test_prepare_data_deterministic(tmp_path):
    a, b = _prepare(tmp_path, "a", seed=3), _prepare(tmp_path, "b", seed=3)
    c = _prepare(tmp_path, "c", seed=4)
    for name in ("text", "sft", "prompts", "preferences"):
        kind = {"text": "text", "sft": "chat", "prompts": "prompt", "preferences": "preference"}[name]
        ra, rb = read_dataset(a.outputs[name], kind), read_dataset(b.outputs[name], kind)
        assert ra == rb, name
        assert ra != read_dataset(c.outputs[name], kind), name
    sources = {r["source"] for r in read_dataset(a.outputs["text"], "text")}
    assert sources == {"prose", "code", "tasks"}
    prefs = read_dataset(a.outputs["preferences"], "preference")
    assert all(
        gold_reward(p["task"], p["meta"], p["chosen"]) > gold_reward(p["task"], p["meta"], p["rejected"]) for p in prefs
    )
    assert a.metrics["sft_test_records"] >= 3


def test_splits_never_share_a_prompt():
    from llmfab.data.testbed import chat_record, prompt_of, sample_examples, split

    records = [chat_record(ex) for ex in sample_examples(["format"], 600, random.Random(0))]
    parts = split(records, 0.1)
    train, test = {prompt_of(r) for r in parts["train"]}, {prompt_of(r) for r in parts["test"]}
    assert not train & test
    assert len(parts["train"]) + len(parts["test"]) == 600
    assert 50 <= len(parts["test"]) <= 80


def test_prepared_data_never_trains_on_an_item_it_evaluates_on(tmp_path):
    """An item held out anywhere (the gold reward's prompts, SFT or preference test splits) is asked in no
    training split and no pre-training demo, in any of its phrasings; the prompts' test split holds exactly
    `heldout_prompts` distinct items."""
    from llmfab.data.testbed import key_of

    res = _prepare(
        tmp_path, "x", tasks=["arithmetic", "format", "wordlist"], max_operand=9, task_docs=600, sft_examples=400,
        prompts=300, heldout_prompts=120, preference_pairs=300,
    )  # fmt: skip
    held = set()
    for name, kind in (("sft", "chat"), ("prompts", "prompt"), ("preferences", "preference")):
        held |= {key_of(r) for r in read_dataset(res.outputs[name], kind, "test")}
    gold_items = [key_of(r) for r in read_dataset(res.outputs["prompts"], "prompt", "test")]
    assert len(gold_items) == len(set(gold_items)) == 120
    for name, kind in (("sft", "chat"), ("prompts", "prompt"), ("preferences", "preference")):
        train = read_dataset(res.outputs[name], kind, "train")
        assert train and not {key_of(r) for r in train} & held, name
    # Pre-training demos: no held-out sum is shown in any of its phrasings.
    from llmfab.data.tasks import Arithmetic

    demos = {r["text"].rsplit("\n", 1)[0] for r in read_dataset(res.outputs["text"], "text") if r["source"] == "tasks"}
    sums = [r["meta"] for r in read_dataset(res.outputs["prompts"], "prompt", "test") if r["task"] == "arithmetic"]
    phrasings = {t.format(a=m["a"], op=m["op"], b=m["b"]) for m in sums for t in Arithmetic.TEMPLATES}
    assert demos and sums and not phrasings & demos


def test_demonstrations_are_wrong_at_the_set_rate_and_more_often_on_hard_items():
    import statistics

    from llmfab.data.testbed import demonstration, sample_examples

    rng = random.Random(0)
    examples = sample_examples(["format", "wordlist"], 6000, rng, format_kinds=("repeat",), max_repeat=7)
    demos = [demonstration(ex, rng, 0.25) for ex in examples]
    wrong = [gold_reward(ex.task, ex.meta, d.answer) < 1 for ex, d in zip(examples, demos, strict=True)]
    assert statistics.fmean(wrong) == pytest.approx(0.25, abs=0.02)
    easy = [w for ex, w in zip(examples, wrong, strict=True) if ex.difficulty == 0]
    hard = [w for ex, w in zip(examples, wrong, strict=True) if ex.difficulty == 1]
    assert easy and not any(easy)  # the easiest items are always right
    assert statistics.fmean(hard) == pytest.approx(0.5, abs=0.05)
    assert all(demonstration(ex, rng, 0.0) is ex for ex in examples[:100])


def test_one_item_in_several_phrasings_is_one_key():
    from llmfab.data.testbed import sample_examples

    examples = sample_examples(["arithmetic"], 400, random.Random(0), max_operand=2)
    by_key = {}
    for ex in examples:
        by_key.setdefault(ex.key, set()).add(ex.prompt)
    assert len(by_key) == 3 * 3 * 2 and max(len(p) for p in by_key.values()) > 1


def test_fact_documents_state_every_answer_but_ask_no_question(tmp_path):
    """fact_docs put arithmetic knowledge into pre-training as equations; the evaluation questions
    themselves stay out of every text, and the facts are right."""
    res = _prepare(tmp_path, "facts", tasks=["arithmetic"], max_operand=3, fact_docs=40, prompts=60, heldout_prompts=10)
    text = read_dataset(res.outputs["text"], "text", "train") + read_dataset(res.outputs["text"], "text", "test")
    facts = [line for r in text if r["source"] == "facts" for line in r["text"].splitlines()]
    assert len(facts) == 40 * 8
    for line in facts:
        left, right = line.split(" = ")
        a, op, b = left.split()
        assert int(right) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    held = {r["prompt"] for r in read_dataset(res.outputs["prompts"], "prompt", "test")}
    answers = {
        f"{r['meta']['a']} {r['meta']['op']} {r['meta']['b']}"
        for r in read_dataset(res.outputs["prompts"], "prompt", "test")
    }
    assert held and answers & {line.split(" = ")[0] for line in facts}  # the facts behind held-out questions are known
    assert not any(q in r["text"] for r in text for q in held)


def test_split_lookup_by_file_names(tmp_path):
    from llmfab.errors import NoSplitError

    rec = json.dumps({"text": "x"})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    (tmp_path / "hub" / "data" / "train-00000-of-00001.jsonl").write_text(rec + "\n" + rec)
    (tmp_path / "hub" / "data" / "test-00000-of-00001.jsonl").write_text(rec)
    assert len(read_dataset(tmp_path / "hub", "text", "train")) == 2
    assert len(read_dataset(tmp_path / "hub", "text", "test")) == 1
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "data.jsonl").write_text(rec)
    assert len(read_dataset(tmp_path / "flat", "text", "train")) == 1
    with pytest.raises(NoSplitError, match="no split 'test'"):
        read_dataset(tmp_path / "flat", "text", "test")
    with pytest.raises(NoSplitError, match="a single file has no 'test' split"):
        read_dataset(tmp_path / "flat" / "data.jsonl", "text", "test")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not UTF-8"):
        read_dataset(tmp_path / "bad.jsonl", "text")
