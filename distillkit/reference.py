"""Pure-PyTorch references, the oracle for tests and benchmarks.

Written for clarity, not speed: each op is the SPEC formula with plain tensor
ops, accumulating in fp32 (fp64 for fp64 inputs). They allocate several N x C
temporaries, which is exactly what the fused kernels avoid.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["kd_loss_ref"]


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _plogp_ratio(p: Tensor, log_p: Tensor, log_other: Tensor) -> Tensor:
    """Σ p (log p − log other) per row, with 0·log 0 = 0 (xlogy semantics).

    The difference is masked too, so that masked entries (−inf − −inf = NaN) get a
    zero gradient rather than 0·NaN. An all −inf row has p = NaN and stays NaN.
    """
    zero = p == 0
    diff = torch.where(zero, torch.zeros_like(p), log_p - log_other)
    return torch.where(zero, torch.zeros_like(p), p * diff).sum(-1)


def _soft_rows(log_q: Tensor, log_p: Tensor, divergence: str, beta: float) -> Tensor:
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _plogp_ratio(p, log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _plogp_ratio(q, log_q, log_p)
    m = beta * p + (1.0 - beta) * q
    # m = 0 only where p = q = 0, whose terms are masked; log(1) keeps their gradient finite.
    log_m = torch.log(torch.where(m == 0, torch.ones_like(m), m))
    return beta * _plogp_ratio(p, log_p, log_m) + (1.0 - beta) * _plogp_ratio(q, log_q, log_m)


def kd_loss_ref(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    labels: Optional[Tensor] = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    normalizer: Optional[Union[float, Tensor]] = None,
    scale_by_t2: bool = True,
) -> Tensor:
    """Reference for :func:`distillkit.kd_loss` (same arguments, SPEC §1)."""
    acc = _acc_dtype(student_logits, teacher_logits)
    C = student_logits.shape[-1]
    z = student_logits.reshape(-1, C).to(acc)
    u = teacher_logits.reshape(-1, C).to(acc)
    log_q = torch.log_softmax(z / temperature, dim=-1)
    log_p = torch.log_softmax(u / temperature, dim=-1)
    soft = _soft_rows(log_q, log_p, divergence, beta)
    rows = (1.0 - hard_weight) * (temperature**2 if scale_by_t2 else 1.0) * soft
    keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if labels is not None:
        y = labels.reshape(-1)
        keep = y != ignore_index
        if hard_weight > 0:
            safe_y = torch.where(keep, y, torch.zeros_like(y))
            ce = -torch.log_softmax(z, dim=-1).gather(1, safe_y[:, None]).squeeze(1)
            rows = rows + hard_weight * ce
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    if weight is not None:
        rows = rows * weight.reshape(-1).to(acc)
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    total = rows.sum()
    if reduction == "sum":
        return total
    denom = normalizer if normalizer is not None else keep.sum().clamp(min=1)
    return total / denom
