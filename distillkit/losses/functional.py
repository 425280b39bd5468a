"""User-facing loss functions (docstrings carry the math, shapes and conventions)."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from ..ops import (correlation_distance_forward, kd_loss_forward, kd_loss_reduced,
                  pointwise_distance_forward, slam_loss_forward, sparse_kd_loss_forward,
                  weighted_total)
from ..ops.options import REDUCTIONS, KDOptions, SLaMOptions, SparseKDOptions, check_choice

__all__ = ["kd_loss", "slam_loss", "forward_corrected_loss", "distance", "sparse_kd_loss"]

def check_normalizer(normalizer, reduction: str, device: torch.device) -> None:
    """A positive finite number, or a 0-d real tensor on ``device`` or the CPU (a scalar
    divides tensors of any device); only with reduction="mean"."""
    if normalizer is None:
        return
    if reduction != "mean":
        raise ValueError(f"normalizer is only valid with reduction='mean' (got reduction={reduction!r})")
    if isinstance(normalizer, Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-d tensor (got shape {tuple(normalizer.shape)})")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise ValueError(f"normalizer must be a real number tensor (got {normalizer.dtype})")
        if normalizer.device not in (device, torch.device("cpu")):
            raise ValueError(f"normalizer must be on {device} or the CPU (got {normalizer.device})")
        # Value check only in eager mode: under torch.compile it would be a
        # data-dependent branch (a graph break); there the caller vouches for it.
        if not torch.compiler.is_compiling() and not bool((normalizer > 0) & normalizer.isfinite()):
            raise ValueError(f"normalizer must be positive and finite (got {normalizer.item()})")
    elif (isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real)
          or not (normalizer > 0 and math.isfinite(normalizer))):
        raise ValueError(f"normalizer must be a positive finite number or 0-d tensor (got {normalizer!r})")


def check_classes(name: str, tensor: Tensor, dim: int = -1, what: str = "class") -> None:
    """``tensor.shape[dim]``, the length an op reduces over, must be at least 1: an empty
    reduction (C = 0 classes, K = 0 kept entries) has no defined value."""
    if tensor.shape[dim] == 0:
        raise ValueError(f"{name} must have at least one {what} along dim {dim} "
                         f"(got shape {tuple(tensor.shape)})")


def check_row_tensor(name: str, tensor, lead, device: torch.device, floating: bool) -> None:
    """``labels`` / ``weight``: a tensor of the rows' leading shape on the logits' device;
    floating-point weights, int64 labels (checked by the op)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a tensor (got {type(tensor).__name__})")
    if tensor.shape != lead:
        raise ValueError(f"{name} must have shape {tuple(lead)} (got {tuple(tensor.shape)})")
    if tensor.device != device:
        raise ValueError(f"{name} must be on the logits' device {device} (got {tensor.device})")
    if floating and not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (got {tensor.dtype}; "
                         "use .float() for a mask)")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    normalizer: Optional[Union[float, Tensor]] = None,
    options: Optional[KDOptions] = None,
    **fields,
) -> Tensor:
    r"""Fused soft-label knowledge-distillation loss (docs/math.md §1).

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
        teacher_logits: (..., C) teacher logits u, same shape (C_t ≥ C columns with
            ``teacher_vocab="truncate"``). Gradients flow to it
            when it requires grad (mutual / online distillation).
        labels: optional (...) int64 class indices for the hard term and row masking.
        weight: optional (...) per-row weights (weighted distillation).
        normalizer: replaces the mean's denominator (e.g. the token count across
            gradient-accumulation steps and ranks); a positive number or 0-d tensor,
            only with reduction="mean".
        options: a :class:`~distillkit.KDOptions`; ``**fields`` (its field names:
            ``temperature`` T > 0, ``divergence`` "forward_kl" | "reverse_kl" | "jsd",
            ``beta`` in [0, 1], ``hard_weight`` in [0, 1], ``ignore_index``,
            ``reduction``, ``scale_by_t2`` and ``teacher_vocab``, "truncate" reading a
            padded teacher (..., C_t ≥ C) through its first C columns) build one or
            override those of ``options``. ``reduction="mean"`` divides the sum of weighted rows by the
            number of non-ignored rows, not by Σ weight: PyTorch's ``batchmean`` for 2-D
            input, the per-token mean for (B, S, V); ``"none"`` returns per-row losses
            with the leading shape.

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
    opts = KDOptions.resolve(options, **fields)
    z, u, y, lead = kd_rows_inputs(student_logits, teacher_logits, labels, opts, normalizer)
    fixed = [t for t in (weight, normalizer) if isinstance(t, Tensor)]
    if opts.reduction != "none" and not any(t.requires_grad for t in fixed):
        # The reduction's weights are constants: the gradient is final after one pass.
        return kd_loss_reduced(z, u, y, opts, row_weight(weight, lead, z.device, z.shape[0]),
                               kd_denominator(y, z.shape[0], opts, normalizer))
    rows, _ = kd_loss_forward(z, u, y, opts)
    return reduce_kd_rows(rows, lead, y, weight, opts, normalizer)


def kd_rows_inputs(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor],
                   opts: KDOptions, normalizer):
    """Checks the tensors of a kd_loss-family call; returns the (N, C) logits, the (N,)
    labels and the leading shape. fp64 in either input promotes both."""
    check_normalizer(normalizer, opts.reduction, student_logits.device)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (..., C)")
    check_classes("student_logits", student_logits)
    if not isinstance(teacher_logits, Tensor):
        raise TypeError(f"teacher_logits must be a tensor (got {type(teacher_logits).__name__})")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must be on student_logits' device "
                         f"{student_logits.device} (got {teacher_logits.device})")
    if teacher_logits.shape[:-1] != student_logits.shape[:-1] or teacher_logits.dim() < 1:
        raise ValueError(
            "teacher_logits must have the shape of student_logits "
            f"(got {tuple(teacher_logits.shape)} and {tuple(student_logits.shape)})"
        )
    lead = student_logits.shape[:-1]
    num_classes = student_logits.shape[-1]
    # A padded teacher vocabulary: its leading columns, a view (no copy).
    classes = opts.teacher_classes(num_classes, teacher_logits.shape[-1],
                                   "teacher_logits must have the shape of student_logits")
    teacher_logits = teacher_logits[..., :classes]
    # math.prod, not -1: a reshape of zero classes to (-1, 0) is ambiguous, and C = 0
    # is the op's own error.
    z = student_logits.reshape(math.prod(lead), num_classes)
    u = teacher_logits.reshape(z.shape)
    # fp64 in either input means an fp64 computation (the kernels pair fp64 with fp64).
    if (z.dtype == torch.float64) != (u.dtype == torch.float64):
        z, u = z.double(), u.double()
    return z, u, flat_labels(labels, lead, z.device), lead


def flat_labels(labels: Optional[Tensor], lead, device: torch.device) -> Optional[Tensor]:
    """(...) labels checked against the leading shape and device, as (N,)."""
    if labels is None:
        return None
    check_row_tensor("labels", labels, lead, device, floating=False)
    return labels.reshape(-1)


def mean_denominator(y: Optional[Tensor], rows: int, ignore_index: int, normalizer):
    """The ``mean`` reduction's denominator: ``normalizer``, else the number of rows whose
    label is not ``ignore_index`` (at least 1)."""
    if normalizer is not None:
        return normalizer
    return (y != ignore_index).sum().clamp(min=1) if y is not None else max(rows, 1)


def reduce_rows(rows: Tensor, lead, weight: Optional[Tensor], reduction: str,
                denominator=None) -> Tensor:
    """Weights multiply rows; ``mean`` divides the sum by ``denominator`` (default: the
    row count, never Σ weight); ``none`` returns the rows with the leading shape."""
    w = row_weight(weight, lead, rows.device, rows.shape[0])
    if reduction == "none":
        return (rows if w is None else rows * w.to(rows.dtype)).reshape(lead)
    if reduction == "mean" and denominator is None:
        denominator = max(rows.numel(), 1)
    return weighted_total(rows, None if w is None else w.to(rows.dtype),
                          denominator if reduction == "mean" else None)


def row_weight(weight: Optional[Tensor], lead, device: torch.device, rows: int
               ) -> Optional[Tensor]:
    """``weight`` checked against the leading shape, as (N,)."""
    if weight is None:
        return None
    check_row_tensor("weight", weight, lead, device, floating=True)
    return weight.reshape(rows)


def reduce_kd_rows(rows: Tensor, lead, y: Optional[Tensor], weight: Optional[Tensor],
                   opts: KDOptions, normalizer) -> Tensor:
    """The weighting and reduction of a kd_loss-family call's (N,) row losses."""
    return reduce_rows(rows, lead, weight, opts.reduction,
                       kd_denominator(y, rows.shape[0], opts, normalizer))


