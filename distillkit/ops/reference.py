"""Pure-PyTorch references, the oracle for tests and benchmarks.

Written for clarity, not speed: each op is its docs/math.md formula in plain tensor
ops, accumulating in fp32 (fp64 for fp64 inputs). They allocate several N x C
temporaries, which is exactly what the fused kernels avoid.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .options import KDOptions, SLaMOptions, SparseKDOptions

__all__ = ["kd_loss_ref", "slam_loss_ref", "topk_mask_ref", "forward_corrected_loss_ref",
           "distance_ref", "DISTANCE_OPS", "sparse_kd_loss_ref", "coordinate_lstm_step_ref"]


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


def _reduce_kd_rows_ref(rows: Tensor, counted: Tensor, weight: Optional[Tensor], reduction: str,
                        normalizer: Optional[Union[float, Tensor]], shape) -> Tensor:
    """The reduction of per-row losses (docs/math.md §1.3): weighted rows; ``mean`` divides by the
    ``counted`` (non-ignored) rows unless ``normalizer`` is given, never by Σ weight."""
    if weight is not None:
        rows = rows * weight.reshape(-1).to(rows.dtype)
    if reduction == "none":
        return rows.reshape(shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (normalizer if normalizer is not None else counted.sum().clamp(min=1))


def kd_loss_ref(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    normalizer: Optional[Union[float, Tensor]] = None,
    options: Optional[KDOptions] = None,
    **fields,
) -> Tensor:
    """Reference for :func:`distillkit.kd_loss` (same arguments, docs/math.md §1)."""
    o = KDOptions.resolve(options, **fields)
    temperature, hard_weight, ignore_index = o.temperature, o.hard_weight, o.ignore_index
    acc = _acc_dtype(student_logits, teacher_logits)
    C = student_logits.shape[-1]
    z = student_logits.reshape(-1, C).to(acc)
    u = teacher_logits.reshape(-1, C).to(acc)
    log_q = torch.log_softmax(z / temperature, dim=-1)
    log_p = torch.log_softmax(u / temperature, dim=-1)
    soft = _soft_rows(log_q, log_p, o.divergence, o.beta)
    rows = (1.0 - hard_weight) * (temperature**2 if o.scale_by_t2 else 1.0) * soft
    keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if labels is not None:
        y = labels.reshape(-1)
        keep = y != ignore_index
        if hard_weight > 0:
            safe_y = torch.where(keep, y, torch.zeros_like(y))
            ce = -torch.log_softmax(z, dim=-1).gather(1, safe_y[:, None]).squeeze(1)
            rows = rows + hard_weight * ce
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    return _reduce_kd_rows_ref(rows, keep, weight, o.reduction, normalizer,
                               student_logits.shape[:-1])


def topk_mask_ref(teacher_probs: Tensor, k: Tensor) -> Tensor:
    """(N, C) bool mask of each row's k largest entries, ties to the lower class index."""
    n, c = teacher_probs.shape
    # A stable descending sort keeps equal values in index order.
    order = torch.sort(teacher_probs, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(c, device=order.device).expand(n, c))
    return rank < k.reshape(-1, 1)


def slam_loss_ref(
    student_logits: Tensor,
    teacher_probs: Tensor,
    alpha: Union[float, Tensor],
    k: Union[int, Tensor],
    *,
    weight: Optional[Tensor] = None,
    options: Optional[SLaMOptions] = None,
    **fields,
) -> Tensor:
    """Reference for :func:`distillkit.slam_loss` (docs/math.md §5), the mixture formed explicitly."""
    o = SLaMOptions.resolve(options, **fields)
    acc = _acc_dtype(student_logits, teacher_probs)
    z = student_logits.to(acc)
    t = teacher_probs.to(acc)
    n, c = z.shape
    alpha = torch.as_tensor(alpha, dtype=acc, device=z.device).expand(n).reshape(n, 1)
    k = torch.as_tensor(k, dtype=torch.int64, device=z.device).expand(n)
    mask = topk_mask_ref(t, k).to(acc)
    cc = 1.0 / (k - 1).clamp(min=1).to(acc).reshape(n, 1) if o.normalized else 1.0
    log_f = torch.log_softmax(z, dim=1)
    # log q = logaddexp(log(alpha f), log(b (1 - f))) with b = (1 - alpha) c M: exact when
    # f underflows or rounds to 1. The double `where` keeps masked-out logs from
    # turning a zero gradient into 0 * inf = NaN.
    one_minus_f = -torch.expm1(log_f)
    b = (1 - alpha) * cc * mask
    live = (one_minus_f > 0) & (b > 0)
    log_b_rest = torch.where(live, torch.log(torch.where(live, b * one_minus_f, torch.ones_like(b))),
                             torch.full_like(b, float("-inf")))
    log_q = torch.logaddexp(torch.log(alpha) + log_f, log_b_rest)
    if o.hard:
        target = torch.zeros_like(t).scatter_(1, t.argmax(1, keepdim=True), 1.0)
    else:
        target = t
    rows = -torch.where(target == 0, torch.zeros_like(log_q), target * log_q).sum(1)
    if weight is not None:
        rows = rows * weight.to(acc)
    if o.reduction == "none":
        return rows
    return rows.sum() if o.reduction == "sum" else rows.sum() / max(n, 1)


