"""Typed wrappers over torch.ops.distillkit.*, with their fake kernels and autograd.

The dispatcher picks the CPU or CUDA kernel; nothing here branches on device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["kd_loss_rows", "slam_loss_rows", "pointwise_distance_sum", "correlation_distance_rows",
           "sparse_kd_loss_rows"]

# Columns of the per-row statistics kd_loss_forward saves for its backward.
KD_STATS_COLS = 5


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def kd_loss_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor],
    temperature: float,
    divergence: str,
    beta: float,
    hard_weight: float,
    ignore_index: int,
    scale_by_t2: bool,
) -> Tensor:
    """Per-row KD loss of (N, C) logits, shape (N,), fp32 (fp64 for fp64 input).

    Rows whose label is ``ignore_index`` are 0. Differentiable w.r.t. both
    logits; see :func:`distillkit.kd_loss` for the math.
    """
    loss, _ = torch.ops.distillkit.kd_loss_forward(
        student_logits, teacher_logits, labels, float(temperature), divergence,
        float(beta), float(hard_weight), int(ignore_index), bool(scale_by_t2),
    )
    return loss


@torch.library.register_fake("distillkit::kd_loss_forward")
def _kd_loss_forward_fake(student_logits, teacher_logits, labels, temperature, divergence,
                          beta, hard_weight, ignore_index, scale_by_t2):
    torch._check(student_logits.dim() == 2, lambda: "student_logits must be 2-D")
    torch._check(teacher_logits.shape == student_logits.shape,
                 lambda: "teacher_logits must have the shape of student_logits")
    n = student_logits.shape[0]
    acc = _acc_dtype(student_logits)
    return (student_logits.new_empty((n,), dtype=acc),
            student_logits.new_empty((n, KD_STATS_COLS), dtype=acc))


@torch.library.register_fake("distillkit::kd_loss_backward")
def _kd_loss_backward_fake(grad_loss, student_logits, teacher_logits, labels, stats, temperature,
                           divergence, beta, hard_weight, ignore_index, scale_by_t2,
                           teacher_grad):
    grad_teacher = (torch.empty_like(teacher_logits) if teacher_grad
                    else teacher_logits.new_empty((0,)))
    return torch.empty_like(student_logits), grad_teacher


def _kd_loss_setup_context(ctx, inputs, output):
    student_logits, teacher_logits, labels, *scalars = inputs
    _, stats = output
    ctx.save_for_backward(student_logits, teacher_logits, labels, stats)
    ctx.scalars = scalars
    ctx.mark_non_differentiable(stats)


def _kd_loss_backward(ctx, grad_loss: Tensor, _grad_stats: Optional[Tensor]
                      ) -> Tuple[Optional[Tensor], ...]:
    student_logits, teacher_logits, labels, stats = ctx.saved_tensors
    teacher_grad = ctx.needs_input_grad[1]
    grad_s, grad_t = torch.ops.distillkit.kd_loss_backward(
        grad_loss.contiguous(), student_logits, teacher_logits, labels, stats, *ctx.scalars,
        teacher_grad,
    )
    return (grad_s if ctx.needs_input_grad[0] else None,
            grad_t if teacher_grad else None) + (None,) * (1 + len(ctx.scalars))  # labels, scalars


torch.library.register_autograd(
    "distillkit::kd_loss_forward", _kd_loss_backward, setup_context=_kd_loss_setup_context
)


# --- slam_loss ---------------------------------------------------------------------

SLAM_STATS_COLS = 6


def slam_loss_rows(student_logits: Tensor, teacher_probs: Tensor, alpha: Tensor, k: Tensor,
                   normalized: bool, hard: bool) -> Tensor:
    """Per-row SLaM loss of (N, C) inputs, shape (N,); see :func:`distillkit.slam_loss`."""
    loss, _ = torch.ops.distillkit.slam_loss_forward(student_logits, teacher_probs, alpha, k,
                                                     bool(normalized), bool(hard))
    return loss


@torch.library.register_fake("distillkit::slam_loss_forward")
def _slam_loss_forward_fake(student_logits, teacher_probs, alpha, k, normalized, hard):
    torch._check(teacher_probs.shape == student_logits.shape,
                 lambda: "teacher_probs must have the shape of student_logits")
    n = student_logits.shape[0]
    acc = _acc_dtype(student_logits)
    return (student_logits.new_empty((n,), dtype=acc),
            student_logits.new_empty((n, SLAM_STATS_COLS), dtype=acc))


@torch.library.register_fake("distillkit::slam_loss_backward")
def _slam_loss_backward_fake(grad_loss, student_logits, teacher_probs, alpha, k, stats,
                             normalized, hard):
    return torch.empty_like(student_logits)


def _slam_setup_context(ctx, inputs, output):
    student_logits, teacher_probs, alpha, k, normalized, hard = inputs
    ctx.save_for_backward(student_logits, teacher_probs, alpha, k, output[1])
    ctx.flags = (normalized, hard)
    ctx.mark_non_differentiable(output[1])


def _slam_backward(ctx, grad_loss, _grad_stats):
    student_logits, teacher_probs, alpha, k, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.distillkit.slam_loss_backward(
            grad_loss.contiguous(), student_logits, teacher_probs, alpha, k, stats, *ctx.flags)
    # Teacher probabilities, alpha and k are estimates, not trained here.
    return grad, None, None, None, None, None


torch.library.register_autograd("distillkit::slam_loss_forward", _slam_backward,
                                setup_context=_slam_setup_context)


# --- distances (KD-Zero) -----------------------------------------------------------

CORRELATION_STATS = 5


def pointwise_distance_sum(student: Tensor, teacher: Tensor, op: str) -> Tensor:
    """Σ over all elements of |s − t| ("l1"), (s − t)² ("l2") or smooth-L1 (β = 1), 0-d."""
    return torch.ops.distillkit.pointwise_distance_forward(student, teacher, op)


@torch.library.register_fake("distillkit::pointwise_distance_forward")
def _pointwise_forward_fake(student, teacher, op):
    torch._check(teacher.shape == student.shape, lambda: "teacher must have the shape of student")
    return student.new_empty((), dtype=_acc_dtype(student))


@torch.library.register_fake("distillkit::pointwise_distance_backward")
def _pointwise_backward_fake(grad, student, teacher, op, teacher_grad):
    return (torch.empty_like(student),
            torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,)))


def _pointwise_setup_context(ctx, inputs, output):
    student, teacher, op = inputs
    ctx.save_for_backward(student, teacher)
    ctx.op = op


def _pointwise_backward(ctx, grad):
    student, teacher = ctx.saved_tensors
    teacher_grad = ctx.needs_input_grad[1]
    gs, gt = torch.ops.distillkit.pointwise_distance_backward(grad, student, teacher, ctx.op,
                                                              teacher_grad)
    return gs, (gt if teacher_grad else None), None


torch.library.register_autograd("distillkit::pointwise_distance_forward", _pointwise_backward,
                                setup_context=_pointwise_setup_context)


def correlation_distance_rows(student: Tensor, teacher: Tensor, center: bool) -> Tensor:
    """1 − cos (center=False) or 1 − Pearson ρ (center=True) over dim 1 of (outer, D, inner)
    inputs; returns (outer, inner)."""
    rows, _ = torch.ops.distillkit.correlation_distance_forward(student, teacher, bool(center))
    return rows


@torch.library.register_fake("distillkit::correlation_distance_forward")
def _correlation_forward_fake(student, teacher, center):
    torch._check(student.dim() == 3, lambda: "student must be 3-D (outer, D, inner)")
    torch._check(teacher.shape == student.shape, lambda: "teacher must have the shape of student")
    outer, _, inner = student.shape
    acc = _acc_dtype(student)
    return (student.new_empty((outer, inner), dtype=acc),
            student.new_empty((outer, inner, CORRELATION_STATS), dtype=acc))


@torch.library.register_fake("distillkit::correlation_distance_backward")
def _correlation_backward_fake(grad_rows, student, teacher, stats, center, teacher_grad):
    return (torch.empty_like(student),
            torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,)))


def _correlation_setup_context(ctx, inputs, output):
    student, teacher, center = inputs
    ctx.save_for_backward(student, teacher, output[1])
    ctx.center = center
    ctx.mark_non_differentiable(output[1])


def _correlation_backward(ctx, grad_rows, _grad_stats):
    student, teacher, stats = ctx.saved_tensors
    teacher_grad = ctx.needs_input_grad[1]
    gs, gt = torch.ops.distillkit.correlation_distance_backward(
        grad_rows.contiguous(), student, teacher, stats, ctx.center, teacher_grad)
    return gs, (gt if teacher_grad else None), None


torch.library.register_autograd("distillkit::correlation_distance_forward", _correlation_backward,
                                setup_context=_correlation_setup_context)


# --- sparse_kd_loss ----------------------------------------------------------------

# Columns of the per-row statistics sparse_kd_loss_forward saves for its backward:
# [lse(z/T), teacher log normalizer, kept teacher mass].
SPARSE_KD_STATS_COLS = 3


def sparse_kd_loss_rows(student_logits: Tensor, teacher_indices: Tensor,
                        teacher_logprobs: Tensor, labels: Optional[Tensor], temperature: float,
                        renormalize: bool, ignore_index: int, scale_by_t2: bool,
                        check_duplicates: bool) -> Tensor:
    """Per-row KD loss of (N, C) student logits against a top-K teacher ((N, K) int64
    indices, -1 = padding, and log-probabilities), shape (N,), fp32 (fp64 for fp64 input).
    Dead rows (label == ignore_index, or no kept entry) are 0. Differentiable w.r.t. the
    student only; see :func:`distillkit.sparse_kd_loss` for the math."""
    loss, _ = torch.ops.distillkit.sparse_kd_loss_forward(
        student_logits, teacher_indices, teacher_logprobs, labels, float(temperature),
        bool(renormalize), int(ignore_index), bool(scale_by_t2), bool(check_duplicates),
    )
    return loss


@torch.library.register_fake("distillkit::sparse_kd_loss_forward")
def _sparse_kd_loss_forward_fake(student_logits, teacher_indices, teacher_logprobs, labels,
                                 temperature, renormalize, ignore_index, scale_by_t2,
                                 check_duplicates):
    torch._check(student_logits.dim() == 2, lambda: "student_logits must be 2-D")
    torch._check(teacher_indices.dim() == 2 and teacher_logprobs.shape == teacher_indices.shape,
                 lambda: "teacher_logprobs must have the shape of teacher_indices (N, K)")
    torch._check(teacher_indices.shape[0] == student_logits.shape[0],
                 lambda: "teacher_indices must have as many rows as student_logits")
    n = student_logits.shape[0]
    acc = _acc_dtype(student_logits)
    return (student_logits.new_empty((n,), dtype=acc),
            student_logits.new_empty((n, SPARSE_KD_STATS_COLS), dtype=acc))


@torch.library.register_fake("distillkit::sparse_kd_loss_backward")
def _sparse_kd_loss_backward_fake(grad_loss, student_logits, teacher_indices, teacher_logprobs,
                                  labels, stats, temperature, renormalize, ignore_index,
                                  scale_by_t2):
    return torch.empty_like(student_logits)


def _sparse_kd_setup_context(ctx, inputs, output):
    student_logits, teacher_indices, teacher_logprobs, labels, *scalars = inputs
    ctx.save_for_backward(student_logits, teacher_indices, teacher_logprobs, labels, output[1])
    ctx.scalars = scalars[:-1]  # check_duplicates: the forward already checked
    ctx.mark_non_differentiable(output[1])


def _sparse_kd_backward(ctx, grad_loss, _grad_stats):
    student_logits, teacher_indices, teacher_logprobs, labels, stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.distillkit.sparse_kd_loss_backward(
            grad_loss.contiguous(), student_logits, teacher_indices, teacher_logprobs, labels,
            stats, *ctx.scalars)
    # The cached teacher is data: no gradient to its log-probabilities.
    return (grad,) + (None,) * 8


torch.library.register_autograd("distillkit::sparse_kd_loss_forward", _sparse_kd_backward,
                                setup_context=_sparse_kd_setup_context)