def kd_denominator(y: Optional[Tensor], rows: int, opts: KDOptions, normalizer):
    """The denominator of a kd_loss-family reduction: :func:`mean_denominator` for
    ``mean``, None (no division) otherwise."""
    return (mean_denominator(y, rows, opts.ignore_index, normalizer)
            if opts.reduction == "mean" else None)


def slam_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    alpha: Union[float, Tensor],
    k: Union[int, Tensor],
    *,
    weight: Optional[Tensor] = None,
    options: Optional[SLaMOptions] = None,
    **fields,
) -> Tensor:
    r"""SLaM student-label-mixing loss (docs/math.md §5) for distillation with unlabeled examples.

    Per row, with student :math:`f = \mathrm{softmax}(z)`, teacher soft labels ``t``, and
    ``M`` the teacher's top-``k`` set (ties go to the lower class index):

    .. math::
        q_i = \alpha f_i + (1 - \alpha)\, c\, M_i (1 - f_i), \qquad
        \ell = -\sum_i t_i \log q_i \;\text{(soft)} \quad\text{or}\quad -\log q_{\hat y}
        \;\text{(hard, } \hat y = \arg\max t)

    with ``c = 1`` (the paper's unnormalized form, default) or ``c = 1/(k-1)``
    (``normalized=True``, needs ``k >= 2``). ``q`` is not renormalized. ``alpha = 1`` is
    plain cross entropy against ``t``. At inference use the student's plain ``f``.

    Args:
        student_logits: (N, C) student logits z (fp32/bf16/fp16/fp64).
        teacher_probs: (N, C) teacher probabilities; rows non-negative and summing to 1
            within 1e-3 (1e-2 for bf16/fp16 inputs), else ValueError.
        alpha: (N,) or scalar in (0, 1]: the probability the teacher's label is right.
        k: (N,) int64 or int in [1, C]: the size of each row's top-k set.
        weight: optional (N,) per-row weights.
        options: a :class:`~distillkit.SLaMOptions`; ``**fields`` (its field names)
            build one or override those of ``options``: ``normalized`` (c = 1/(k-1)
            instead of 1), ``hard`` (the teacher's argmax instead of its soft labels),
            ``reduction`` ("mean" over rows, with ``weight`` Σ w·row / N; "sum"; "none").

    Returns:
        fp32 loss (fp64 for fp64 inputs); gradients flow to ``student_logits`` only.
        N = 0 rows give 0 for "mean" and "sum" (and an empty "none"), with a zero gradient.
    """
    opts = SLaMOptions.resolve(options, **fields)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be 2-D (N, C) (got shape {tuple(student_logits.shape)})")
    check_classes("student_logits", student_logits)
    n = student_logits.shape[0]
    z, t = student_logits, teacher_probs
    if (z.dtype == torch.float64) != (t.dtype == torch.float64):
        z, t = z.double(), t.double()
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    alpha = torch.as_tensor(alpha, device=z.device)
    if not alpha.is_floating_point():
        alpha = alpha.to(acc)
    if alpha.dim() == 0:
        alpha = alpha.expand(n)
    k = torch.as_tensor(k, device=z.device)
    if k.dim() == 0:
        k = k.expand(n)
    rows, _ = slam_loss_forward(z, t, alpha.to(acc).contiguous(), k.contiguous(), opts)
    return reduce_rows(rows, rows.shape, weight, opts.reduction)


