"""User-facing loss functions (docstrings carry the math, shapes and conventions)."""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from .ops import kd_loss_rows

__all__ = ["kd_loss"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))} (got {value!r})")


def _check_normalizer(normalizer, reduction: str) -> None:
    if normalizer is None:
        return
    if reduction != "mean":
        raise ValueError(f"normalizer is only valid with reduction='mean' (got reduction={reduction!r})")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 0-d tensor (got shape {tuple(normalizer.shape)})")
        # Value check only in eager mode: under torch.compile it would be a
        # data-dependent branch (a graph break); there the caller vouches for it.
        if not torch.compiler.is_compiling() and not bool(normalizer > 0):
            raise ValueError(f"normalizer must be > 0 (got {normalizer.item()})")
    elif not isinstance(normalizer, numbers.Real) or not normalizer > 0:
        raise ValueError(f"normalizer must be a positive number or 0-d tensor (got {normalizer!r})")


def kd_loss(
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
    r"""Fused soft-label knowledge-distillation loss (SPEC §1).

    Per row, with teacher :math:`p = \mathrm{softmax}(u/T)` and student
    :math:`q = \mathrm{softmax}(z/T)`:

    * ``"forward_kl"``: :math:`\mathrm{KL}(p\|q) = \sum p(\log p - \log q)` (Hinton KD);
    * ``"reverse_kl"``: :math:`\mathrm{KL}(q\|p)`;
    * ``"jsd"``: generalized JSD :math:`\beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m)`,
      :math:`m = \beta p + (1-\beta) q`. ``beta=0`` and ``beta=1`` are defined as forward and
      reverse KL (TRL GKD / Liger convention), so the loss is discontinuous at the ends:
      JSD(0.01) is about 100x smaller than JSD(0).

    The row loss is ``(1 - hard_weight) * s * soft + hard_weight * CE(z, labels)`` with
    ``s = T**2`` if ``scale_by_t2`` (Hinton) else 1, and the cross entropy taken at T = 1.
    Rows whose label is ``ignore_index`` contribute nothing to either term and leave the
    ``mean`` denominator. ``weight`` multiplies each row's loss.

    Args:
        student_logits: (..., C) student logits z; each leading position is a row
            (a token of a (B, S, V) batch is a row).
        teacher_logits: (..., C) teacher logits u, same shape. Gradients flow to it
            when it requires grad (mutual / online distillation).
        temperature: T > 0 (finite).
        divergence: "forward_kl" | "reverse_kl" | "jsd".
        beta: JSD mixture weight in [0, 1].
        labels: optional (...) int64 class indices for the hard term and row masking.
        hard_weight: alpha in [0, 1], the weight of the hard cross-entropy term.
        ignore_index: label value marking rows to skip.
        weight: optional (...) per-row weights (weighted distillation).
        reduction: "mean" (sum of weighted rows / number of non-ignored rows, not / sum of
            weights; equals PyTorch's ``batchmean`` for 2-D input, the per-token mean for
            (B, S, V)), "sum", or "none" (per-row losses with the leading shape).
        normalizer: replaces the mean's denominator (e.g. the token count across
            gradient-accumulation steps and ranks); a positive number or 0-d tensor,
            only with reduction="mean".
        scale_by_t2: multiply the soft term by T**2.

    Returns:
        The loss: fp32 for fp32/bf16/fp16 inputs (fp64 if either input is fp64). An empty
        batch gives 0 for "mean" and "sum" with a zero gradient.

    Conventions: mixed student/teacher dtypes are fine (accumulation is fp32); −inf
    logits are valid (padded vocabulary: teacher −inf entries contribute nothing; a
    student −inf where the teacher has mass gives +inf for forward KL; an all −inf row
    gives NaN, as the reference does). Under ``torch.autocast`` the op runs on its inputs
    as given (bf16/fp16 logits stay bf16/fp16) and still accumulates in fp32. The
    result is deterministic: every row is reduced in a fixed order on CPU and CUDA, and
    the final sum uses no atomics.
    """
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_normalizer(normalizer, reduction)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (..., C)")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            "teacher_logits must have the shape of student_logits "
            f"(got {tuple(teacher_logits.shape)} and {tuple(student_logits.shape)})"
        )
    lead = student_logits.shape[:-1]
    num_classes = student_logits.shape[-1]
    z = student_logits.reshape(-1, num_classes)
    u = teacher_logits.reshape(-1, num_classes)
    # fp64 in either input means an fp64 computation (the kernels pair fp64 with fp64).
    if (z.dtype == torch.float64) != (u.dtype == torch.float64):
        z, u = z.double(), u.double()
    y = None
    if labels is not None:
        if labels.shape != lead:
            raise ValueError(f"labels must have shape {tuple(lead)} (got {tuple(labels.shape)})")
        y = labels.reshape(-1)
    rows = kd_loss_rows(z, u, y, temperature, divergence, beta, hard_weight, ignore_index,
                        scale_by_t2)
    if weight is not None:
        if weight.shape != lead:
            raise ValueError(f"weight must have shape {tuple(lead)} (got {tuple(weight.shape)})")
        rows = rows * weight.reshape(-1).to(rows.dtype)
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        normalizer = (y != ignore_index).sum().clamp(min=1) if y is not None else max(rows.numel(), 1)
    return total / normalizer
