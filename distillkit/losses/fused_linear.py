"""Fused linear KD (docs/math.md §2): the lm-head matmul and kd_loss, chunked over rows.

LLM distillation runs out of memory on logits, not on weights: N tokens × a 128k
vocabulary, for student and teacher. Here at most ``chunk_rows × C`` logits of each
exist at a time. Per chunk: ``z = h Wᵀ (+ b)``, the fused kd_loss forward, its gradient
``dz`` (one kernel, scaled by the reduction's per-row factor), then ``dh = dz W``,
``dW += dzᵀ h`` (summed in fp32 by the GEMM itself for bf16 / fp16 weights),
``db += Σ dz``. The gradients are computed during the forward pass and
only scaled by ``grad_output`` in backward, so the whole step costs the same three
matmuls as the unfused computation. A model's own logit transform (:class:`LogitHead`:
Cohere's scale, Gemma's soft cap) is applied to each chunk before the loss, and its
derivative to ``dz`` before the gradient matmuls (docs/math.md §2.1).

An FSDP2-sharded head (``fully_shard`` makes ``lm_head.weight`` a DTensor sharded on
dim 0) is gathered once per call, as FSDP's own forward would; see :func:`_full`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial

from ..ops import (KD_STATS, RaiseOnBackward, empty_cached, kd_loss_forward,
                   kd_loss_forward_grad, matmul_into, reduction_row_scale, reject_functorch,
                   saved_buffer_is_last_read)
from ..ops.options import KDOptions, LogitHead
from .functional import (check_classes, check_normalizer, flat_labels, kd_denominator,
                         row_weight)

__all__ = ["fused_linear_kd_loss"]

_IDENTITY = LogitHead()


def _head_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], head: LogitHead,
                 need_slope: bool, buffer: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """A chunk's final logits ``head(h Wᵀ + b)`` and, when ``need_slope`` and the soft
    cap is on, ``tanh`` of the capped argument (the backward's slope is
    ``scale·(1 − tanh²)``). The matmul writes into the leading rows of ``buffer``
    (resident, reused chunk after chunk), the head transform runs in place there, in
    its dtype, in the order of the models' own forward: ``·scale``, ``/cap``, ``tanh``,
    ``·cap``."""
    z = buffer[:h.shape[0]]
    if bias is None:
        torch.mm(h, weight.t(), out=z)
    else:
        torch.addmm(bias, h, weight.t(), out=z)
    if head.scale != 1.0:
        z.mul_(head.scale)
    if head.softcap is None:
        return z, None
    t = z.div_(head.softcap).tanh_()
    if not need_slope:
        return t.mul_(head.softcap), None
    return t * head.softcap, t


def _head_backward(dz: Tensor, tanh: Optional[Tensor], head: LogitHead) -> Tensor:
    """dz w.r.t. the head's input from dz w.r.t. its output (in place on both)."""
    if tanh is not None:
        dz.mul_(tanh.square_().neg_().add_(1.0))
    return dz.mul_(head.scale) if head.scale != 1.0 else dz


class _MeanOverMesh(torch.autograd.Function):
    """Identity forward; backward divides the gradient by the mesh size, so that the
    sum-reduce-scatter after it averages the ranks' gradients."""

    @staticmethod
    def forward(ctx, t, ranks):
        ctx.ranks = ranks
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.ranks, None


