"""Typed wrappers over torch.ops.distillkit.*, with their fake kernels and autograd.

The dispatcher picks the CPU or CUDA kernel; nothing here branches on device.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _C
from .options import KDOptions, SLaMOptions, SparseKDOptions

__all__ = ["kd_loss_forward", "kd_loss_forward_grad", "kd_loss_backward", "slam_loss_forward",
           "pointwise_distance_forward", "correlation_distance_forward", "sparse_kd_loss_forward",
           "sparse_kd_loss_backward", "coordinate_lstm_step",
           "check_errors", "check_labels", "saved_buffer_is_last_read", "matmul_into",
           "empty_cached", "kd_loss_reduced", "weighted_total", "reduction_row_scale"]


class StatsLayout:
    """The named columns of the per-row statistics an op's forward saves for its backward.

    Defined once, in C++ (csrc/stats_layout.h), and read here from the extension
    (``_C.<op>_stats_layout``, name -> column): each column name is an attribute holding
    its index, ``cols`` is their number.
    """

    def __init__(self, columns: Dict[str, int]):
        self.names = tuple(sorted(columns, key=columns.__getitem__))
        self.cols = len(self.names)
        for name, index in columns.items():
            setattr(self, name, index)

    def stack(self, **columns: Tensor) -> Tensor:
        """(N, cols) statistics from one (N,) tensor per named column."""
        if set(columns) != set(self.names):
            raise ValueError(f"stats columns must be {self.names} (got {tuple(columns)})")
        return torch.stack([columns[name] for name in self.names], 1)


KD_STATS = StatsLayout(_C.kd_loss_stats_layout)
SLAM_STATS = StatsLayout(_C.slam_loss_stats_layout)
SPARSE_KD_STATS = StatsLayout(_C.sparse_kd_loss_stats_layout)
CORRELATION_STATS = StatsLayout(_C.correlation_distance_stats_layout)


def reject_functorch(op: str) -> None:
    """torch.func transforms cannot run the ops' autograd (registered with
    torch.library, which has no functorch rule): say so by name, before PyTorch's
    generic message about setup_context."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        raise RuntimeError(f"{op} does not support torch.func transforms (grad, vjp, vmap, "
                           "jacrev, ...); take its gradient with torch.autograd.grad or "
                           ".backward()")


def check_errors(device: Optional[torch.device] = None) -> None:
    """Raise the ``ValueError`` of a bad input value that a CUDA kernel found.

    CUDA kernels check labels, teacher indices, alpha, k and teacher rows where they
    read them, never on the host (a host check would read device memory: a sync per
    call). A bad value is skipped or clamped (never dereferenced), recorded, and raised
    by the next distillkit CUDA call after that kernel has finished, or here: this
    waits for ``device`` (default: the current CUDA device, when CUDA is initialized)
    and raises what its kernels recorded. The message is the one the CPU path raises
    at the call. A no-op on the CPU, whose ops raise at the call.
    """
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if torch.cuda.is_initialized() else torch.device("cpu"))
    torch.ops.distillkit.check_errors(torch.empty(0, device=device))


@torch.library.register_fake("distillkit::check_errors")
def _check_errors_fake(like):
    return None


