"""Policy-gradient pieces for the RL stages: KL-regularised sequence rewards, leave-one-out
advantages (RLOO / AFM's MDLOO), the mirror-descent objective and REINFORCE (Gemma 2's WARP).

A response is one action: log-probabilities are summed over its tokens, and so is the KL term.
"""

from __future__ import annotations

import torch


def kl_penalized_rewards(
    rewards: torch.Tensor, logps: torch.Tensor, anchor_logps: torch.Tensor, beta: float
) -> torch.Tensor:
    """R = r − β·log(π(y|x)/π_anchor(y|x)), the anchor being the reference (MDLOO) or the EMA (WARP)."""
    return rewards - beta * (logps - anchor_logps)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = R_i − mean_{j≠i} R_j within each group of `group_size` consecutive samples of one prompt."""
    if group_size < 2:
        raise ValueError(f"leave-one-out needs at least 2 samples per prompt, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


def mirror_descent_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """−E[ρ·A] + kl_coef·KL(π_θ‖π_k) on samples of π_k, with ρ = π_θ(y|x)/π_k(y|x) unclipped.

    KL(π_θ‖π_k) = E_{π_k}[ρ log ρ]; the estimator E_{π_k}[ρ log ρ − ρ + 1] has the same mean
    (E_{π_k}[ρ] = 1), is ≥ 0 per sample, and its gradient vanishes at θ = θ_k sample by sample,
    so the first inner step is the pure leave-one-out policy gradient."""
    log_ratio = logps - old_logps
    ratio = log_ratio.exp()
    kl = ratio * log_ratio - ratio + 1
    loss = -(ratio * advantages.detach()).mean() + kl_coef * kl.mean()
    return loss, {"ratio": ratio.mean().item(), "kl_to_old": kl.mean().item()}


def reinforce_loss(logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """−E[A·log π(y|x)]: the REINFORCE policy gradient with the advantages held fixed."""
    return -(advantages.detach() * logps).mean()


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distribution at the response positions (mask (B, T) on tokens)."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    entropy = -(logps.exp() * logps).sum(-1)
    m = mask[:, 1:].float()
    return (entropy * m).sum() / m.sum().clamp_min(1.0)
