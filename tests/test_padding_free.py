"""The padding-free paths (packed pair rows, the LM head on loss positions only) compute what the padded,
full-logits formulas compute: log-probs, rewards, the SFT loss and their gradients, on the Llama, Qwen2 and
Gemma 2 architectures (Gemma 2 with its final-logit softcapping and tied embeddings)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from llmfab.config.model import ModelConfig
from llmfab.losses.preference import sequence_logps, token_logps
from llmfab.models import build_hf_config, build_model
from llmfab.train import head_positions
from llmfab.train import lm as lm_module
from llmfab.train.head_positions import head_on, logits_at, target_logps_at
from llmfab.train.lm import lm_forward, lm_loss, loss_positions, token_nll_sum
from llmfab.train.packing import best_fit_decreasing, pack_padded

ARCHS = ["llama", "qwen2", "gemma2"]


def _config(arch: str) -> ModelConfig:
    extra = (
        {"final_logit_softcapping": 5.0, "attn_logit_softcapping": 50.0, "sliding_window": 6}
        if arch == "gemma2"
        else {}
    )
    return ModelConfig(arch=arch, vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=64, max_position_embeddings=64, **extra)  # fmt: skip


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 4, 13, 7, 13, 2])
    ids = torch.randint(1, 97, (len(lengths), 13), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, n:] = 0
        mask[i, max(1, n // 2) : n] = 1
    return ids, lengths, mask


def test_best_fit_decreasing_and_pack_padded_layout():
    assert best_fit_decreasing([5, 3, 4, 2, 1], 7) == [[0, 3], [2, 1], [4]]
    bins = best_fit_decreasing([3, 9, 4, 1, 6, 7, 2, 5], 10)
    assert sorted(i for b in bins for i in b) == list(range(8)) and len(bins) == 4  # 37 tokens in 4 rows of 10
    ids = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 6], [7, 0, 0, 0]])
    packed = pack_padded(ids, torch.tensor([2, 4, 1]), pad_id=0)
    assert packed["input_ids"].tolist() == [[3, 4, 5, 6], [1, 2, 7, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]  # padding continues the last one
    flat = packed["input_ids"].flatten()
    for i, n in enumerate([2, 4, 1]):
        assert flat[packed["offsets"][i] : packed["offsets"][i] + n].tolist() == ids[i, :n].tolist()


def test_loss_positions_are_the_shifted_targets():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    index, targets = loss_positions(labels)
    assert index.tolist() == [0, 1, 5, 6] and targets.tolist() == [5, 6, 7, 8]


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_token_logps_match_padded_full_logits(arch):
    from llmfab.train.pairs import packed_token_logps

    model = build_model(_config(arch), seed=0).train()
    ids, lengths, mask = _batch()
    expected = token_logps(model(input_ids=ids, use_cache=False).logits, ids) * mask[:, 1:]
    (expected.sum() * 0.1).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = packed_token_logps(model, ids, lengths, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    (got.sum() * 0.1).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)
    torch.testing.assert_close(got.sum(-1), sequence_logps(model(input_ids=ids).logits, ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_loss_on_target_positions_matches_full_logits(arch):
    model = build_model(_config(arch), seed=0).train()
    ids, _, _ = _batch(1)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[ids == 0] = -100
    batch = {"input_ids": ids, "position_ids": torch.arange(13).expand(6, 13), "labels": labels}
    expected = token_nll_sum(model(input_ids=ids, position_ids=batch["position_ids"]).logits, labels)
    got = lm_loss(model, batch)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-6)
    index, _ = loss_positions(labels)
    full = model(input_ids=ids).logits.flatten(0, 1)[index]
    # The model's own post-processing (Gemma 2's softcap) applies to the selected positions.
    torch.testing.assert_close(logits_at(model, index, input_ids=ids), full, atol=1e-5, rtol=1e-5)


def test_lm_loss_on_documents_takes_the_full_logits_within_the_budget(monkeypatch):
    # Pretraining rows carry loss on most positions, even with short documents (here 4 tokens, each first
    # one unlabelled): the loss is token_nll_sum's, bit for bit, so pretraining's numerics are unchanged.
    model = build_model(_config("qwen2"), seed=0).train()
    ids, _, _ = _batch(1)
    position_ids = (torch.arange(13) % 4).expand(6, 13)
    labels = ids.clone()
    labels[position_ids == 0] = -100
    batch = {"input_ids": ids, "position_ids": position_ids, "labels": labels}
    expected = token_nll_sum(lm_forward(model, batch).logits, labels)  # documents kept apart, as in training

    def no_selection(*args, **kwargs):
        raise AssertionError("the head ran on selected positions")

    with monkeypatch.context() as patched:
        patched.setattr(lm_module, "target_logps_at", no_selection)
        assert torch.equal(lm_loss(model, batch)[0], expected)
    # Whose full logits would pass the budget: the head a chunk at a time, the same loss.
    monkeypatch.setattr(head_positions, "LOGITS_BUDGET", 97 * 8)
    torch.testing.assert_close(lm_loss(model, batch)[0], expected, atol=1e-4, rtol=1e-6)


def test_head_on_reaches_through_wrappers_and_falls_back_without_a_head():
    model = build_model(_config("qwen2"), seed=0)

    class Wrapper(torch.nn.Module):  # DDP / DeepSpeed hold the model as `module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    index = torch.tensor([0, 3, 20])
    with head_on(Wrapper(model), index) as hooked:
        assert hooked and Wrapper(model)(input_ids=torch.ones(2, 13, dtype=torch.long)).logits.shape == (3, 97)
    with head_on(torch.nn.Identity(), index) as hooked:
        assert not hooked


@pytest.mark.parametrize("arch", ARCHS)
def test_target_logps_in_chunks_match_the_whole_logits(arch, monkeypatch):
    # Beyond LOGITS_BUDGET the head runs on a few positions at a time (Gemma 2's softcap applied by us, as its
    # forward does) and recomputes them in the backward: the same log-probs and gradients, never more rows at once.
    model = build_model(_config(arch), seed=0).train()
    ids, _, _ = _batch(3)
    index = torch.arange(1, ids.numel(), 3)
    targets = torch.randint(0, 97, (len(index),), generator=torch.Generator().manual_seed(4))
    whole = target_logps_at(model, index, targets, input_ids=ids)
    whole.sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: rows.append(out.shape[0]))
    monkeypatch.setattr(head_positions, "LOGITS_BUDGET", 97 * 5)
    chunked = target_logps_at(model, index, targets, input_ids=ids)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    chunked.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)
    assert max(rows) == 5 and sum(rows) >= 2 * len(index)  # chunks of 5 rows, each run again in the backward


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rewards_match_reading_each_padded_row(arch):
    from llmfab.train.pairs import packed_rewards, reward_at_last_token

    hf = build_hf_config(_config(arch), pad_token_id=0)
    hf.num_labels = 1
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(hf).train()
    ids, lengths, _ = _batch(2)
    expected = reward_at_last_token(rm, ids, lengths)
    expected.sum().backward()
    want = {n: p.grad.clone() for n, p in rm.named_parameters()}
    rm.zero_grad()
    got = packed_rewards(rm, ids, lengths)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    for n, p in rm.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_rows_repacked_padding_free_give_the_same_loss_and_gradients(arch):
    from llmfab.train.sft_data import pack_examples

    model = build_model(_config(arch), seed=0).train()
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (20, 5, 7, 18, 3, 9, 12, 4, 16):  # several too long to share a 32-token row
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        examples.append((ids, [0] * (n // 2) + [1] * (n - n // 2)))
    rows = pack_examples(examples, 32, pad_id=0, seed=0)
    assert rows["row_lengths"].tolist() == [int((r != 0).sum()) for r in rows["input_ids"]]
    padded = {k: v for k, v in rows.items() if k != "row_lengths"}
    expected = lm_loss(model, padded)[0]
    torch.testing.assert_close(
        expected,
        token_nll_sum(lm_forward(model, rows).logits, rows["labels"]),
        atol=1e-4,
        rtol=1e-6,
    )
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = lm_loss(model, rows)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-6)
    got.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_repack_documents_layout():
    from llmfab.train.packing import repack_documents

    ids = torch.tensor([[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 10, 11, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5]])
    new_ids, new_pos, where = repack_documents(ids, pos, torch.tensor([5, 6]))
    assert new_ids.tolist() == [[8, 9, 10, 11], [1, 2, 3, 0], [4, 5, 6, 7]]  # longest document first
    assert new_pos.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert (new_ids.flatten()[where[where >= 0]] == ids.flatten()[where >= 0]).all()
    assert where.view(2, 8)[:, 6:].eq(-1).all() and where[5] == -1