def check_labels(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """Check that every entry of ``labels`` ((N,) int64) is in ``[0, num_classes)`` or
    equals ``ignore_index``, with kd_loss's ``ValueError`` for a bad label (the bound
    in its message is ``num_classes``). For callers whose kernels see only some of the
    classes (vocab-parallel KD: the bound is the global vocabulary, each shard kernel's
    its own width). On the CPU it raises at the call; on CUDA a kernel records the bad
    entry and it raises as :func:`check_errors` says, without a host sync."""
    torch.ops.distillkit.check_labels(labels, num_classes, ignore_index)


@torch.library.register_fake("distillkit::check_labels")
def _check_labels_fake(labels, num_classes, ignore_index):
    return None


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def kd_loss_forward(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor],
                    options: KDOptions) -> Tuple[Tensor, Tensor]:
    """Per-row KD losses of (N, C) logits, shape (N,), fp32 (fp64 for fp64 input), and the
    per-row statistics the backward reads, (N, ``KD_STATS.cols``) in the same dtype.

    Rows whose label is ``options.ignore_index`` are 0. The losses are differentiable
    w.r.t. both logits; see :func:`distillkit.kd_loss` for the math. When a gradient will
    be asked for (grad mode on, either logits requiring grad) the forward is
    ``kd_loss_forward_grad``: it also forms the unit gradient while each row is in cache
    and saves it in place of the logits, and the backward only scales it by the upstream
    gradient. Otherwise (inference) it is ``kd_loss_forward``, with no N x C buffer.
    ``options.reduction`` is not applied here.
    """
    reject_functorch("kd_loss")
    if not _needs_grad(student_logits, teacher_logits):
        return torch.ops.distillkit.kd_loss_forward(student_logits, teacher_logits, labels,
                                                    *options.schema_args())
    loss, stats, _, _ = torch.ops.distillkit.kd_loss_forward_grad(
        student_logits, teacher_logits, labels, None, *options.schema_args(),
        teacher_logits.requires_grad)
    # 0-row slices: graph edges to the logits (no storage), so that a loss on the gradient
    # (create_graph=True) reaches the by-name error instead of a missing second-order term.
    anchors = [t[:0].clone() for t in (student_logits, teacher_logits) if t.requires_grad]
    return _SecondOrderGuard.apply(loss, *anchors), stats


