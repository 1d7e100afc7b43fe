import pytest
import torch

from llmfab.config.model import ModelConfig
from llmfab.errors import DataError
from llmfab.models import build_model
from llmfab.train.packing import IGNORE, mixture_sample, pack_documents
from llmfab.train.schedule import lr_multiplier


def test_pack_documents_layout():
    packed = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]], seq_len=6, pad_id=0)
    # A 1-token tail would teach nothing: the row is padded and the next document starts a row.
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert packed["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5, IGNORE], [IGNORE, 7, 8, 9, 10, 11]]
    long = pack_documents([list(range(1, 15))], seq_len=6, pad_id=0)
    assert long["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]] * 2 + [[0, 1, 2, 3, 4, 5]]
    assert long["input_ids"][2].tolist() == [13, 14, 0, 0, 0, 0]


def test_mixture_weights_shift_the_share():
    docs = {"prose": [[1] * 10] * 50, "code": [[2] * 10] * 50}
    even = mixture_sample(docs, {}, 20_000, seed=0)
    upweighted = mixture_sample(docs, {"code": 3.0}, 20_000, seed=0)
    share = lambda sample: sum(d[0] == 2 for d in sample) / len(sample)  # noqa: E731
    assert share(even) == pytest.approx(0.5, abs=0.05)
    assert share(upweighted) == pytest.approx(0.75, abs=0.05)
    assert mixture_sample(docs, {"code": 3.0}, 5000, seed=1) == mixture_sample(docs, {"code": 3.0}, 5000, seed=1)
    with pytest.raises(DataError, match="no documents"):
        mixture_sample(docs, {"code": 0, "prose": 0}, 10, seed=0)
    with pytest.raises(DataError, match=r"mixture names source\(s\) maths"):
        mixture_sample(docs, {"maths": 2.0}, 10, seed=0)


def test_mixture_share_is_by_tokens_whatever_the_document_lengths():
    # Same tokens per source, very different document lengths: natural share stays 50/50.
    docs = {"long": [[1] * 1000] * 10, "short": [[2] * 10] * 1000}
    sample = mixture_sample(docs, {}, 200_000, seed=0)
    long_tokens = sum(len(d) for d in sample if d[0] == 1)
    assert long_tokens / sum(len(d) for d in sample) == pytest.approx(0.5, abs=0.1)


def test_schedules():
    assert lr_multiplier(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(10, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(99, 100, 10, "cosine", 0.1) == pytest.approx(0.1, abs=1e-3)
    assert lr_multiplier(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(99, 100, 0, "linear", 0.0) == pytest.approx(0.01), "the last step still moves"
    assert lr_multiplier(50, 100, 0, "linear", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(50, 100, 10, "constant", 0.0) == 1.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_no_attention_across_documents(arch):
    """A token's logits do not change when another document packed in the same row changes."""
    model = build_model(
        ModelConfig(
            arch=arch,
            vocab_size=100,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).eval()
    doc_a, doc_b, doc_b2 = [5, 6, 7, 8, 9], [10, 11, 12, 13], [40, 41, 42, 43]

    def logits(*docs):
        packed = pack_documents(docs, seq_len=16, pad_id=0)
        with torch.no_grad():
            return model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]

    base = logits(doc_a, doc_b, doc_a)
    changed = logits(doc_a, doc_b2, doc_a)
    torch.testing.assert_close(base[:5], changed[:5])  # doc A before B
    torch.testing.assert_close(base[9:14], changed[9:14])  # doc A after B: B is invisible to it
    assert not torch.allclose(base[5:9], changed[5:9])
    alone = logits(doc_a)
    torch.testing.assert_close(base[9:14], alone[:5], atol=1e-5, rtol=1e-5)  # as if it were alone
