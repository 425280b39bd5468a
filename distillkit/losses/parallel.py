r"""Vocabulary-parallel KD loss (docs/math.md §3): logits sharded on the class dimension.

Under tensor parallelism the lm head is split by vocabulary, so rank r of a
``torch.distributed`` group holds the columns ``[start_r, start_r + C_r)`` of every row
(``start_r`` = the widths of ranks 0..r−1, uneven widths allowed). The loss equals
:func:`distillkit.kd_loss` on the full logits, and so do the gradients: each rank gets
exactly its own columns of them.

How (per row; ``a_r, b_r`` the shard's lse of z/T and u/T): the fused ``kd_loss_forward``
runs on each shard; its stats give ``a_r``, ``b_r``, the shard's lse(z) at T = 1, and for
the KL divergences the shard's cross term ``Σ_shard p^r (u − z)/T = D_teacher + b_r − a_r``
(``p^r`` the shard-normalized softmax; reverse KL likewise with q). One all-gather of those
per-row numbers lets every rank form the global statistics in the kernels' own layout,
``[lse(z/T), lse(u/T), lse(z), D_student, D_teacher]``:
``A = logsumexp_r a_r``, ``B = logsumexp_r b_r``, and forward KL
``Σ_r e^{b_r − B}·cross_r − B + A`` (reverse KL symmetric). ``kd_loss_backward`` reads only
those global numbers and the rank's own logits, so given the global stats it writes
exactly this rank's columns of the global gradient — the backward needs no communication.

JSD's ``Σ p log(p/m)`` mixes the global normalizations of p and q inside the log, which
shard stats cannot undo. Exact combination: append to the shard one column holding the
mass of all other shards (``logsumexp_{r'≠r} a_r'`` for the student, ``b`` likewise for the
teacher). Softmax over those ``C_r + 1`` columns is the global p, q on the shard's columns
plus the rest's mass in the extra column, so a second fused ``jsd`` pass gives the
shard's global terms plus one per-row term for the extra column, which is subtracted.
The extra column is a coarse-graining of the other shards, so its term is at most the
whole divergence (data processing): the subtraction cancels no more than the loss
itself. The augmented shard holds z/T and u/T in the accumulation dtype (the rest mass
must not round to bf16) and runs at T = 1, chunked by rows.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import KD_STATS, kd_loss_backward, kd_loss_forward, reject_functorch
from ..ops.options import KDOptions
from .functional import kd_rows_inputs, reduce_kd_rows

__all__ = ["vocab_parallel_kd_loss"]

# The shard ops' ignore_index: never a column index, whatever the caller's ignore_index.
_LOCAL_IGNORE = -1
# The JSD pass's augmented shard copies (student and teacher) hold at most this many
# elements each: 16 MiB in fp32.
_JSD_CHUNK_ELEMENTS = 1 << 22
# Columns of a rank's per-row numbers in the forward all-gather.
_A, _B, _LSE1, _CROSS_S, _CROSS_T, _Z_Y = range(6)


def _resolve(opts: KDOptions) -> str:
    """JSD at beta = 0 / 1 is forward / reverse KL (docs/math.md §1.1), as in the kernels."""
    if opts.divergence == "jsd" and opts.beta in (0.0, 1.0):
        return "forward_kl" if opts.beta == 0.0 else "reverse_kl"
    return opts.divergence


def _all_gather(t: Tensor, group, world: int) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _weighted_cross(lse: Tensor, lse_global: Tensor, cross: Tensor) -> Tensor:
    """Σ_r e^{lse_r − lse} cross_r over ranks (dim 0); a shard with no mass adds 0, a row
    with no mass at all stays NaN (invalid input, as in kd_loss)."""
    w = torch.exp(lse - lse_global)
    return torch.where(w == 0, torch.zeros_like(cross), w * cross).sum(0)


def _shard_cross(d: Tensor, lse_own: Tensor, lse_other: Tensor) -> Tensor:
    """The shard's cross term D + lse_own − lse_other. The kernel's D is NaN when this
    side's shard has no mass (0/0; its weight in _weighted_cross is then 0) and when it
    has mass but the other side's shard is all −inf (inf − inf): that cross term is +inf."""
    inf = torch.full_like(d, float("inf"))
    return torch.where((lse_other == -inf) & (lse_own > -inf), inf, d + lse_own - lse_other)


