"""Fused linear KD against a cached top-K teacher (docs/math.md §4.2): the student's
lm-head matmul and sparse_kd_loss, chunked over rows.

Offline LLM distillation reads the teacher from a cache (:mod:`distillkit.sparse_cache`:
K classes, their log-probabilities and the tail mass per token), so the teacher costs
``K`` numbers per token; what remains is the student's own ``N × V`` logits. As in
:func:`distillkit.fused_linear_kd_loss`, at most ``chunk_rows × V`` of them exist at a
time: per chunk, ``z = head(h Wᵀ + b)``, the sparse_kd_loss forward, its gradient ``dz``
(one kernel, scaled by the reduction's per-row factor), then ``dh = dz W``,
``dW += dzᵀ h``, ``db += Σ dz``. The gradients are formed during the forward call and
only scaled by ``grad_output`` in backward.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..ops import (reduction_row_scale, reject_functorch, sparse_kd_loss_backward,
                   sparse_kd_loss_forward)
from ..ops.options import LogitHead, SparseKDOptions
from .functional import (check_classes, check_normalizer, check_topk_teacher, flat_labels,
                         live_topk_rows, row_weight)
from .fused_linear import (_IDENTITY, _autocast_operands, _full, chunked_head_gradients,
                           scaled_saved_gradients)

__all__ = ["fused_linear_sparse_kd_loss"]


class _FusedLinearSparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, indices, logprobs, tail, labels, row_scale, chunk_rows,
                options: SparseKDOptions, head: LogitHead):
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        anchors = (h, weight)
        h, weight, bias = _autocast_operands(h.device.type, h, weight, bias)
        total = row_scale.new_zeros(())

        def chunk_loss(rows: slice, z: Tensor, need_grad: bool) -> Optional[Tensor]:
            nonlocal total
            idx, lp = indices[rows], logprobs[rows]
            t = tail[rows] if tail is not None else None
            y = labels[rows] if labels is not None else None
            loss, stats = sparse_kd_loss_forward(z, idx, lp, y, options, t)
            scale = row_scale[rows].contiguous()
            total += (loss * scale).sum()
            if not need_grad:
                return None
            return sparse_kd_loss_backward(scale, z, idx, lp, y, stats, options, t)

        chunked_head_gradients(ctx, h, weight, bias, head, chunk_rows, chunk_loss, anchors)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        return scaled_saved_gradients(ctx, grad_output,
                                      "fused_linear_sparse_kd_loss") + (None,) * 8


def fused_linear_sparse_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail_logprob: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    student_head: Optional[LogitHead] = None,
    chunk_rows: int = 1024,
    labels: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    normalizer: Optional[Union[float, Tensor]] = None,
    options: Optional[SparseKDOptions] = None,
    **fields,
) -> Tensor:
    r"""``sparse_kd_loss(head(student_hidden @ student_weightᵀ + student_bias),
    teacher_indices, teacher_logprobs, teacher_tail_logprob=..., ...)`` without
    materializing the (N, V) student logits.

    Per row (token) the teacher is its cached top K (classes :math:`I_k`,
    log-probabilities :math:`\ell_k` at temperature T) and, optionally, the log of its
    remaining mass :math:`\lambda = \log(1 - \sum_k e^{\ell_k})`. With the student's
    :math:`q = \mathrm{softmax}(z/T)`, :math:`z = \mathrm{head}(W h + b)`, and the tail
    the row compares the complete K + 1 bucket distributions

    .. math::
        P = (e^{\ell_1}, \dots, e^{\ell_K}, e^{\lambda}), \qquad
        Q = (q_{I_1}, \dots, q_{I_K}, 1 - \textstyle\sum_k q_{I_k}),

    row :math:`= s\,D(P, Q)` for ``divergence`` forward KL :math:`\sum_b P_b \log(P_b/Q_b)`,
    reverse KL or JSD(β), :math:`s = T^2` if ``scale_by_t2``; without the tail, forward
    KL over the kept classes only, as :func:`distillkit.sparse_kd_loss`
    (docs/math.md §4, §4.1). The gradient w.r.t. z is
    :math:`\frac{s}{T} q_j (G_{b(j)} - \sum_b G_b Q_b)`, :math:`G_b = \partial D/\partial Q_b`
    and :math:`b(j)` the bucket of class j (its own, or the tail), then through the head
    and the matmul.

    Args:
        student_hidden: (..., H) final hidden states h of the student, one row per token.
        student_weight: (V, H) lm-head weight W; ``student_bias`` optional (V,). Either
            may be an FSDP2 DTensor (gathered once per call, as in
            :func:`distillkit.fused_linear_kd_loss`).
        teacher_indices: (..., K) int64/int32 cached classes, -1 = padding (a row whose K
            entries are all -1 is dead: loss 0, left out of the mean).
        teacher_logprobs: (..., K) their log-probabilities at T (fp16/fp32 caches).
        teacher_tail_logprob: optional (...) log tail mass (the cache's
            ``teacher_tail_logprob``); needed for ``divergence="reverse_kl"`` / ``"jsd"``.
        student_head: :class:`~distillkit.ops.options.LogitHead`, the student's logit scale
            and soft cap, applied to each chunk's logits (default: none).
        chunk_rows: rows per chunk; peak extra memory is O(chunk_rows × V).
        labels, weight, normalizer, options, **fields: as in
            :func:`distillkit.sparse_kd_loss` (:class:`~distillkit.SparseKDOptions`);
            ``reduction`` is ``"mean"`` (over live rows) or ``"sum"``.

    Returns:
        The reduced loss, a 0-d fp32 tensor (fp64 for fp64 hidden states). Gradients flow
        to the hidden states, weight and bias; the cache gets none. Logits are formed in
        the inputs' dtype (bf16 matmuls accumulate in fp32 and round once); the loss runs
        in fp32.
    """
    opts = SparseKDOptions.resolve(options, **fields)
    if opts.reduction == "none":
        raise ValueError("reduction must be 'mean' or 'sum' for fused_linear_sparse_kd_loss "
                         "(got 'none'; use sparse_kd_loss for per-row losses)")
    check_normalizer(normalizer, opts.reduction, student_hidden.device)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int (got {chunk_rows!r})")
    if student_head is not None and not isinstance(student_head, LogitHead):
        raise ValueError(f"student_head must be a LogitHead or None "
                         f"(got {type(student_head).__name__})")
    hidden = student_hidden.shape[-1]
    lead = student_hidden.shape[:-1]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden:
        raise ValueError(f"student_weight must have shape (V, {hidden}) "
                         f"(got {tuple(student_weight.shape)})")
    check_classes("student_hidden", student_hidden, what="feature")
    check_classes("student_weight", student_weight, 0, "row (class)")
    num_classes = student_weight.shape[0]
    if student_bias is not None and student_bias.shape != (num_classes,):
        raise ValueError(f"student_bias must have shape ({num_classes},) "
                         f"(got {tuple(student_bias.shape)})")
    check_topk_teacher(teacher_indices, teacher_logprobs, teacher_tail_logprob, lead,
                       "student_hidden's device", student_hidden.device, num_classes, opts)
    h = student_hidden.reshape(-1, hidden)
    k = teacher_indices.shape[-1]
    idx = teacher_indices.reshape(-1, k).long()
    lp = teacher_logprobs.reshape(-1, k).detach()
    # The kernels pair fp64 logits with fp64 log-probabilities, and nothing else with them.
    if (h.dtype == torch.float64) != (lp.dtype == torch.float64):
        lp = lp.double() if h.dtype == torch.float64 else lp.float()
    tail = (teacher_tail_logprob.reshape(-1).detach().to(lp.dtype)
            if teacher_tail_logprob is not None else None)
    y = flat_labels(labels, lead, h.device)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    # The reduction's derivative w.r.t. each row's loss, known before the loop; a dead
    # row (ignored label or no kept class) has loss and gradient 0 from the kernel.
    denominator = None
    if opts.reduction == "mean":
        denominator = (normalizer if normalizer is not None
                       else live_topk_rows(idx, y, opts.ignore_index).clamp(min=1).to(acc))
    row_scale = reduction_row_scale(row_weight(weight, lead, h.device, h.shape[0]), denominator,
                                    h.shape[0], acc, h.device)
    reject_functorch("fused_linear_sparse_kd_loss")
    return _FusedLinearSparseKD.apply(h, _full(student_weight), _full(student_bias), idx, lp,
                                      tail, y, row_scale, chunk_rows, opts,
                                      student_head if student_head is not None else _IDENTITY)
