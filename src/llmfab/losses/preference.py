"""Preference losses: DPO (sigmoid, with the Llama 3.1 NLL term) and Bradley–Terry reward models.

Log-probabilities are summed over response tokens: a response is one action.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position: logits (..., V), targets (...)."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log π(x_t | x_<t) for t >= 1: shape (B, T-1)."""
    return target_logps(logits[:, :-1], input_ids[:, 1:])


def masked_logps_sum(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t log π(x_t | x_<t) over positions where `mask` (B, T) is 1, from token log-probs (B, T-1)."""
    return (token_logps * mask[:, 1:]).sum(-1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t log π(x_t | x_<t) over positions where `mask` (B, T) is 1."""
    return masked_logps_sum(token_logps(logits, input_ids), mask)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair -log σ(β[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]) and the
    implicit rewards β·log(π/π_ref) of chosen and rejected."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards.detach(), rejected_rewards.detach()


def masked_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−Σ_{b,t} m_bt log π(x_bt | x_b,<t) / Σ_{b,t} m_bt: the NLL per masked token of the whole batch
    (TRL's DPO `sft` loss term; a long response weighs more than a short one)."""
    m = mask[:, 1:].float()
    return -(token_logps(logits, input_ids) * m).sum() / m.sum().clamp_min(1.0)


def length_normalized_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_b [−log π(y_b | x_b) / |y_b|], y_b the masked tokens of row b: each response's NLL per token,
    averaged over responses (Iterative RPO's and Llama 3.1's NLL term on the chosen responses)."""
    return length_normalized_nll_of(token_logps(logits, input_ids), mask)


def length_normalized_nll_of(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """length_normalized_nll from token log-probs (B, T-1) instead of logits."""
    m = mask[:, 1:].float()
    per_sequence = -(token_logps * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    return per_sequence.mean()


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean -[p log σ(r_c - r_r - m) + (1 - p) log σ(-(r_c - r_r - m))]: the plain loss when
    p = 1 and m = 0; `margin` m (Llama 2) or a soft label p < 1 (AFM's preference levels)."""
    delta = chosen_rewards - rejected_rewards
    if margin is not None:
        delta = delta - margin
    loss = -F.logsigmoid(delta)
    if label is not None:
        loss = label * loss + (1 - label) * -F.logsigmoid(-delta)
    return loss.mean()