def _xterm(p: Tensor, log_ratio: Tensor) -> Tensor:
    return torch.where(p == 0, torch.zeros_like(p), p * log_ratio)


def _jsd_shard_terms(z: Tensor, u: Tensor, y_fwd: Optional[Tensor], gathered: Tensor,
                     rank: int, temperature: float, beta: float) -> Tensor:
    """This shard's (n, 2) share [Σ_shard q log(q/m), Σ_shard p log(p/m)] of the global
    JSD terms, by the augmented-column pass described in the module docstring."""
    others = torch.arange(gathered.shape[0], device=gathered.device) != rank
    rest_a = torch.logsumexp(gathered[others, :, _A], 0)  # −inf for a single rank
    rest_b = torch.logsumexp(gathered[others, :, _B], 0)
    acc = gathered.dtype
    n, width = z.shape
    chunk = max(1, _JSD_CHUNK_ELEMENTS // (width + 1))
    augmented = KDOptions(temperature=1.0, divergence="jsd", beta=beta,
                          ignore_index=_LOCAL_IGNORE, scale_by_t2=False)
    stats = []
    for lo in range(0, n, chunk):
        rows = slice(lo, min(lo + chunk, n))
        # z/T and u/T run at T = 1, so the extra column is the rest's lse exactly.
        zc, uc = (torch.empty((rows.stop - lo, width + 1), dtype=acc, device=z.device)
                  for _ in range(2))
        zc[:, :width].copy_(z[rows]).div_(temperature)
        uc[:, :width].copy_(u[rows]).div_(temperature)
        zc[:, width], uc[:, width] = rest_a[rows], rest_b[rows]
        yc = y_fwd[rows] if y_fwd is not None else None
        _, st = kd_loss_forward(zc, uc, yc, augmented)
        stats.append(st)
    st = torch.cat(stats) if stats else gathered.new_zeros((0, KD_STATS.cols))
    log_q_rest = rest_a - st[:, KD_STATS.lse_student]
    log_p_rest = rest_b - st[:, KD_STATS.lse_teacher]
    q_rest, p_rest = log_q_rest.exp(), log_p_rest.exp()
    m_rest = beta * p_rest + (1.0 - beta) * q_rest
    log_m_rest = torch.log(torch.where(m_rest == 0, torch.ones_like(m_rest), m_rest))
    return torch.stack([st[:, KD_STATS.d_student] - _xterm(q_rest, log_q_rest - log_m_rest),
                        st[:, KD_STATS.d_teacher] - _xterm(p_rest, log_p_rest - log_m_rest)], 1)


def _shard_layout(z: Tensor, group) -> Tuple[int, int, List[int]]:
    """(rank, this shard's first global column, every rank's width), checked alike on
    every rank so that all of them raise together rather than hang in a collective."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shapes = _all_gather(torch.tensor(z.shape, dtype=torch.int64, device=z.device), group,
                         world).tolist()
    if len({rows for rows, _ in shapes}) != 1:
        raise ValueError("every rank must pass the same number of rows (got "
                         f"{[rows for rows, _ in shapes]} by rank)")
    widths = [width for _, width in shapes]
    if min(widths) < 1 and shapes[0][0] > 0:
        raise ValueError(f"every rank's shard must hold at least one class (got widths {widths})")
    return rank, sum(widths[:rank]), widths


class _VocabParallelKD(torch.autograd.Function):
    """Per-row global KD loss (N,) from this rank's (N, C_r) shards."""

    @staticmethod
    def forward(ctx, z, u, y, group, opts: KDOptions):
        rank, start, widths = _shard_layout(z, group)
        n, width = z.shape
        num_classes = sum(widths)
        kind = _resolve(opts)
        temperature, beta, hard_weight, ignore_index = (opts.temperature, opts.beta,
                                                        opts.hard_weight, opts.ignore_index)
        hard = y is not None and hard_weight > 0
        y_fwd = None
        owned = keep = None
        if y is not None:
            keep = y != ignore_index
            bad = keep & ((y < 0) | (y >= num_classes))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"labels must be global class indices in [0, {num_classes}) or "
                                 f"equal ignore_index={ignore_index} (labels[{i}] = {int(y[i])})")
            local = y - start
            owned = keep & (local >= 0) & (local < width)
            ignore = torch.full_like(y, _LOCAL_IGNORE)
            # Rows whose label another rank owns get the valid placeholder column 0: the
            # forward's own hard term is discarded, and the backward gives back the −1 the
            # kernel puts on column 0 (kernels validate every label, so no sentinel).
            y_fwd = torch.where(keep, torch.where(owned, local, torch.zeros_like(y)), ignore)
        # The first pass's KL kind only decides which cross term comes back; JSD needs
        # just the lse's here.
        first = "forward_kl" if kind == "jsd" else kind
        _, st = kd_loss_forward(z, u, y_fwd, opts.replace(divergence=first,
                                                          ignore_index=_LOCAL_IGNORE))
        a, b = st[:, KD_STATS.lse_student], st[:, KD_STATS.lse_teacher]
        mine = st.new_zeros((n, 6))
        mine[:, _A], mine[:, _B], mine[:, _LSE1] = a, b, st[:, KD_STATS.lse_student_t1]
        if kind == "forward_kl":
            mine[:, _CROSS_T] = _shard_cross(st[:, KD_STATS.d_teacher], b, a)
        elif kind == "reverse_kl":
            mine[:, _CROSS_S] = _shard_cross(st[:, KD_STATS.d_student], a, b)
        if hard:
            z_y = z.gather(1, y_fwd.clamp(min=0)[:, None])[:, 0].to(st.dtype)
            mine[:, _Z_Y] = torch.where(owned, z_y, torch.zeros_like(z_y))

        g = _all_gather(mine, group, len(widths))  # (R, n, 6), the same on every rank
        lse_s, lse_t = torch.logsumexp(g[:, :, _A], 0), torch.logsumexp(g[:, :, _B], 0)
        d_s = d_t = torch.zeros_like(lse_s)
        if kind == "forward_kl":
            d_t = _weighted_cross(g[:, :, _B], lse_t, g[:, :, _CROSS_T]) - lse_t + lse_s
            soft = d_t
        elif kind == "reverse_kl":
            d_s = _weighted_cross(g[:, :, _A], lse_s, g[:, :, _CROSS_S]) - lse_s + lse_t
            soft = d_s
        else:
            terms = _all_gather(_jsd_shard_terms(z, u, y_fwd, g, rank, temperature, beta),
                                group, len(widths)).sum(0)
            d_s, d_t = terms[:, 0], terms[:, 1]
            soft = beta * d_t + (1.0 - beta) * d_s
        soft_scale = (1.0 - hard_weight) * (temperature ** 2 if opts.scale_by_t2 else 1.0)
        rows = soft_scale * soft
        lse1 = lse_s
        if hard:
            lse1 = torch.logsumexp(g[:, :, _LSE1], 0)
            rows = rows + hard_weight * (lse1 - g[:, :, _Z_Y].sum(0))
        if keep is not None:
            rows = torch.where(keep, rows, torch.zeros_like(rows))
        stats = KD_STATS.stack(lse_student=lse_s, lse_teacher=lse_t, lse_student_t1=lse1,
                               d_student=d_s, d_teacher=d_t)

        foreign = keep & ~owned if hard else None
        ctx.save_for_backward(z, u, y_fwd, stats, foreign)
        ctx.options = opts.replace(divergence=kind, ignore_index=_LOCAL_IGNORE)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        z, u, y, stats, foreign = ctx.saved_tensors
        teacher_grad = ctx.needs_input_grad[1]
        # Global stats make the shard kernel write this rank's columns of the global
        # gradient: no communication.
        grad_z, grad_u = kd_loss_backward(grad_rows.contiguous(), z, u, y, stats,
                                          ctx.options, teacher_grad)
        if foreign is not None:
            # The hard term's −hard_weight·g on the placeholder column belongs to another
            # rank's column: add it back (in the accumulation dtype, then round once).
            back = torch.where(foreign, ctx.options.hard_weight * grad_rows.to(stats.dtype),
                               torch.zeros((), dtype=stats.dtype))
            grad_z[:, 0] = (grad_z[:, 0].to(stats.dtype) + back).to(grad_z.dtype)
        return (grad_z if ctx.needs_input_grad[0] else None,
                grad_u if teacher_grad else None) + (None,) * 3


