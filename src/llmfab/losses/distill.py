"""Knowledge-distillation losses over next-token distributions.

All take logits [B, T, V] already aligned with `labels` [B, T] (the token each position
predicts) and reduce over positions whose label is not -100: their mean, or with reduction="sum"
their sum (the Trainer divides a step's sums by the step's target tokens, see trainer.SummedLoss).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE = -100
Reduction = Literal["mean", "sum"]


def _reduce(per_token: torch.Tensor, labels: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    """Σ or mean of `per_token` over the positions whose label is not -100 (all positions without labels)."""
    kept = per_token if labels is None else per_token[labels != IGNORE]
    if reduction == "sum":
        return kept.sum()
    return kept.sum() / max(kept.numel(), 1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ_v p (log p − log q) per position; terms with p = 0 contribute 0 (top-k teachers)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def teacher_log_probs(teacher_logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None):
    """log P_T at `temperature`, optionally keeping only the top-k tokens, renormalised (Gemma 2)."""
    logits = teacher_logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.log_softmax(logits.float(), dim=-1)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Generalised JSD (Agarwal et al. 2023): β·KL(T‖M) + (1−β)·KL(S‖M), M = βT + (1−β)S, per position.

    β = 0 is forward KL(T‖S) = Σ_v P_T (log P_T − log P_S), the distillation loss of Gemma 2
    (same gradient as Σ_v −P_T log P_S); β = 1 is reverse KL(S‖T).
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = teacher_log_probs(teacher_logits, temperature, top_k)
    if beta == 0:
        per_token = _kl(log_t, log_s)
    elif beta == 1:
        per_token = _kl(log_s, log_t)
    else:
        b = torch.tensor(beta, dtype=log_s.dtype, device=log_s.device)
        log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-b), log_t + torch.log(b)]), dim=0)
        per_token = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    return _reduce(per_token, labels, reduction)


def afm_top1_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_weight: float = 0.9,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """AFM: cross-entropy against 0.9·onehot(teacher top-1) + 0.1·onehot(true token), per position."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    safe = labels.clamp_min(0)
    top1 = teacher_logits.argmax(-1)
    nll_true = -log_s.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll_teacher = -log_s.gather(-1, top1.unsqueeze(-1)).squeeze(-1)
    return _reduce(teacher_weight * nll_teacher + (1 - teacher_weight) * nll_true, labels, reduction)