def kd_loss_forward_grad(student_logits: Tensor, teacher_logits: Tensor,
                         labels: Optional[Tensor], options: KDOptions,
                         grad_scale: Optional[Tensor] = None, teacher_grad: bool = False
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`kd_loss_forward` and, from the same pass over each row, the gradients of
    ``Σ_i grad_scale[i] · rows[i]`` w.r.t. the student logits and (when ``teacher_grad``,
    else an empty tensor) the teacher logits, contiguous, in the logits' dtypes.

    ``grad_scale``: (N,) or 0-d, in the loss dtype, on the logits' device (read there: no
    host sync); ``None`` gives the unit gradient (all ones). For callers that know the
    scale at forward time (fused linear KD): the gradient is final after one read of the
    logits. Its losses are differentiable only without ``grad_scale``.
    """
    reject_functorch("kd_loss")
    return torch.ops.distillkit.kd_loss_forward_grad(student_logits, teacher_logits, labels,
                                                     grad_scale, *options.schema_args(),
                                                     teacher_grad)


def kd_loss_backward(grad_rows: Tensor, student_logits: Tensor, teacher_logits: Tensor,
                     labels: Optional[Tensor], stats: Tensor, options: KDOptions,
                     teacher_grad: bool) -> Tuple[Tensor, Tensor]:
    """The gradients of ``Σ grad_rows · rows`` w.r.t. the student logits and (when
    ``teacher_grad``, else an empty tensor) the teacher logits, from the forward's
    ``stats``: one pass over the logits, for callers that form gradients themselves
    (fused linear KD, vocabulary-parallel KD)."""
    return torch.ops.distillkit.kd_loss_backward(grad_rows, student_logits, teacher_logits,
                                                 labels, stats, *options.schema_args(),
                                                 teacher_grad)


def _kd_forward_fake_outputs(student_logits, teacher_logits):
    torch._check(student_logits.dim() == 2, lambda: "student_logits must be 2-D")
    torch._check(teacher_logits.shape == student_logits.shape,
                 lambda: "teacher_logits must have the shape of student_logits")
    n = student_logits.shape[0]
    acc = _acc_dtype(student_logits)
    return (student_logits.new_empty((n,), dtype=acc),
            student_logits.new_empty((n, KD_STATS.cols), dtype=acc))


@torch.library.register_fake("distillkit::kd_loss_forward")
def _kd_loss_forward_fake(student_logits, teacher_logits, labels, *scalars):
    return _kd_forward_fake_outputs(student_logits, teacher_logits)


@torch.library.register_fake("distillkit::kd_loss_forward_grad")
def _kd_loss_forward_grad_fake(student_logits, teacher_logits, labels, grad_scale, *scalars):
    teacher_grad = scalars[-1]
    # The kernels write contiguous gradients whatever the logits' row strides.
    grad_teacher = (teacher_logits.new_empty(teacher_logits.shape) if teacher_grad
                    else teacher_logits.new_empty((0,)))
    return (*_kd_forward_fake_outputs(student_logits, teacher_logits),
            student_logits.new_empty(student_logits.shape), grad_teacher)


@torch.library.register_fake("distillkit::kd_loss_backward")
def _kd_loss_backward_fake(grad_loss, student_logits, teacher_logits, labels, stats, *scalars):
    teacher_grad = scalars[-1]
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


def saved_buffer_is_last_read(t: Tensor) -> bool:
    """Whether a backward may scale its saved buffer ``t`` in place and return it as the
    gradient: the running backward frees the graph (no ``retain_graph=True``: the buffer
    is not read again) and runs eagerly (a traced backward, torch.compile or AOT
    autograd's fake and functional tensors, must not mutate a saved forward output).
    From the engine's graph task; where this PyTorch does not say, the graph counts as
    kept (the safe answer)."""
    if type(t) is not Tensor or torch.compiler.is_compiling():
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _scale_rows(unit: Tensor, grad_rows: Tensor) -> Tensor:
    """unit[i, :] * grad_rows[i] in the dtype of ``unit``, products formed in the dtype of
    ``grad_rows`` (fp32 for 16-bit logits) and rounded once; where the tensors are (on
    CUDA: no host read of grad_rows). When the graph is freed after this backward the
    saved unit gradient is read for the last time here, so it is scaled in place and
    becomes the gradient (no second N x C buffer); a retained graph's saved gradient is
    left unchanged for the next backward (a new tensor)."""
    if torch.is_grad_enabled():  # create_graph=True: differentiable w.r.t. grad_rows
        return (unit * grad_rows.reshape(-1, 1)).to(unit.dtype)
    if saved_buffer_is_last_read(unit):
        torch.ops.distillkit.kd_loss_scale_grad_(unit, grad_rows)
        return unit
    return torch.ops.distillkit.kd_loss_scale_grad(unit, grad_rows)


@torch.library.register_fake("distillkit::kd_loss_scale_grad")
def _kd_loss_scale_grad_fake(unit_grad, grad_rows):
    return unit_grad.new_empty(unit_grad.shape)


@torch.library.register_fake("distillkit::kd_loss_scale_grad_")
def _kd_loss_scale_grad__fake(grad, grad_rows):
    return None


def weighted_total(rows: Tensor, weight: Optional[Tensor], denominator) -> Tensor:
    """``Σ weight·rows``, divided by ``denominator`` unless it is None (``sum``): the
    reduction of per-row losses, one formula for every path that reduces them."""
    total = (rows if weight is None else rows * weight).sum()
    return total if denominator is None else total / denominator


def reduction_row_scale(weight: Optional[Tensor], denominator, rows: int, dtype: torch.dtype,
                        device: torch.device) -> Tensor:
    """The derivative of :func:`weighted_total` w.r.t. each row, ``weight / denominator``
    as (N,) ``dtype`` (ones without a weight; no division for ``sum``): the scale a
    reduced loss gives its rows' gradients, known before any pass over the logits."""
    scale = (torch.ones(rows, dtype=dtype, device=device) if weight is None
             else weight.reshape(rows).to(dtype))
    return scale if denominator is None else scale / denominator


def kd_loss_reduced(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor],
                    options: KDOptions, weight: Optional[Tensor], denominator) -> Tensor:
    """``weighted_total`` of :func:`kd_loss_forward`'s rows, where the loss is reduced:
    ``weight`` (N,) floating or None, ``denominator`` a number, a 0-d tensor or
    None (``sum``), neither requiring grad. The gradient of the total w.r.t. the rows,
    ``weight / denominator``, is known before the pass, so the forward forms the final
    gradient of the loss (``kd_loss_forward_grad`` with that ``grad_scale``: every 16-bit
    gradient entry rounded once) and the backward only multiplies it by the upstream
    gradient, in place: for ``loss.backward()`` that is 1, no pass at all on the CPU."""
    acc = _acc_dtype(student_logits)
    weight = None if weight is None else weight.to(acc)
    if not _needs_grad(student_logits, teacher_logits):
        rows, _ = kd_loss_forward(student_logits, teacher_logits, labels, options)
        return weighted_total(rows, weight, denominator)
    reject_functorch("kd_loss")
    # On the device, as the total's division is: no host read.
    scale = reduction_row_scale(weight, denominator, student_logits.shape[0], acc,
                                student_logits.device)
    total = _ReducedKD.apply(student_logits, teacher_logits, labels, scale, weight,
                             denominator, options)
    anchors = [t[:0].clone() for t in (student_logits, teacher_logits) if t.requires_grad]
    return _SecondOrderGuard.apply(total, *anchors)