def vocab_parallel_kd_loss(
    student_shard: Tensor,
    teacher_shard: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    labels: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    normalizer: Optional[Union[float, Tensor]] = None,
    options: Optional[KDOptions] = None,
    **fields,
) -> Tensor:
    r""":func:`distillkit.kd_loss` of logits sharded on the class dimension across the
    ranks of a ``torch.distributed`` process group (vocabulary / tensor parallelism).

    Every rank of ``group`` calls this collectively with its own shard: rank r holds the
    global columns ``[start_r, start_r + C_r)``, ``start_r = C_0 + … + C_{r−1}``, in rank
    order. Widths may be uneven (C = 10 over 3 ranks as 4 + 3 + 3); each must be ≥ 1.
    The result is the loss of ``kd_loss`` on the concatenated logits — the same value on
    every rank — and backward gives each rank exactly its columns of ``kd_loss``'s
    gradient for the student shard and, when ``teacher_shard`` requires grad (mutual /
    online distillation), for the teacher shard (None otherwise, at no cost).

    Args:
        student_shard: (..., C_r) this rank's columns of the student logits z.
        teacher_shard: (..., C_r) the same columns of the teacher logits u.
        group: the process group the vocabulary is split over (default: the world).
        labels: optional (...) int64 **global** class indices in [0, C) or
            ``ignore_index``; replicated (the same on every rank), as is ``weight``.
            The hard term's label logit is taken from the rank that owns the column.
        weight, normalizer, options, **fields: those of :func:`distillkit.kd_loss`, with its math,
        ``ignore_index`` row masking, weights, reductions and ``normalizer`` (which,
        being replicated, is the global token count only if the caller makes it so).

    Communication per call, all on small per-row numbers (no N × C traffic): forward,
    one all-gather of the ranks' shapes (2 ints each), one all-gather of an (N, 6) array
    of row statistics per rank (shard lse's of z/T, u/T and z, the shard cross term, the
    label logit), and for JSD (0 < β < 1) one more of (N, 2); backward, none — each rank
    runs the fused backward kernel on its shard with the global statistics. Every rank
    sums the gathered numbers in rank order, so all ranks agree bit for bit.

    Memory: besides the gradients, the forward keeps only (N, 5) global stats for the
    backward (the shard logits themselves are saved, not copied) and gathers R × N × 6
    numbers. JSD adds, per chunk of rows, a copy of the student and teacher shards with
    one extra column in the accumulation dtype (at most 2²² elements each). Gradients flow
    only through this function's autograd node (the collectives are not differentiated).
    """
    opts = KDOptions.resolve(options, **fields)
    if opts.teacher_vocab != "exact":
        # Padding rows sit at the end of the global vocabulary, not of every shard.
        raise ValueError("teacher_vocab must be 'exact' for vocab_parallel_kd_loss (got "
                         f"{opts.teacher_vocab!r}); drop the teacher's padding columns from the "
                         "last rank's shard")
    z, u, y, lead = kd_rows_inputs(student_shard, teacher_shard, labels, opts, normalizer)
    reject_functorch("vocab_parallel_kd_loss")
    rows = _VocabParallelKD.apply(z, u, y, group, opts)
    return reduce_kd_rows(rows, lead, y, weight, opts, normalizer)