def forward_corrected_loss(student_logits: Tensor, targets: Tensor, transition: Tensor,
                           reduction: str = "mean") -> Tensor:
    r"""Forward loss correction (Patrini et al.): cross entropy of the targets against the
    noisy-label distribution :math:`T^\top f`, :math:`f = \mathrm{softmax}(z)`.

    Args:
        student_logits: (N, C) logits.
        targets: (N,) int64 labels or (N, C) soft targets.
        transition: (C, C) row-stochastic noise matrix, ``T[i, j] = P(noisy j | clean i)``.
        reduction: "mean", "sum" or "none".

    Evaluated stably as :math:`\log (e^{z - \max z})^\top T - \log \sum e^{z - \max z}`: no
    exponent overflows, and memory is O(N·C) (one (N, C) matmul), not O(N·C²).
    """
    check_choice("reduction", reduction, REDUCTIONS)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be 2-D (N, C) (got shape {tuple(student_logits.shape)})")
    n, c = student_logits.shape
    if c == 0:
        raise ValueError(f"student_logits must have at least one class (got shape {(n, c)})")
    if transition.shape != (c, c):
        raise ValueError(f"transition must have shape ({c}, {c}) (got {tuple(transition.shape)})")
    if not torch.compiler.is_compiling():
        if bool((transition < 0).any()) or not torch.allclose(
                transition.sum(1).double(), torch.ones(c, dtype=torch.float64, device=transition.device),
                atol=1e-3):
            raise ValueError("transition must be row-stochastic (non-negative rows summing to 1)")
    acc = torch.float64 if torch.float64 in (student_logits.dtype, transition.dtype) else torch.float32
    z = student_logits.to(acc)
    tr = transition.to(acc)
    shifted = z - z.amax(1, keepdim=True).detach()
    e = shifted.exp()
    mixed = e @ tr
    # exp(z - max z) underflows where a column's mass comes only from logits far below
    # the max: log(e @ T) is then -inf where its exact value is finite. Those rows are
    # recomputed in the log domain, log_noisy_j = logsumexp_i(z_i + log T_ij) - lse(z)
    # (O(C^2) per such row, in row chunks; the fast value is masked so that its log
    # passes no 0/0 gradient).
    bad = (mixed == 0).logical_and((tr > 0).any(0)).any(1)
    redo = (bad.nonzero().squeeze(1) if not torch.compiler.is_compiling() and bool(bad.any())
            else None)
    if redo is not None:
        mixed = torch.where(bad[:, None], torch.ones_like(mixed), mixed)
    log_noisy = torch.log(mixed) - torch.log(e.sum(1, keepdim=True))
    if redo is not None:
        log_t = torch.log(tr)
        step = max(1, (1 << 24) // (c * c))
        for r0 in range(0, redo.numel(), step):
            rows_i = redo[r0:r0 + step]
            zr = z[rows_i]
            exact = (torch.logsumexp(zr[:, :, None] + log_t[None], dim=1)
                     - torch.logsumexp(zr, 1, keepdim=True))
            log_noisy = log_noisy.index_put((rows_i,), exact)
    if targets.dtype == torch.int64:
        if targets.shape != (n,):
            raise ValueError(f"targets must have shape ({n},) or ({n}, {c}) (got {tuple(targets.shape)})")
        if n and not torch.compiler.is_compiling() and bool(((targets < 0) | (targets >= c)).any()):
            raise ValueError(f"targets must be in [0, {c})")
        rows = -log_noisy.gather(1, targets[:, None]).squeeze(1)
    else:
        if targets.shape != (n, c):
            raise ValueError(f"targets must have shape ({n},) or ({n}, {c}) (got {tuple(targets.shape)})")
        t = targets.to(acc)
        rows = -torch.where(t == 0, torch.zeros_like(t), t * log_noisy).sum(1)
    return reduce_rows(rows, rows.shape, None, reduction)


DISTANCE_OPS = ("l1", "l2", "smooth_l1", "kl", "cosine", "pearson")


def distance(student: Tensor, teacher: Tensor, op: str, *, dim: int = -1,
             temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    r"""Fused distances between student and teacher outputs, for searched distillers (docs/math.md §7).

    ``op``:

    * ``"l1"``, ``"l2"`` (squared error), ``"smooth_l1"`` (β = 1): elementwise, exactly
      ``F.l1_loss`` / ``F.mse_loss`` / ``F.smooth_l1_loss``; ``mean`` averages over all
      elements, ``none`` returns the elementwise tensor (plain PyTorch: nothing to fuse).
    * ``"kl"``: forward KL(teacher‖student) of ``softmax(·/T)`` over ``dim``, T²-scaled —
      exactly :func:`kd_loss` on the rows along ``dim``.
    * ``"cosine"``: 1 − ⟨s, t⟩ / (‖s‖‖t‖ + ε) per row along ``dim``, ε = 1e-8.
    * ``"pearson"``: 1 − ρ per row, ρ the cosine of the centred rows; ``dim=0`` is the
      "intra" (per-class, across the batch) form of DIST. A constant row (zero variance)
      has ρ = 0 and a zero gradient — defined and finite.

    For kl / cosine / pearson, ``mean`` averages over rows and ``none`` returns one value
    per row, shaped like the input without ``dim``. Inputs of any rank: logits (N, C),
    features (N, C, H, W). Gradients flow to the student and, when it requires grad, the
    teacher. Results are fp32 (fp64 for fp64 inputs) and deterministic. An empty input
    (no element, or no row) gives 0 for "mean" and "sum"; kl / cosine / pearson need at
    least one element along ``dim`` (else ValueError).
    """
    check_choice("op", op, DISTANCE_OPS)
    check_choice("reduction", reduction, REDUCTIONS)
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the shape of student "
                         f"(got {tuple(teacher.shape)} and {tuple(student.shape)})")
    if student.dim() == 0:
        raise ValueError("student must have at least one dimension")
    if not -student.dim() <= dim < student.dim():
        raise ValueError(f"dim must be in [{-student.dim()}, {student.dim() - 1}] (got {dim})")
    if op in ("kl", "cosine", "pearson"):
        check_classes("student", student, dim, "element")
    s, t = student, teacher
    if (s.dtype == torch.float64) != (t.dtype == torch.float64):
        s, t = s.double(), t.double()
    if op in ("l1", "l2", "smooth_l1"):
        if reduction == "none":
            d = s.float() - t.float() if s.dtype != torch.float64 else s - t
            return {"l1": d.abs(), "l2": d * d,
                    "smooth_l1": torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5)}[op]
        total = pointwise_distance_forward(s, t, op)
        return total if reduction == "sum" else total / max(s.numel(), 1)
    dim = dim % s.dim()
    if op == "kl":
        rows_s = s.movedim(dim, -1)
        return kd_loss(rows_s, t.movedim(dim, -1), temperature=temperature, reduction=reduction)
    outer = math.prod(s.shape[:dim])
    inner = math.prod(s.shape[dim + 1:])
    shape3 = (outer, s.shape[dim], inner)
    rows, _ = correlation_distance_forward(s.reshape(shape3), t.reshape(shape3), op == "pearson")
    lead = s.shape[:dim] + s.shape[dim + 1:]
    return reduce_rows(rows.reshape(lead), lead, None, reduction)