class _ReducedKD(torch.autograd.Function):
    """The reduced loss of :func:`kd_loss_reduced`: it saves the final gradient of the
    loss (the logits' place) and scales it by the upstream gradient."""

    @staticmethod
    def forward(ctx, z, u, y, scale, weight, denominator, options):
        teacher_grad = ctx.needs_input_grad[1]
        rows, _, grad_s, grad_t = torch.ops.distillkit.kd_loss_forward_grad(
            z, u, y, scale, *options.schema_args(), teacher_grad)
        ctx.save_for_backward(grad_s, grad_t if teacher_grad else None)
        return weighted_total(rows, weight, denominator)

    @staticmethod
    def backward(ctx, grad):
        grad_s, grad_t = ctx.saved_tensors
        return (_scale_rows(grad_s, grad) if ctx.needs_input_grad[0] else None,
                _scale_rows(grad_t, grad) if ctx.needs_input_grad[1] else None) + (None,) * 5


def _kd_loss_forward_grad_setup_context(ctx, inputs, output):
    _, _, _, grad_scale, *scalars = inputs
    _, stats, grad_s, grad_t = output
    # The unit gradients replace the logits as what the backward keeps.
    ctx.save_for_backward(grad_s, grad_t if scalars[-1] else None)
    ctx.scaled = grad_scale is not None
    ctx.mark_non_differentiable(stats, grad_s, grad_t)
    # Their gradients arrive as None, not as materialized N x C zeros.
    ctx.set_materialize_grads(False)


def _kd_loss_forward_grad_backward(ctx, grad_loss, _grad_stats, _grad_gs, _grad_gt):
    if ctx.scaled:
        raise RuntimeError("kd_loss_forward_grad: with a grad_scale the returned gradient is "
                           "already final and the losses are not differentiable; call it "
                           "without grad_scale to differentiate the losses")
    grad_s, grad_t = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 11
    if ctx.needs_input_grad[1] and grad_t is None:
        raise RuntimeError("kd_loss_forward_grad: teacher_logits requires grad but the call "
                           "had teacher_grad=False, so no teacher gradient was formed")
    out_s = _scale_rows(grad_s, grad_loss) if ctx.needs_input_grad[0] else None
    out_t = _scale_rows(grad_t, grad_loss) if ctx.needs_input_grad[1] else None
    return (out_s, out_t) + (None,) * 9  # labels, grad_scale, scalars


torch.library.register_autograd("distillkit::kd_loss_forward_grad",
                                _kd_loss_forward_grad_backward,
                                setup_context=_kd_loss_forward_grad_setup_context)


class _SecondOrderGuard(torch.autograd.Function):
    """``rows`` unchanged; under ``create_graph=True`` its backward routes the upstream
    gradient through :class:`RaiseOnBackward` anchored on (0-row slices of) the logits, so
    the gradient kd_loss_forward_grad's backward forms from it is part of the graph and a
    loss on it raises :func:`double_backward_error` by name."""

    @staticmethod
    def forward(ctx, rows: Tensor, *anchors: Tensor) -> Tensor:
        ctx.save_for_backward(*anchors)
        return rows.clone()

    @staticmethod
    def backward(ctx, grad):
        anchors = ctx.saved_tensors
        if torch.is_grad_enabled():
            grad = RaiseOnBackward.apply(grad, *anchors, "kd_loss")
        return (grad,) + (None,) * len(anchors)