def _full(param: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor head parameter as one plain tensor, gathered once for the whole call.

    Gradient: each rank's is a partial sum over its own rows, so it is declared
    ``Partial`` and DTensor's own backward reduce-scatters it into the parameter's
    shards. It is first divided by the mesh size: FSDP2 averages its other gradients
    over the data-parallel ranks (ReduceOp.AVG, or SUM and a divide where the backend
    has no AVG / PREMUL_SUM, as gloo), and this one lands on the sharded parameter
    directly, outside FSDP's reduce-scatter, so it must be the same mean. Equal-sized
    local batches then give one process's gradient of the global batch.

    Why gather rather than run :func:`vocab_parallel_kd_loss` on the vocabulary shards:
    under FSDP every rank holds *different rows* and the weight is sharded only for
    storage, while vocab-parallel needs the same rows on every rank; it would have to
    all-gather every rank's hidden states, teacher inputs and labels and then compute R
    times as many rows per rank. Gathering W (C × H, what FSDP's own forward gathers)
    costs one all-gather forward and one reduce-scatter backward. Under tensor
    parallelism, where rows are replicated, call ``vocab_parallel_kd_loss`` on the
    local logits instead.
    """
    if not isinstance(param, DTensor):
        return param
    if not param.requires_grad:
        return param.full_tensor()
    mesh = param.device_mesh
    full = param.full_tensor(grad_placements=[Partial()] * mesh.ndim)
    return _MeanOverMesh.apply(full, mesh.size())


def _entropy_sum(z: Tensor, stats: Tensor, y: Optional[Tensor], options: KDOptions) -> Tensor:
    """Σ over the chunk's live rows of the student's entropy at temperature T,
    ``H(q) = lse(z/T) − Σ q z/T``, the lse read from the forward's stats (a metric for
    trainers that log it: one more pass over the chunk, no gradient)."""
    lse = stats[:, KD_STATS.lse_student]
    x = z.to(lse.dtype) / options.temperature
    q = torch.exp(x - lse[:, None])
    rows = lse - torch.where(q > 0, q * x, torch.zeros_like(q)).sum(1)
    if y is not None:
        rows = torch.where(y != options.ignore_index, rows, torch.zeros_like(rows))
    return rows.sum()


def _autocast_operands(device: str, *operands: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The matmul operands as autocast would give them to each matmul (floating ones but
    fp64 in the autocast dtype), cast once for the whole call: the loop then runs with
    autocast off, so that its matmuls can write in place (autocast refuses ``out=``)."""
    if not torch.is_autocast_enabled(device):
        return operands
    low = torch.get_autocast_dtype(device)
    return tuple(t.to(low) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in operands)


def chunked_head_gradients(ctx, h: Tensor, weight: Tensor, bias: Optional[Tensor],
                           head: LogitHead, chunk_rows: int,
                           chunk_loss: Callable[[slice, Tensor, bool], Optional[Tensor]],
                           anchors: Tuple[Tensor, Tensor]) -> None:
    """The student side of a fused lm head + loss, shared by the fused losses' autograd
    Functions: per chunk of ``chunk_rows`` rows, the logits ``z = head(h_c Wᵀ + b)``
    (in a buffer reused chunk after chunk and, from the output cache, call after call),
    ``dz = chunk_loss(rows, z, need_grad)`` (the loss's gradient w.r.t. z, already
    scaled by the reduction; the loss itself is the caller's to sum; None when no
    gradient is needed), then through the head, ``dh = dz W`` into grad_h's rows,
    ``dW += dzᵀ h_c`` and ``db += Σ dz``. The gradients (fp32 for low-precision weights:
    each chunk's product is added by the GEMM itself, ``matmul_into``, never rounded to
    bf16) are saved on ``ctx`` for :func:`scaled_saved_gradients`, with ``anchors``, the
    caller's own hidden states and weight (a create_graph=True gradient's graph edges;
    saved inputs cost no memory). ``h``, ``weight`` and ``bias`` are the autocast-cast
    operands; the loop runs with autocast off so that its matmuls can write in place."""
    n = h.shape[0]
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[2]
    need_grad = need_h or need_w or need_b
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_h = torch.empty_like(h) if need_h else None
    # The first chunk writes grad_w, so it needs no zero fill.
    grad_w = empty_cached(weight, weight.shape, acc) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    z_buf = empty_cached(h, (min(chunk_rows, n), weight.shape[0]), h.dtype)
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            h_c = h[rows]
            z, tanh = _head_logits(h_c, weight, bias, head, need_grad, z_buf)
            dz = chunk_loss(rows, z, need_grad)
            if dz is None:
                continue
            dz = _head_backward(dz, tanh, head)
            # BLAS layouts as they stand, no copies: dz W (dz row-major), dzᵀ h
            # (dzᵀ a transposed view), into grad_h's rows and grad_w in place.
            if need_h:
                matmul_into(grad_h[rows], dz, weight, False)
            if need_w:
                matmul_into(grad_w, dz.t(), h_c, start > 0)
            if need_b:
                grad_b += dz.sum(0, dtype=grad_b.dtype)
            # Freed before the next chunk's backward allocates its dz, which then reuses
            # this block: else two chunks' dz were alive at once (+1 chunk of peak memory).
            del dz
    if need_w and n == 0:
        grad_w.zero_()  # no chunk wrote it
    ctx.save_for_backward(grad_h, grad_w, grad_b, *anchors)


def scaled_saved_gradients(ctx, grad_output: Tensor, op: str) -> Tuple[Optional[Tensor], ...]:
    """The backward of a fused head + loss: the gradients :func:`chunked_head_gradients`
    formed in the forward times ``grad_output``, in the parameters' dtypes
    (``ctx.dtypes``: hidden, weight, bias)."""
    grad_h, grad_w, grad_b, *anchors = ctx.saved_tensors

    def scaled(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
        if t is None:
            return None
        if not saved_buffer_is_last_read(t):
            # retain_graph=True (or a traced backward): the saved gradient stays as it is.
            return (t * grad_output).to(dtype)
        # The last read of this call's own buffer: in place, then (for a narrower
        # parameter dtype) one conversion pass. Out of place, a (C, H) product would be
        # one more (C, H) tensor, and a mixed-dtype mul writes a full temporary in t's
        # dtype first (TensorIterator's CPU path): 2.5x the time of this, page faults
        # included (benchmarks/results/fused_linear_profile.md).
        t.mul_(grad_output)
        return t if t.dtype == dtype else empty_cached(t, t.shape, dtype).copy_(t)

    outs = tuple(scaled(t, dtype) for t, dtype in zip((grad_h, grad_w, grad_b), ctx.dtypes))
    if torch.is_grad_enabled():
        # create_graph=True: the gradients were formed in the forward and do not depend
        # on h or W here; a loss on them must fail by name, not miss a term.
        outs = tuple(RaiseOnBackward.apply(t, *anchors, op) if t is not None else None
                     for t in outs)
    return outs


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, teacher_logits, teacher_h, teacher_weight, teacher_bias,
                labels, row_scale, chunk_rows, options: KDOptions, heads, entropy):
        student_head, teacher_head = heads
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        anchors = (h, weight)
        h, weight, bias, teacher_h, teacher_weight, teacher_bias = _autocast_operands(
            h.device.type, h, weight, bias, teacher_h, teacher_weight, teacher_bias)
        total = row_scale.new_zeros(())
        entropy_sum = row_scale.new_zeros(()) if entropy else None
        u_buf = (empty_cached(teacher_h, (min(chunk_rows, h.shape[0]), teacher_weight.shape[0]),
                              teacher_h.dtype) if teacher_h is not None else None)

        def chunk_loss(rows: slice, z: Tensor, need_grad: bool) -> Optional[Tensor]:
            nonlocal total, entropy_sum
            u = (teacher_logits[rows] if teacher_logits is not None
                 else _head_logits(teacher_h[rows], teacher_weight, teacher_bias,
                                   teacher_head, False, u_buf)[0])
            y = labels[rows] if labels is not None else None
            scale = row_scale[rows].contiguous()
            # With a gradient, one pass over the chunk: the loss and its final gradient
            # (scaled by the reduction's per-row factors) while each row is in cache.
            if need_grad:
                loss, stats, dz, _ = kd_loss_forward_grad(z, u, y, options, grad_scale=scale)
            else:
                loss, stats = kd_loss_forward(z, u, y, options)
                dz = None
            total += (loss * scale).sum()
            if entropy:
                entropy_sum += _entropy_sum(z, stats, y, options)
            return dz

        chunked_head_gradients(ctx, h, weight, bias, student_head, chunk_rows, chunk_loss,
                               anchors)
        if entropy:
            ctx.mark_non_differentiable(entropy_sum)
            return total, entropy_sum
        return total

    @staticmethod
    def backward(ctx, grad_output, _grad_entropy=None):
        return scaled_saved_gradients(ctx, grad_output, "fused_linear_kd_loss") + (None,) * 10


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_logits: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    student_head: Optional[LogitHead] = None,
    teacher_head: Optional[LogitHead] = None,
    chunk_rows: int = 1024,
    labels: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    normalizer: Optional[Union[float, Tensor]] = None,
    options: Optional[KDOptions] = None,
    **fields,
) -> Tensor:
    r"""``kd_loss(head_s(student_hidden @ student_weightᵀ + student_bias), teacher_logits, ...)``
    without materializing the (N, C) logits.

    Args:
        student_hidden: (..., H) final hidden states h of the student (one row per token).
        student_weight: (C, H) student lm-head weight W; ``student_bias`` optional (C,).
            Either may be an FSDP2 DTensor (``fully_shard``): it is gathered once per
            call and its gradient reduce-scattered back as the mean over the mesh, the
            reduction FSDP2 gives its other parameters (see :func:`_full`).
        teacher_logits: (..., C) teacher logits (its final logits: any soft cap or scale
            already applied), or ``None`` with ``teacher_hidden`` (..., H_t) and
            ``teacher_weight`` (C, H_t) (+ ``teacher_bias``; DTensors allowed): then the
            teacher's logits are also formed one chunk at a time. With
            ``teacher_vocab="truncate"`` the teacher may have C_t > C classes (padding
            rows): only its first C logits / weight rows are read, as views.
        student_head, teacher_head: :class:`~distillkit.ops.options.LogitHead`, each
            model's logit scale and final soft cap, applied to its chunk of logits where
            its own forward applies them (after the lm head, before the temperature);
            ``LogitHead.from_config(model.config)`` reads them from a transformers
            config. Default: none. ``teacher_head`` needs ``teacher_hidden``.
        chunk_rows: rows per chunk; peak extra memory is O(chunk_rows × C).
        labels, weight, normalizer, options, **fields: those of :func:`distillkit.kd_loss`,
        with the same meaning; ``reduction`` is ``"mean"`` or ``"sum"`` (per-row losses would need the
        logits again in backward — use ``kd_loss`` for ``"none"``).

    Gradients flow to the student's hidden states, weight and bias (through the soft
    cap: ∂(head output)/∂(matmul output) = scale·(1 − tanh²)); the teacher is treated as
    frozen (no gradient). The gradients are formed chunk by chunk during the forward
    call, so calling it under ``torch.no_grad()`` (evaluation) skips that work. Logits
    are formed in the inputs' dtype (bf16 matmuls accumulate in fp32 and round once; the
    head transform runs in that dtype, as in the model); the loss then runs in fp32 as
    in ``kd_loss``.
    """
    return _fused_linear_kd(student_hidden, student_weight, teacher_logits, student_bias,
                            teacher_hidden, teacher_weight, teacher_bias, student_head,
                            teacher_head, chunk_rows, labels, weight, normalizer,
                            KDOptions.resolve(options, **fields), entropy=False)