def sparse_kd_loss(
    student_logits: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    *,
    teacher_tail_logprob: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    normalizer: Optional[Union[float, Tensor]] = None,
    options: Optional[SparseKDOptions] = None,
    **fields,
) -> Tensor:
    r"""KD loss against a sparse (top-K) teacher, e.g. an offline cache (docs/math.md §4).

    The teacher is stored per row as its K kept classes :math:`I` and their
    log-probabilities :math:`\ell` (computed at the same temperature T, e.g. by
    :func:`distillkit.sparse_cache.write_teacher_topk`); it never exists as an N x C
    tensor. With the student :math:`q = \mathrm{softmax}(z/T)` over all C classes and
    the kept set :math:`V = \{k : I_k \ge 0\}`:

    .. math::
        \tilde p_k = \frac{e^{\ell_k}}{\sum_{k' \in V} e^{\ell_{k'}}} \;\text{(renormalize)}
        \quad\text{or}\quad e^{\ell_k}, \qquad
        \text{row} = s \sum_{k \in V} \tilde p_k (\log \tilde p_k - \log q_{I_k}),

    :math:`s = T^2` if ``scale_by_t2`` else 1, and
    :math:`\partial\,\text{row} / \partial z_j = s\,(q_j \sum_k \tilde p_k - \sum_k \tilde p_k
    [I_k = j]) / T`. ``renormalize=True`` (default) drops the teacher's tail and rescales
    the kept mass to 1: with K = C it equals :func:`kd_loss` (forward KL) exactly.
    ``renormalize=False`` keeps the raw kept probabilities and ignores the tail (the row
    is then the kept part of KL(p‖q), which is not a divergence by itself).

    **Tail bucket** (``teacher_tail_logprob`` given, docs/math.md §4.1): the teacher's
    mass outside its K classes, :math:`\lambda = \log(1 - \sum_k e^{\ell_k})` (from
    the cache), is a (K + 1)-th bucket, and so is the student's,
    :math:`Q_\text{tail} = 1 - \sum_k q_{I_k}` (formed as ``log(1 - sum)``): both
    distributions are complete and the row is ``s * D(P, Q)`` over the K + 1 buckets
    for ``divergence`` ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (β as in
    :func:`kd_loss`; β = 0 / 1 are forward / reverse KL). ``renormalize`` then
    rescales the K + 1 teacher buckets to sum 1 (absorbing the cache's rounding).
    Reverse KL and JSD need the tail (a ValueError without it).

    Args:
        student_logits: (..., C) student logits z; each leading position is a row.
        teacher_indices: (..., K) int64 or int32 kept classes; -1 marks padding (skipped:
            fewer than K kept classes, or a position without a teacher).
        teacher_logprobs: (..., K) teacher log-probabilities of those classes (any float
            dtype, fp16 caches included; values at padding are never read). The cache
            is data: no gradient flows to it.
        teacher_tail_logprob: optional (...) log of the teacher's probability mass
            outside its kept classes (-inf: none), in ``teacher_logprobs``' dtype (cast
            here otherwise); see the tail bucket above.
        labels: optional (...) int64; rows whose label is ``ignore_index`` are skipped
            (only compared with ``ignore_index``: there is no hard term; add
            ``F.cross_entropy`` for one).
        weight: optional (...) per-row weights.
        normalizer: replaces the mean's denominator (e.g. the token count across
            gradient-accumulation steps and ranks); a positive number or 0-d tensor,
            only with reduction="mean".
        options: a :class:`~distillkit.SparseKDOptions`; ``**fields`` (its field names)
            build one or override those of ``options``:
            ``temperature`` T > 0 (finite), applied to the student only;
            ``renormalize``: softmax over the kept entries (True) or raw exp(ℓ) (False);
            ``ignore_index``: label value marking rows to skip;
            ``reduction``: "mean" (Σ w·row over live rows / number of live rows, not
            / Σ w), "sum", or "none" (per-row losses with the leading shape). A row is
            dead, gives 0 and leaves the mean's denominator when its label is
            ``ignore_index`` or all of its K indices are -1;
            ``scale_by_t2``: multiply the row by T**2;
            ``check_duplicates``: check that no row repeats a class (an error if one
            does; on the CPU a sort of the N x K indices, on CUDA O(K^2 / threads)
            compares per row in the kernel, raised as :func:`distillkit.ops.check_errors`
            says); pass False for indices known to be unique (e.g. from ``topk``), and
            results with repeats are then undefined. Indices out of [0, C) other than
            -1 are always an error.

    Returns:
        The loss: fp32 for fp32/bf16/fp16 inputs (fp64 if either float input is fp64);
        the gradient comes back in the student's dtype. An empty or all-dead batch gives 0.

    Conventions: accumulation is fp32 whatever the dtypes (mixed student/teacher dtypes
    are fine); the student's log-softmax is taken as z/T − lse, never log of a
    probability; a kept entry with ℓ = −inf contributes nothing (0·log 0 = 0), a
    student −inf at a kept class with mass gives +inf, and a renormalized row whose kept
    ℓ are all −inf is NaN, as in :func:`distillkit.reference.sparse_kd_loss_ref`.
    Deterministic on CPU and CUDA (no atomics). Cost per row: one pass over z for the
    log-sum-exp, K gathers, and in backward one pass writing dz (recomputed from z and
    three saved per-row statistics, no N x C buffer kept).
    """
    opts = SparseKDOptions.resolve(options, **fields)
    check_normalizer(normalizer, opts.reduction, student_logits.device)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (..., C)")
    check_classes("student_logits", student_logits)
    lead = student_logits.shape[:-1]
    check_topk_teacher(teacher_indices, teacher_logprobs, teacher_tail_logprob, lead,
                       "student_logits' device", student_logits.device,
                       student_logits.shape[-1], opts)
    z = student_logits.reshape(math.prod(lead), student_logits.shape[-1])
    idx = teacher_indices.reshape(z.shape[0], teacher_indices.shape[-1]).long()
    lp = teacher_logprobs.reshape(idx.shape)
    # fp64 on either side means an fp64 computation (the kernels pair fp64 with fp64).
    if (z.dtype == torch.float64) != (lp.dtype == torch.float64):
        z, lp = z.double(), lp.double()
    tail = (teacher_tail_logprob.reshape(-1).to(lp.dtype)
            if teacher_tail_logprob is not None else None)
    y = flat_labels(labels, lead, z.device)
    rows, _ = sparse_kd_loss_forward(z, idx, lp, y, opts, tail)
    denominator = None
    if opts.reduction == "mean":
        denominator = (normalizer if normalizer is not None
                       else live_topk_rows(idx, y, opts.ignore_index).clamp(min=1))
    return reduce_rows(rows, lead, weight, opts.reduction, denominator)