# --- slam_loss ---------------------------------------------------------------------


def slam_loss_forward(student_logits: Tensor, teacher_probs: Tensor, alpha: Tensor, k: Tensor,
                      options: SLaMOptions) -> Tuple[Tensor, Tensor]:
    """Per-row SLaM losses of (N, C) inputs, shape (N,), and the (N, ``SLAM_STATS.cols``)
    statistics the backward reads; see :func:`distillkit.slam_loss`."""
    reject_functorch("slam_loss")
    return torch.ops.distillkit.slam_loss_forward(student_logits, teacher_probs, alpha, k,
                                                  *options.schema_args())


@torch.library.register_fake("distillkit::slam_loss_forward")
def _slam_loss_forward_fake(student_logits, teacher_probs, alpha, k, normalized, hard):
    torch._check(teacher_probs.shape == student_logits.shape,
                 lambda: "teacher_probs must have the shape of student_logits")
    n = student_logits.shape[0]
    acc = _acc_dtype(student_logits)
    return (student_logits.new_empty((n,), dtype=acc),
            student_logits.new_empty((n, SLAM_STATS.cols), dtype=acc))


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


def pointwise_distance_forward(student: Tensor, teacher: Tensor, op: str) -> Tensor:
    """Σ over all elements of |s − t| ("l1"), (s − t)² ("l2") or smooth-L1 (β = 1), 0-d."""
    reject_functorch("distance")
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


def correlation_distance_forward(student: Tensor, teacher: Tensor, center: bool
                                 ) -> Tuple[Tensor, Tensor]:
    """1 − cos (center=False) or 1 − Pearson ρ (center=True) over dim 1 of (outer, D, inner)
    inputs: (outer, inner) distances and the (outer, inner, ``CORRELATION_STATS.cols``)
    statistics the backward reads."""
    reject_functorch("distance")
    return torch.ops.distillkit.correlation_distance_forward(student, teacher, bool(center))


@torch.library.register_fake("distillkit::correlation_distance_forward")
def _correlation_forward_fake(student, teacher, center):
    torch._check(student.dim() == 3, lambda: "student must be 3-D (outer, D, inner)")
    torch._check(teacher.shape == student.shape, lambda: "teacher must have the shape of student")
    outer, _, inner = student.shape
    acc = _acc_dtype(student)
    return (student.new_empty((outer, inner), dtype=acc),
            student.new_empty((outer, inner, CORRELATION_STATS.cols), dtype=acc))


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


def sparse_kd_loss_forward(student_logits: Tensor, teacher_indices: Tensor,
                           teacher_logprobs: Tensor, labels: Optional[Tensor],
                           options: SparseKDOptions,
                           teacher_tail_logprob: Optional[Tensor] = None
                           ) -> Tuple[Tensor, Tensor]:
    """Per-row KD losses of (N, C) student logits against a top-K teacher ((N, K) int64
    indices, -1 = padding, and log-probabilities; optionally (N,) log tail masses, the
    teacher's mass outside its K classes as a (K + 1)-th bucket), shape (N,), fp32 (fp64
    for fp64 input), and the (N, ``SPARSE_KD_STATS.cols``) statistics the backward
    reads. Dead rows (label == ignore_index, or no kept entry) are 0. Differentiable
    w.r.t. the student only; see :func:`distillkit.sparse_kd_loss` for the math."""
    reject_functorch("sparse_kd_loss")
    return torch.ops.distillkit.sparse_kd_loss_forward(
        student_logits, teacher_indices, teacher_logprobs, labels, *options.schema_args(),
        teacher_tail_logprob, *options.tail_args())


def sparse_kd_loss_backward(grad_rows: Tensor, student_logits: Tensor, teacher_indices: Tensor,
                            teacher_logprobs: Tensor, labels: Optional[Tensor], stats: Tensor,
                            options: SparseKDOptions,
                            teacher_tail_logprob: Optional[Tensor] = None) -> Tensor:
    """The gradient of ``Σ grad_rows · rows`` w.r.t. the student logits from the forward's
    ``stats``: one pass over the logits, for callers that form gradients themselves
    (fused linear sparse KD)."""
    return torch.ops.distillkit.sparse_kd_loss_backward(
        grad_rows, student_logits, teacher_indices, teacher_logprobs, labels, stats,
        *options.schema_args()[:-1], teacher_tail_logprob, *options.tail_args())