def _fused_linear_kd(student_hidden, student_weight, teacher_logits, student_bias,
                     teacher_hidden, teacher_weight, teacher_bias, student_head, teacher_head,
                     chunk_rows, labels, weight, normalizer, opts: KDOptions, entropy: bool):
    """:func:`fused_linear_kd_loss`; with ``entropy``, also Σ over live rows of the
    student's entropy at T (non-differentiable), for trainers that log it."""
    if opts.reduction == "none":
        raise ValueError("reduction must be 'mean' or 'sum' for fused_linear_kd_loss (got 'none'; "
                         "use kd_loss for per-row losses)")
    check_normalizer(normalizer, opts.reduction, student_hidden.device)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int (got {chunk_rows!r})")
    heads = []
    for name, head in (("student_head", student_head), ("teacher_head", teacher_head)):
        if head is not None and not isinstance(head, LogitHead):
            raise ValueError(f"{name} must be a LogitHead or None (got {type(head).__name__})")
        heads.append(head if head is not None else _IDENTITY)
    hidden = student_hidden.shape[-1]
    lead = student_hidden.shape[:-1]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden:
        raise ValueError(f"student_weight must have shape (C, {hidden}) "
                         f"(got {tuple(student_weight.shape)})")
    num_classes = student_weight.shape[0]
    check_classes("student_hidden", student_hidden, what="feature")
    check_classes("student_weight", student_weight, 0, "row (class)")
    if student_bias is not None and student_bias.shape != (num_classes,):
        raise ValueError(f"student_bias must have shape ({num_classes},) "
                         f"(got {tuple(student_bias.shape)})")
    if (teacher_logits is None) == (teacher_hidden is None):
        raise ValueError("pass exactly one of teacher_logits and teacher_hidden (+ teacher_weight)")
    h = student_hidden.reshape(-1, hidden)
    t_logits = t_hidden = None
    if teacher_logits is not None:
        if not heads[1].identity:
            raise ValueError("teacher_head applies to teacher_hidden; teacher_logits are the "
                             "teacher's final logits (its forward applied its own head)")
        if teacher_logits.dim() < 1 or teacher_logits.shape[:-1] != lead:
            raise ValueError(f"teacher_logits must have shape {tuple(lead) + (num_classes,)} "
                             f"(got {tuple(teacher_logits.shape)})")
        classes = opts.teacher_classes(num_classes, teacher_logits.shape[-1],
                                       f"teacher_logits must have {num_classes} classes")
        # Column slice and reshape: views whenever the strides allow (no copy here).
        t_logits = teacher_logits[..., :classes].reshape(-1, classes).detach()
    else:
        if teacher_weight is None or teacher_weight.dim() != 2 or \
                teacher_hidden.shape[:-1] != lead or \
                teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError("teacher_hidden (..., H_t) needs teacher_weight (C, H_t) with the "
                             "student's C and leading shape")
        classes = opts.teacher_classes(num_classes, teacher_weight.shape[0],
                                       f"teacher_weight must have {num_classes} rows")
        if teacher_bias is not None and teacher_bias.shape != (teacher_weight.shape[0],):
            raise ValueError(f"teacher_bias must have shape ({teacher_weight.shape[0]},) "
                             f"(got {tuple(teacher_bias.shape)})")
        t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        # The leading rows of a row-major weight: a contiguous view.
        teacher_weight = _full(teacher_weight.detach())[:classes]
        teacher_bias = _full(teacher_bias.detach())[:classes] if teacher_bias is not None else None
    y = flat_labels(labels, lead, h.device)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    # The reduction's derivative w.r.t. each row's loss, known before the loop.
    row_scale = reduction_row_scale(row_weight(weight, lead, h.device, h.shape[0]),
                                    kd_denominator(y, h.shape[0], opts, normalizer),
                                    h.shape[0], acc, h.device)
    reject_functorch("fused_linear_kd_loss")
    return _FusedLinearKD.apply(h, _full(student_weight), _full(student_bias), t_logits,
                                t_hidden, teacher_weight, teacher_bias, y, row_scale, chunk_rows,
                                opts, tuple(heads), entropy)