def forward_corrected_loss_ref(student_logits: Tensor, targets: Tensor, transition: Tensor,
                               reduction: str = "mean") -> Tensor:
    """Reference for :func:`distillkit.forward_corrected_loss`: CE(targets, Tᵀ f) with the
    noisy-label distribution formed explicitly."""
    acc = _acc_dtype(student_logits, transition)
    f = torch.softmax(student_logits.to(acc), dim=1)
    log_noisy = torch.log(f @ transition.to(acc))
    if targets.dtype == torch.int64:
        rows = -log_noisy.gather(1, targets[:, None]).squeeze(1)
    else:
        t = targets.to(acc)
        rows = -torch.where(t == 0, torch.zeros_like(t), t * log_noisy).sum(1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


DISTANCE_OPS = ("l1", "l2", "smooth_l1", "kl", "cosine", "pearson")
_EPS = 1e-8


def _rows_last(x: Tensor, dim: int) -> Tensor:
    """x with `dim` moved last and flattened to rows: (rows, D)."""
    x = x.movedim(dim, -1)
    return x.reshape(-1, x.shape[-1])


def _correlation_distance(s: Tensor, t: Tensor, center: bool) -> Tensor:
    """1 − ⟨u, v⟩ / (‖u‖‖v‖ + ε) per row; a row with ‖u‖ = 0 or ‖v‖ = 0 has distance 1 and
    zero gradient (docs/math.md §7.3)."""
    u = s - s.mean(-1, keepdim=True) if center else s
    v = t - t.mean(-1, keepdim=True) if center else t
    nu, nv = u.norm(dim=-1), v.norm(dim=-1)
    degenerate = (nu == 0) | (nv == 0)
    denom = torch.where(degenerate, torch.ones_like(nu), nu * nv + _EPS)
    rho = torch.where(degenerate, torch.zeros_like(nu), (u * v).sum(-1) / denom)
    return 1 - rho


def distance_ref(student: Tensor, teacher: Tensor, op: str, *, dim: int = -1,
                 temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Reference for :func:`distillkit.distance` (docs/math.md §7).

    l1 / l2 / smooth_l1 are elementwise (``F.l1_loss``, ``F.mse_loss``,
    ``F.smooth_l1_loss`` with beta = 1; ``mean`` over elements, ``none`` elementwise);
    kl / cosine / pearson work on rows along ``dim`` (``mean`` over rows, ``none`` one
    value per row, with the input's shape less ``dim``).
    """
    acc = _acc_dtype(student, teacher)
    s, t = student.to(acc), teacher.to(acc)
    if op in ("l1", "l2", "smooth_l1"):
        fn = {"l1": torch.nn.functional.l1_loss, "l2": torch.nn.functional.mse_loss,
              "smooth_l1": torch.nn.functional.smooth_l1_loss}[op]
        return fn(s, t, reduction=reduction)
    out_shape = s.movedim(dim, -1).shape[:-1]
    if op == "kl":
        rows = kd_loss_ref(_rows_last(s, dim), _rows_last(t, dim), temperature=temperature,
                           reduction="none")
    else:
        rows = _correlation_distance(_rows_last(s, dim), _rows_last(t, dim), op == "pearson")
    if reduction == "none":
        return rows.reshape(out_shape)
    return rows.sum() if reduction == "sum" else rows.sum() / max(rows.numel(), 1)


def sparse_kd_loss_ref(
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
    """Reference for :func:`distillkit.sparse_kd_loss` (same arguments, docs/math.md §4).

    Forms the full (N, C) student log-softmax and gathers it at the kept classes; with
    ``teacher_tail_logprob`` the student's tail bucket is the log-sum-exp of its
    log-softmax over the classes outside the kept set (exact, no cancellation), and the
    divergence is taken over the K + 1 buckets. ``check_duplicates`` is accepted for
    signature parity and not checked here.
    """
    o = SparseKDOptions.resolve(options, **fields)
    o.check_tail(teacher_tail_logprob is not None)
    temperature, ignore_index = o.temperature, o.ignore_index
    acc = _acc_dtype(student_logits, teacher_logprobs)
    C, K = student_logits.shape[-1], teacher_indices.shape[-1]
    z = student_logits.reshape(-1, C).to(acc)
    idx = teacher_indices.reshape(-1, K).long()
    lp = teacher_logprobs.reshape(-1, K).to(acc)
    live_row = (idx >= 0).any(-1)
    if labels is not None:
        live_row = live_row & (labels.reshape(-1) != ignore_index)
    live = (idx >= 0) & live_row[:, None]
    neg_inf = torch.full_like(lp, float("-inf"))
    log_p = torch.where(live, lp, neg_inf)
    log_q_all = torch.log_softmax(z / temperature, dim=-1)
    log_q = log_q_all.gather(1, idx.clamp(min=0))
    scale = temperature**2 if o.scale_by_t2 else 1.0
    if teacher_tail_logprob is None:
        if o.renormalize:
            # Dead rows get a finite dummy row so that their (masked) softmax is not NaN.
            log_p = torch.log_softmax(torch.where(live_row[:, None], log_p,
                                                  torch.zeros_like(lp)), -1)
            log_p = torch.where(live, log_p, neg_inf)
        rows = scale * _plogp_ratio(log_p.exp(), log_p, log_q)
    else:
        tail = teacher_tail_logprob.reshape(-1, 1).to(acc)
        # A dead row's buckets are all -inf but a certain tail on both sides: loss 0 and
        # a finite (zero) gradient whatever the divergence.
        log_p = torch.cat([log_p, torch.where(live_row[:, None], tail, torch.zeros_like(tail))], 1)
        if o.renormalize:
            log_p = torch.log_softmax(torch.where(live_row[:, None], log_p,
                                                  torch.zeros_like(log_p)), -1)
        kept = torch.zeros_like(z, dtype=torch.bool).scatter_(1, idx.clamp(min=0), live)
        log_q_tail = torch.logsumexp(torch.where(kept, torch.full_like(z, float("-inf")),
                                                 log_q_all), -1, keepdim=True)
        # Padding and dead rows: -inf on both sides, masked by the xlogy rule.
        log_q = torch.cat([torch.where(live, log_q, neg_inf), log_q_tail], 1)
        rows = scale * _soft_rows(log_q, log_p, o.divergence, o.beta)
        rows = torch.where(live_row, rows, torch.zeros_like(rows))
    return _reduce_kd_rows_ref(rows, live_row, weight, o.reduction, normalizer,
                               student_logits.shape[:-1])


def coordinate_lstm_step_ref(grad: Tensor, params: Tensor, h: Tensor, c: Tensor,
                             w_ih: Sequence[Tensor], w_hh: Sequence[Tensor],
                             bias: Sequence[Tensor], head_weight: Optional[Tensor] = None,
                             head_bias: Optional[Tensor] = None, *, preprocess_p: float = 10.0,
                             output_scale: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """One coordinate-wise LSTM optimizer step (docs/math.md §8), the oracle of ``coordinate_lstm_step``.

    Each of the P coordinates is one batch row of stacked ``nn.LSTMCell``s: the input is
    the preprocessed gradient (a, b), a = max(log(|g| + 1e-8) / p, -1),
    b = clamp(g e^p, -1, 1); layer l maps (P, in_l) to (P, H_l) with
    w_ih[l] (4H_l, in_l), w_hh[l] (4H_l, H_l), bias[l] (4H_l,) (= b_ih + b_hh), gate
    order i, f, g, o. out = h_L @ head_weight.T + head_bias (or h_L, H_L = 1, without
    a head), and params_out = params + output_scale * out. h and c are packed
    (P, sum_l H_l), layer l's columns after those of the layers below.
    """
    a = torch.clamp(torch.log(grad.abs() + 1e-8) / preprocess_p, min=-1.0)
    b = torch.clamp(grad * math.exp(preprocess_p), -1.0, 1.0)
    x = torch.stack([a, b], dim=1)
    sizes = [w.shape[1] for w in w_hh]
    h_out, c_out = [], []
    for h_l, c_l, wi, wh, bl in zip(h.split(sizes, 1), c.split(sizes, 1), w_ih, w_hh, bias):
        i, f, g, o = (x @ wi.T + h_l @ wh.T + bl).chunk(4, dim=1)
        c_l = torch.sigmoid(f) * c_l + torch.sigmoid(i) * torch.tanh(g)
        x = torch.sigmoid(o) * torch.tanh(c_l)
        h_out.append(x)
        c_out.append(c_l)
    out = x @ head_weight.T + head_bias if head_weight is not None else x
    return params + output_scale * out.squeeze(1), torch.cat(h_out, 1), torch.cat(c_out, 1)