@torch.library.register_fake("distillkit::sparse_kd_loss_forward")
def _sparse_kd_loss_forward_fake(student_logits, teacher_indices, teacher_logprobs, labels,
                                 *scalars):
    torch._check(student_logits.dim() == 2, lambda: "student_logits must be 2-D")
    torch._check(teacher_indices.dim() == 2 and teacher_logprobs.shape == teacher_indices.shape,
                 lambda: "teacher_logprobs must have the shape of teacher_indices (N, K)")
    torch._check(teacher_indices.shape[0] == student_logits.shape[0],
                 lambda: "teacher_indices must have as many rows as student_logits")
    n = student_logits.shape[0]
    acc = _acc_dtype(student_logits)
    return (student_logits.new_empty((n,), dtype=acc),
            student_logits.new_empty((n, SPARSE_KD_STATS.cols), dtype=acc))


@torch.library.register_fake("distillkit::sparse_kd_loss_backward")
def _sparse_kd_loss_backward_fake(grad_loss, student_logits, teacher_indices, teacher_logprobs,
                                  labels, stats, *scalars):
    # The kernels return a contiguous gradient whatever the student's strides.
    return student_logits.new_empty(student_logits.shape)


def _sparse_kd_setup_context(ctx, inputs, output):
    (student_logits, teacher_indices, teacher_logprobs, labels, temperature, renormalize,
     ignore_index, scale_by_t2, _check_duplicates, *rest) = inputs
    tail = rest[0] if rest else None
    ctx.save_for_backward(student_logits, teacher_indices, teacher_logprobs, labels, output[1],
                          tail)
    # check_duplicates is left out: the forward already checked.
    ctx.scalars = (temperature, renormalize, ignore_index, scale_by_t2)
    ctx.tail_scalars = tuple(rest[1:])
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(output[1])


def _sparse_kd_backward(ctx, grad_loss, _grad_stats):
    student_logits, teacher_indices, teacher_logprobs, labels, stats, tail = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.distillkit.sparse_kd_loss_backward(
            grad_loss.contiguous(), student_logits, teacher_indices, teacher_logprobs, labels,
            stats, *ctx.scalars, tail, *ctx.tail_scalars)
    # The cached teacher (log-probabilities and tail) is data: no gradient to it.
    return (grad,) + (None,) * (ctx.n_inputs - 1)


torch.library.register_autograd("distillkit::sparse_kd_loss_forward", _sparse_kd_backward,
                                setup_context=_sparse_kd_setup_context)


# --- coordinate_lstm (docs/math.md §8) -----------------------------------------------

