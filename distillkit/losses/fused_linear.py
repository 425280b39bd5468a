"""Fused linear KD (docs/math.md §2): the lm-head matmul and kd_loss, chunked over rows.

LLM distillation runs out of memory on logits, not on weights: N tokens × a 128k
vocabulary, for student and teacher. Here at most ``chunk_rows × C`` logits of each
exist at a time. Per chunk: ``z = h Wᵀ (+ b)``, the fused kd_loss forward, its gradient
``dz`` (one kernel, scaled by the reduction's per-row factor), then ``dh = dz W``,
``dW += dzᵀ h``, ``db += Σ dz``. The gradients are computed during the forward pass and
only scaled by ``grad_output`` in backward, so the whole step costs the same three
matmuls as the unfused computation.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..ops import RaiseOnBackward, kd_loss_backward, kd_loss_forward, reject_functorch
from ..ops.options import KDOptions
from .functional import check_normalizer, flat_labels, mean_denominator

__all__ = ["fused_linear_kd_loss"]


def _linear(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, teacher_logits, teacher_h, teacher_weight, teacher_bias,
                labels, row_scale, chunk_rows, options: KDOptions):
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        # Low-precision weights accumulate their gradient in fp32 across chunks.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype != torch.float64
                             else torch.float64, device=weight.device) if need_w else None
        grad_b = torch.zeros_like(grad_w[:, 0] if grad_w is not None else bias, dtype=grad_w.dtype
                                  if grad_w is not None else torch.float32) if need_b else None
        total = row_scale.new_zeros(())
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            h_c = h[rows]
            z = _linear(h_c, weight, bias)
            u = (teacher_logits[rows] if teacher_logits is not None
                 else _linear(teacher_h[rows], teacher_weight, teacher_bias))
            y = labels[rows] if labels is not None else None
            loss, stats = kd_loss_forward(z, u, y, options)
            scale = row_scale[rows].contiguous()
            total += (loss * scale).sum()
            if not (need_h or need_w or need_b):
                continue
            dz, _ = kd_loss_backward(scale, z, u, y, stats, options, False)
            if need_h:
                grad_h[rows] = dz @ weight
            if need_w:
                grad_w += (dz.t() @ h_c).to(grad_w.dtype)
            if need_b:
                grad_b += dz.sum(0, dtype=grad_b.dtype)
        # h and weight only anchor a create_graph=True gradient (see backward); saved
        # inputs cost no memory.
        ctx.save_for_backward(grad_h, grad_w, grad_b, h, weight)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b, h, weight = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        g = grad_output
        out_h = grad_h * g.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * g).to(w_dtype) if grad_w is not None else None
        out_b = (grad_b * g).to(b_dtype) if grad_b is not None else None
        if torch.is_grad_enabled():
            # create_graph=True: the gradients were formed in the forward and do not
            # depend on h or W here; a loss on them must fail by name, not miss a term.
            out_h, out_w, out_b = (RaiseOnBackward.apply(t, h, weight, "fused_linear_kd_loss")
                                   if t is not None else None for t in (out_h, out_w, out_b))
        return out_h, out_w, out_b, None, None, None, None, None, None, None, None


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_logits: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    chunk_rows: int = 1024,
    labels: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    normalizer: Optional[Union[float, Tensor]] = None,
    options: Optional[KDOptions] = None,
    **fields,
) -> Tensor:
    r"""``kd_loss(student_hidden @ student_weightᵀ + student_bias, teacher_logits, ...)``
    without materializing the (N, C) logits.

    Args:
        student_hidden: (..., H) final hidden states h of the student (one row per token).
        student_weight: (C, H) student lm-head weight W; ``student_bias`` optional (C,).
        teacher_logits: (..., C) teacher logits, or ``None`` with ``teacher_hidden``
            (..., H_t) and ``teacher_weight`` (C, H_t) (+ ``teacher_bias``): then the
            teacher's logits are also formed one chunk at a time.
        chunk_rows: rows per chunk; peak extra memory is O(chunk_rows × C).
        labels, weight, normalizer, options, **fields: those of :func:`distillkit.kd_loss`,
        with the same meaning; ``reduction`` is ``"mean"`` or ``"sum"`` (per-row losses would need the
        logits again in backward — use ``kd_loss`` for ``"none"``).

    Gradients flow to the student's hidden states, weight and bias; the teacher is
    treated as frozen (no gradient). The gradients are formed chunk by chunk during the
    forward call, so calling it under ``torch.no_grad()`` (evaluation) skips that work.
    Logits are formed in the inputs' dtype (bf16 matmuls accumulate in fp32 and round
    once); the loss then runs in fp32 as in ``kd_loss``.
    """
    opts = KDOptions.resolve(options, **fields)
    if opts.reduction == "none":
        raise ValueError("reduction must be 'mean' or 'sum' for fused_linear_kd_loss (got 'none'; "
                         "use kd_loss for per-row losses)")
    check_normalizer(normalizer, opts.reduction)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int (got {chunk_rows!r})")
    hidden = student_hidden.shape[-1]
    lead = student_hidden.shape[:-1]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden:
        raise ValueError(f"student_weight must have shape (C, {hidden}) "
                         f"(got {tuple(student_weight.shape)})")
    num_classes = student_weight.shape[0]
    if student_bias is not None and student_bias.shape != (num_classes,):
        raise ValueError(f"student_bias must have shape ({num_classes},) "
                         f"(got {tuple(student_bias.shape)})")
    if (teacher_logits is None) == (teacher_hidden is None):
        raise ValueError("pass exactly one of teacher_logits and teacher_hidden (+ teacher_weight)")
    h = student_hidden.reshape(-1, hidden)
    t_logits = t_hidden = None
    if teacher_logits is not None:
        if teacher_logits.shape != lead + (num_classes,):
            raise ValueError(f"teacher_logits must have shape {tuple(lead) + (num_classes,)} "
                             f"(got {tuple(teacher_logits.shape)})")
        t_logits = teacher_logits.reshape(-1, num_classes).detach()
    else:
        if teacher_weight is None or teacher_weight.dim() != 2 or \
                teacher_weight.shape[0] != num_classes or teacher_hidden.shape[:-1] != lead or \
                teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError("teacher_hidden (..., H_t) needs teacher_weight (C, H_t) with the "
                             "student's C and leading shape")
        t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        teacher_weight = teacher_weight.detach()
        teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
    y = flat_labels(labels, lead)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    # The reduction's derivative w.r.t. each row's loss, known before the loop.
    row_scale = torch.ones(h.shape[0], dtype=acc, device=h.device)
    if weight is not None:
        if weight.shape != lead:
            raise ValueError(f"weight must have shape {tuple(lead)} (got {tuple(weight.shape)})")
        row_scale = row_scale * weight.reshape(-1).to(acc)
    if opts.reduction == "mean":
        row_scale = row_scale / mean_denominator(y, h.shape[0], opts.ignore_index, normalizer)
    reject_functorch("fused_linear_kd_loss")
    return _FusedLinearKD.apply(h, student_weight, student_bias, t_logits, t_hidden,
                                teacher_weight, teacher_bias, y, row_scale, chunk_rows, opts)