def check_topk_teacher(teacher_indices: Tensor, teacher_logprobs: Tensor,
                       teacher_tail_logprob: Optional[Tensor], lead, device_name: str,
                       device: torch.device, classes: int, opts: SparseKDOptions) -> None:
    """The checks of a cached top-K teacher against the student's leading shape ``lead``,
    ``device`` (named ``device_name`` in the errors) and ``classes``: (..., K) int64/int32
    indices, log-probabilities of their shape, an optional (...) log tail, and the
    options' own checks that need them (:meth:`SparseKDOptions.check_inputs`)."""
    if teacher_indices.dim() < 1 or teacher_indices.shape[:-1] != lead:
        raise ValueError(f"teacher_indices must have shape {tuple(lead)} + (K,) "
                         f"(got {tuple(teacher_indices.shape)})")
    check_classes("teacher_indices", teacher_indices, what="kept class (K >= 1)")
    for name, tensor in (("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        if tensor.device != device:
            raise ValueError(f"{name} must be on {device_name} {device} (got {tensor.device})")
    if teacher_logprobs.shape != teacher_indices.shape:
        raise ValueError("teacher_logprobs must have the shape of teacher_indices "
                         f"(got {tuple(teacher_logprobs.shape)} and "
                         f"{tuple(teacher_indices.shape)})")
    if teacher_indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher_indices must be int64 or int32 (got {teacher_indices.dtype})")
    opts.check_inputs(teacher_tail_logprob is not None, teacher_indices.shape[-1], classes)
    if teacher_tail_logprob is not None:
        check_row_tensor("teacher_tail_logprob", teacher_tail_logprob, lead, device,
                         floating=True)


def live_topk_rows(idx: Tensor, y: Optional[Tensor], ignore_index: int) -> Tensor:
    """The number of rows a top-K loss's mean divides by: a row with no kept class is dead
    too, not only one whose label is ``ignore_index``."""
    live = (idx >= 0).any(-1)
    if y is not None:
        live = live & (y != ignore_index)
    return live.sum()
