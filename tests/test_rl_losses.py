"""RL losses: the leave-one-out advantage against TRL's RLOOTrainer (the pinned peer) on its own
generated batch, plus the formulas of the KL-penalised reward, mirror descent and REINFORCE."""

import math

import pytest
import torch

from llmfab.losses.preference import sequence_logps
from llmfab.losses.rl import (
    kl_penalized_rewards,
    leave_one_out_advantages,
    masked_entropy,
    mirror_descent_loss,
    reinforce_loss,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def _normalize(advantages: torch.Tensor) -> torch.Tensor:
    """The batch-wide normalisation train/rollouts.py applies when `normalize_advantages` is set."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-4)


@pytest.mark.parametrize("normalize", [False, True])
def test_leave_one_out_matches_trl_rloo(tiny_lm, normalize):
    """TRL's RLOOTrainer._generate_and_score_completions (its real path: sampling, reward funcs,
    old/ref log-probs, sequence KL penalty, leave-one-out baseline, optional normalisation) vs ours
    on the completions it sampled: A = LOO(Σ r_f − β·(log π_old − log π_ref), K)."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    tok, make, out = tiny_lm
    k, beta = 4, 0.5
    # TRL builds its reference model itself, from the policy config's `_name_or_path`; point that at a
    # differently seeded checkpoint so log π_old − log π_ref is not zero and the KL penalty matters.
    make(1).save_pretrained(out / "ref")
    policy = make(0)
    policy.config._name_or_path = str(out / "ref")
    # An untrained model almost never samples EOS among 384 tokens: make every 8th id a stop token (TRL
    # reads them from the generation config) so completions end early and completion_mask has padding.
    policy.generation_config.eos_token_id = [tok.eos_token_id, *range(3, len(tok), 8)]

    recorded: dict[str, list[float]] = {}

    def length_reward(completions, **_):
        recorded["length"] = [0.1 * len(c) for c in completions]
        return recorded["length"]

    def even_token_reward(completion_ids, **_):
        recorded["even"] = [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]
        return recorded["even"]

    args = RLOOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=3 * k, num_generations=k, max_completion_length=8,
        beta=beta, normalize_advantages=normalize, temperature=1.0, report_to=[], use_cpu=True, seed=0,
        bf16=False,  # TRL's configs default to bf16 autocast, even on CPU: keep both sides in float32
    )  # fmt: skip
    prompts = Dataset.from_list([{"prompt": f"The number {i} is"} for i in range(6)])
    trainer = RLOOTrainer(
        model=policy, reward_funcs=[length_reward, even_token_reward], args=args, train_dataset=prompts,
        processing_class=tok,
    )  # fmt: skip
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    trainer.model.train()  # the "train" branch: num_generations, per_device_train_batch_size

    # The generation batch Trainer hands to _prepare_inputs: each prompt repeated K times, consecutively.
    generation_batch = next(iter(trainer.get_train_dataloader()))
    assert len(generation_batch) == 3 * k
    groups = [[x["prompt"] for x in generation_batch[i : i + k]] for i in range(0, len(generation_batch), k)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3

    torch.manual_seed(0)
    output = trainer._generate_and_score_completions(generation_batch)
    trl_adv = output["advantages"]

    prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
    completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
    lengths = completion_mask.sum(1)
    assert lengths.min() < completion_mask.size(1) == lengths.max()  # some stopped early, some ran to the limit
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    scored = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1)
    with torch.no_grad():
        old_logps = sequence_logps(trainer.model(input_ids=ids, attention_mask=attention).logits, ids, scored)
        ref_logps = sequence_logps(trainer.ref_model(input_ids=ids, attention_mask=attention).logits, ids, scored)
    # Our full-logits log-probs agree with TRL's fused LM head on the same completions.
    torch.testing.assert_close(old_logps, output["old_logps"], **TOL)

    rewards = torch.tensor(recorded["length"]) + torch.tensor(recorded["even"])
    assert rewards.shape == trl_adv.shape and rewards.view(-1, k).std(1).min() > 0
    penalised = kl_penalized_rewards(rewards, old_logps, ref_logps, beta)
    post = _normalize if normalize else (lambda a: a)
    ours = post(leave_one_out_advantages(penalised, k))
    torch.testing.assert_close(ours, trl_adv, **TOL)

    # The comparison has teeth: the KL term is far above tolerance, and dropping it fails.
    assert (beta * (old_logps - ref_logps)).abs().max() > 1e-2
    assert not torch.allclose(post(leave_one_out_advantages(rewards, k)), trl_adv, **TOL)
    if not normalize:
        # A plain group-mean baseline gives (K−1)/K times the LOO advantages, so it fails too. After
        # batch normalisation the two are identical (a constant scale), so only the raw case checks it.
        plain_mean = (penalised.view(-1, k) - penalised.view(-1, k).mean(1, keepdim=True)).view(-1)
        assert not torch.allclose(plain_mean, trl_adv, **TOL)