def coordinate_lstm_step(grad: Tensor, params: Tensor, h: Tensor, c: Tensor,
                         w_ih: Sequence[Tensor], w_hh: Sequence[Tensor], bias: Sequence[Tensor],
                         head_weight: Optional[Tensor] = None, head_bias: Optional[Tensor] = None,
                         *, preprocess_p: float = 10.0, output_scale: float = 0.1
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    """One step of the coordinate-wise LSTM optimizer (L2L / L2T-DLN teacher, docs/math.md §8).

    Each of the P coordinates is one batch row of L stacked LSTM cells sharing the weights.
    Per coordinate, with p = ``preprocess_p`` and s = ``output_scale``:

    - input x = (a, b), a = max(log(|g| + 1e-8) / p, -1), b = clamp(g e^p, -1, 1);
    - layer l: gates = W_ih[l] x + W_hh[l] h_l + bias[l] (gate order i, f, g, o as in
      ``nn.LSTMCell``; ``bias`` = b_ih + b_hh), c_l' = σ(f) c_l + σ(i) tanh(g),
      h_l' = σ(o) tanh(c_l'), and x = h_l' feeds layer l + 1;
    - out = head_weight · h_L' + head_bias, or h_L' itself without a head (then H_L = 1);
    - params_out = params + s out.

    Shapes: grad, params (P,); h, c (P, ΣH_l), layer l's columns after those of the
    layers below; w_ih[l] (4H_l, in_l) with in_0 = 2 and in_l = H_{l-1}; w_hh[l]
    (4H_l, H_l); bias[l] (4H_l,); head_weight (1, H_L) and head_bias (1,) or both None.
    fp32 or fp64, all one dtype and device. Returns (params_out, h_out, c_out).

    Differentiable w.r.t. everything (params: the identity; grad: through the
    preprocessing, with torch's conventions: a clamp passes no gradient where its input
    equals a bound, and |g| has zero gradient at g = 0). The backward is one step of truncated BPTT: it saves only
    (grad, h, c) and the weights and recomputes the gates. Weight gradients are sums over
    the coordinates in a fixed order: the same bits run to run and for any thread count.
    """
    reject_functorch("coordinate_lstm_step")
    return torch.ops.distillkit.coordinate_lstm_forward(
        grad, params, h, c, list(w_ih), list(w_hh), list(bias), head_weight, head_bias,
        float(preprocess_p), float(output_scale))


def _lstm_check_fake(grad, params, h, c, w_ih, w_hh):
    torch._check(grad.dim() == 1, lambda: "grad must be 1-D")
    torch._check(params.shape == grad.shape, lambda: "params must have the shape of grad")
    width = sum(w.shape[1] for w in w_hh)
    for t, name in ((h, "h"), (c, "c")):
        torch._check(t.dim() == 2 and t.shape[0] == grad.shape[0] and t.shape[1] == width,
                     lambda: f"{name} must be (P, sum of hidden sizes)")
    torch._check(len(w_ih) == len(w_hh), lambda: "w_ih and w_hh must hold one tensor per layer")


@torch.library.register_fake("distillkit::coordinate_lstm_forward")
def _coordinate_lstm_forward_fake(grad, params, h, c, w_ih, w_hh, bias, head_weight, head_bias,
                                  preprocess_p, output_scale):
    _lstm_check_fake(grad, params, h, c, w_ih, w_hh)
    # The kernels return contiguous tensors whatever the inputs' strides.
    return params.new_empty(params.shape), h.new_empty(h.shape), c.new_empty(c.shape)


@torch.library.register_fake("distillkit::coordinate_lstm_backward")
def _coordinate_lstm_backward_fake(grad_params_out, grad_h_out, grad_c_out, grad, h, c, w_ih,
                                   w_hh, bias, head_weight, head_bias, preprocess_p,
                                   output_scale):
    _lstm_check_fake(grad, grad, h, c, w_ih, w_hh)
    head_w = head_weight.new_empty(head_weight.shape) if head_weight is not None else grad.new_empty((0,))
    head_b = head_bias.new_empty(head_bias.shape) if head_bias is not None else grad.new_empty((0,))
    return (grad.new_empty(grad.shape), h.new_empty(h.shape), c.new_empty(c.shape),
            [w.new_empty(w.shape) for w in w_ih], [w.new_empty(w.shape) for w in w_hh],
            [b.new_empty(b.shape) for b in bias], head_w, head_b)


def _coordinate_lstm_setup_context(ctx, inputs, output):
    grad, params, h, c, w_ih, w_hh, bias, head_weight, head_bias, *scalars = inputs
    # Only the inputs: the gates are recomputed in the backward, so a K-step unroll
    # holds (grad, h, c) per step and nothing of size (P, 4H).
    ctx.save_for_backward(grad, h, c, *w_ih, *w_hh, *bias, head_weight, head_bias)
    ctx.layers = len(w_ih)
    ctx.scalars = scalars
    # Unused outputs (the last step's h_out, c_out) arrive as None, not zeros.
    ctx.set_materialize_grads(False)


def _coordinate_lstm_backward(ctx, grad_params_out: Optional[Tensor], grad_h_out: Optional[Tensor],
                              grad_c_out: Optional[Tensor]):
    grad, h, c, *weights = ctx.saved_tensors
    L = ctx.layers
    w_ih, w_hh, bias = weights[:L], weights[L:2 * L], weights[2 * L:3 * L]
    head_weight, head_bias = weights[3 * L], weights[3 * L + 1]
    need = ctx.needs_input_grad
    gpo = grad_params_out.contiguous() if grad_params_out is not None else torch.zeros_like(grad)
    gg, gh, gc, gwi, gwh, gb, ghw, ghb = torch.ops.distillkit.coordinate_lstm_backward(
        gpo, grad_h_out, grad_c_out, grad, h, c, w_ih, w_hh, bias, head_weight, head_bias,
        *ctx.scalars)

    def pick(flags: List[bool], grads: List[Tensor]) -> List[Optional[Tensor]]:
        return [g if f else None for f, g in zip(flags, grads)]

    return (gg if need[0] else None, gpo if need[1] else None, gh if need[2] else None,
            gc if need[3] else None, pick(need[4], gwi), pick(need[5], gwh), pick(need[6], gb),
            ghw if need[7] else None, ghb if need[8] else None, None, None)


torch.library.register_autograd("distillkit::coordinate_lstm_forward", _coordinate_lstm_backward,
                                setup_context=_coordinate_lstm_setup_context)


# --- no double backward ------------------------------------------------------------

def double_backward_error(op: str) -> RuntimeError:
    return RuntimeError(
        f"{op} does not support double backward: its gradient is formed by a fused kernel "
        "that is not itself differentiable, so a loss on that gradient (create_graph=True, "
        "then backward through it) would silently lose the second-order term")


def _register_no_double_backward(op: str) -> None:
    """A gradient taken with ``create_graph=True`` carries a node that raises, by name,
    when something differentiates through it, instead of a silently missing term."""
    def backward(ctx, *grads):
        raise double_backward_error(op)

    torch.library.register_autograd(f"distillkit::{op}_backward", backward,
                                    setup_context=lambda ctx, inputs, output: None)


for _op in ("kd_loss", "slam_loss", "pointwise_distance", "correlation_distance",
            "sparse_kd_loss", "coordinate_lstm"):
    _register_no_double_backward(_op)


def _kd_loss_scale_grad_backward(ctx, grad):
    raise double_backward_error("kd_loss")


# Called only outside grad mode (the backward of kd_loss_forward_grad); differentiating it
# would be differentiating kd_loss's gradient.
torch.library.register_autograd("distillkit::kd_loss_scale_grad", _kd_loss_scale_grad_backward,
                                setup_context=lambda ctx, inputs, output: None)


class RaiseOnBackward(torch.autograd.Function):
    """``t`` unchanged, as a function of ``anchors`` whose backward raises
    :func:`double_backward_error`: marks the gradients an ``autograd.Function`` returns
    under ``create_graph=True`` (the anchors, the inputs they are gradients for, make
    them part of the graph)."""

    @staticmethod
    def forward(ctx, t: Tensor, *anchors_and_op) -> Tensor:
        ctx.op = anchors_and_op[-1]
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        raise double_backward_error(ctx.op)


def matmul_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """``out = a @ b``, or ``out += a @ b`` when ``accumulate``, in place: (M, K) ``a`` and
    (K, N) ``b`` of one dtype (either may be a transposed view: no copy), ``out`` (M, N) of
    that dtype or, for bf16 / fp16 operands, fp32, the products then accumulated in fp32
    and never rounded to the operands' dtype (on the CPU, MKL's mixed-precision GEMM with
    beta = 1). No autograd: for callers that form gradients themselves (fused linear KD's
    weight gradient, summed over row chunks)."""
    torch.ops.distillkit.matmul_into(out, a, b, accumulate)


def empty_cached(like: Tensor, size: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An uninitialized contiguous tensor of ``size`` and ``dtype`` on ``like``'s device; on
    the CPU from distillkit's output cache (see :func:`distillkit.empty_cpu_cache`), whose
    blocks stay resident and huge-page advised from one training step to the next: a
    fresh multi-MB CPU tensor pays a page fault per page wherever it is first written."""
    return torch.ops.distillkit.empty_cached(like, list(size), dtype)
