"""Preference losses against TRL (the pinned peer) on identical tensors, plus their formulas."""

import math

import pytest
import torch

from llmfab.losses.preference import (
    bradley_terry_loss,
    dpo_loss,
    length_normalized_nll,
    masked_nll,
    sequence_logps,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def _pairs(n=8):
    from datasets import Dataset

    rows = [{"prompt": f"What is {i} + 2?", "chosen": str(i + 2), "rejected": f"{i + 3} or so"} for i in range(n)]
    return Dataset.from_list(rows)


@pytest.mark.parametrize("nll_weight", [0.0, 0.2])
def test_dpo_matches_trl(tiny_lm, nll_weight):
    """TRL's DPOTrainer.compute_loss vs ours on TRL's own collated batch: sigmoid DPO, and DPO +
    0.2 NLL on chosen (Llama 3.1; TRL's loss_type=['sigmoid', 'sft'])."""
    from trl import DPOConfig, DPOTrainer

    tok, make, out = tiny_lm
    policy, reference = make(0), make(1)
    loss_type, weights = (["sigmoid"], [1.0]) if not nll_weight else (["sigmoid", "sft"], [1.0, nll_weight])
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=4, beta=0.1, loss_type=loss_type, loss_weights=weights,
        report_to=[], use_cpu=True,
    )  # fmt: skip
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=_pairs(), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))

    ids, mask = batch["input_ids"], batch["completion_mask"]
    logits = policy(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        ref_logits = reference(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    chosen, rejected = sequence_logps(logits, ids, mask).chunk(2)
    ref_chosen, ref_rejected = sequence_logps(ref_logits, ids, mask).chunk(2)
    ours = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)[0].mean()
    if nll_weight:
        n = len(chosen)
        ours = ours + nll_weight * masked_nll(logits[:n], ids[:n], mask[:n])
    torch.testing.assert_close(ours, trl_loss, **TOL)


def test_bradley_terry_with_margin_matches_trl(tiny_lm):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tok, make, out = tiny_lm
    make(0).save_pretrained(out / "base")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(out / "base", num_labels=1)
    rows = [{**r, "margin": 0.25 * (i % 4)} for i, r in enumerate(_pairs().to_list())]
    args = RewardConfig(output_dir=str(out / "rm"), per_device_train_batch_size=4, report_to=[], use_cpu=True)
    trainer = RewardTrainer(model=rm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = dict(next(iter(trainer.get_train_dataloader())))
    assert "margin" in batch
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))

    rewards = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    chosen, rejected = rewards.chunk(2)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=batch["margin"]), trl_loss, **TOL)


def test_dpo_loss_formula():
    c, r, rc, rr = (torch.tensor([x]) for x in (-3.0, -5.0, -4.0, -4.5))
    loss, chosen_reward, rejected_reward = dpo_loss(c, r, rc, rr, beta=0.5)
    expected = -math.log(1 / (1 + math.exp(-0.5 * ((-3 + 4) - (-5 + 4.5)))))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen_reward.item() == pytest.approx(0.5) and rejected_reward.item() == pytest.approx(-0.25)


def test_bradley_terry_soft_labels():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    hard = bradley_terry_loss(chosen, rejected)
    assert bradley_terry_loss(chosen, rejected, label=torch.ones(2)).item() == pytest.approx(hard.item())
    # p = 0.5 is indifferent: the loss is minimal (log 2) at equal rewards and symmetric around them.
    half = torch.full((1,), 0.5)
    at_equal = bradley_terry_loss(torch.zeros(1), torch.zeros(1), label=half)
    assert at_equal.item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.ones(1), torch.zeros(1), label=half) > at_equal
    # A soft label's optimum sits at a finite reward gap logit(p), not at infinity.
    gaps = torch.linspace(0, 6, 601)
    losses = torch.stack([bradley_terry_loss(g.view(1), torch.zeros(1), label=torch.tensor([0.85])) for g in gaps])
    assert gaps[losses.argmin()].item() == pytest.approx(math.log(0.85 / 0.15), abs=0.01)


def test_sequence_logps_sums_only_masked_tokens():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 6, 10, generator=g), torch.randint(0, 10, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([sum(logp[b, t - 1, ids[b, t]] for t in range(1, 6) if mask[b, t]) for b in range(2)])
    torch.testing.assert_close(sequence_logps(logits, ids, mask), expected)


def _nll_batch():
    """Logits, ids and a mask holding one 4-token and one 1-token response."""
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 6, 10, generator=g), torch.randint(0, 10, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    return logits, ids, mask


def test_llama_nll_is_per_response_token_then_mean_over_pairs():
    """-mean_b log π(y_b|x_b) / |y_b| (Iterative RPO, Llama 3): a 1-token and a 4-token response weigh alike;
    TRL's per-token batch mean (masked_nll) weighs the longer one 4:1."""
    logits, ids, mask = _nll_batch()
    logp = torch.log_softmax(logits, -1)
    per_response = [-sum(logp[b, t - 1, ids[b, t]] for t in range(1, 6) if mask[b, t]) / mask[b].sum() for b in (0, 1)]
    expected = (per_response[0] + per_response[1]) / 2
    torch.testing.assert_close(length_normalized_nll(logits, ids, mask), expected)
    assert not torch.allclose(masked_nll(logits, ids, mask), expected)


def test_dpo_loss_fn_adds_the_length_normalized_nll_on_chosen():
    from types import SimpleNamespace

    from llmfab.train.dpo import DPOLossConfig, dpo_loss_fn

    _, ids, mask = _nll_batch()
    table = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))

    def model(input_ids, position_ids=None, use_cache=False):  # logits of the current token only: a bigram table
        return SimpleNamespace(logits=table[input_ids])

    batch = {
        "chosen_ids": ids,
        "rejected_ids": ids.flip(0),
        "chosen_length": torch.full((len(ids),), ids.shape[1]),
        "rejected_length": torch.full((len(ids),), ids.shape[1]),
        "chosen_mask": mask,
        "rejected_mask": mask.flip(0),
        "chosen_full_mask": mask,
        "ref_chosen": torch.zeros(2),
        "ref_rejected": torch.zeros(2),
    }
    plain, _ = dpo_loss_fn(DPOLossConfig(beta=0.1))(model, batch)
    loss, metrics = dpo_loss_fn(DPOLossConfig(beta=0.1, nll_weight=0.2))(model, batch)
    nll = length_normalized_nll(table[ids], ids, mask)
    assert metrics["nll_chosen"] == pytest.approx(nll.item(), rel=1e-6)
    torch.testing.assert_close(loss, plain + 0.2 * nll)