def test_kl_penalized_rewards():
    r, lp, anchor = torch.tensor([1.0, -2.0]), torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    torch.testing.assert_close(kl_penalized_rewards(r, lp, anchor, 0.2), torch.tensor([1.0 - 0.2, -2.0 + 0.1]))
    torch.testing.assert_close(kl_penalized_rewards(r, lp, anchor, 0.0), r)


@pytest.mark.parametrize("k", [2, 4, 5])
def test_leave_one_out_formula(k):
    torch.manual_seed(k)
    rewards = torch.randn(3 * k, dtype=torch.float64)
    adv = leave_one_out_advantages(rewards, k)
    grouped = rewards.view(-1, k)
    torch.testing.assert_close(adv.view(-1, k).sum(1), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(adv, (k / (k - 1) * (grouped - grouped.mean(1, keepdim=True))).view(-1))
    # and literally R_i − mean of the others, one sample at a time
    i = 1
    others = torch.cat([grouped[0, :i], grouped[0, i + 1 :]])
    torch.testing.assert_close(adv[i], grouped[0, i] - others.mean())


def test_leave_one_out_rejects_bad_groups():
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        leave_one_out_advantages(torch.zeros(4), 3)


def test_mirror_descent_at_theta_k():
    """At θ = θ_k: ρ = 1, the KL term and its gradient vanish, the loss is −mean(A), and the
    gradient is the pure policy gradient −A/N."""
    torch.manual_seed(0)
    old = torch.randn(6)
    adv = torch.randn(6)
    logps = old.clone().requires_grad_(True)
    loss, stats = mirror_descent_loss(logps, old, adv, kl_coef=0.7)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["kl_to_old"] == 0.0 and stats["ratio"] == pytest.approx(1.0)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, -adv / 6)

    # the KL term alone (zero advantages): value 0 and gradient 0 at θ_k ...
    logps = old.clone().requires_grad_(True)
    kl_only, _ = mirror_descent_loss(logps, old, torch.zeros(6), kl_coef=0.7)
    (kl_grad,) = torch.autograd.grad(kl_only, logps)
    assert kl_only.item() == 0.0
    torch.testing.assert_close(kl_grad, torch.zeros(6))

    # ... and ≥ 0 with a non-zero gradient away from it
    logps = (old + torch.randn(6)).requires_grad_(True)
    kl_only, stats = mirror_descent_loss(logps, old, torch.zeros(6), kl_coef=0.7)
    (kl_grad,) = torch.autograd.grad(kl_only, logps)
    assert kl_only.item() > 0 and stats["kl_to_old"] > 0 and kl_grad.abs().max() > 0


def test_mirror_descent_value_off_policy():
    old, logps, adv = torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -1.2]), torch.tensor([1.0, -0.5])
    ratio = (logps - old).exp()
    kl = ratio * (logps - old) - ratio + 1
    loss, stats = mirror_descent_loss(logps, old, adv, kl_coef=0.3)
    torch.testing.assert_close(loss, -(ratio * adv).mean() + 0.3 * kl.mean())
    assert stats["ratio"] == pytest.approx(ratio.mean().item())


def test_reinforce_gradient():
    torch.manual_seed(0)
    logps = torch.randn(5, requires_grad=True)
    adv = torch.randn(5, requires_grad=True)
    loss = reinforce_loss(logps, adv)
    torch.testing.assert_close(loss, -(adv * logps).mean())
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, -adv.detach() / 5)
    # advantages are held fixed: no gradient flows into them
    (adv_grad,) = torch.autograd.grad(reinforce_loss(logps, adv), adv, allow_unused=True)
    assert adv_grad is None


def test_masked_entropy():
    """Uniform logits give log V at every scored position; a peaked row gives ~0; the mask weights
    positions (mask on tokens: position t scores the prediction of token t from logits t−1)."""
    v = 16
    logits = torch.zeros(2, 4, v)
    logits[1, :, 0] = 100.0  # row 1 is (numerically) deterministic
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])
    torch.testing.assert_close(masked_entropy(logits, mask), torch.tensor(0.5 * math.log(v)))
    torch.testing.assert_close(masked_entropy(logits[:1], mask[:1]), torch.tensor(math.log(v)))
    assert masked_entropy(logits[1:], mask[1:]).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_entropy(logits, torch.zeros_like(mask)).item() == 0.0  # nothing scored: 0, not NaN
