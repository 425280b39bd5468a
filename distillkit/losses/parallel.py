r"""Vocabulary-parallel KD loss (docs/math.md §3): logits sharded on the class dimension.

Under tensor parallelism the lm head is split by vocabulary, so rank r of a
``torch.distributed`` group holds the columns ``[start_r, start_r + C_r)`` of every row
(``start_r`` = the widths of ranks 0..r−1, uneven widths allowed). The loss equals
:func:`distillkit.kd_loss` on the full logits, and so do the gradients: each rank gets
exactly its own columns of them.

How (per row): the fused ``kd_loss_forward`` on each shard gives the shard's lse of z/T,
u/T and z; one all-gather of those lets every rank form the global ``A = lse(z/T)``,
``B = lse(u/T)`` and lse(z). The divergence itself is never formed as cross terms minus
lse differences, which cancel catastrophically where p ≈ q (a large T, or a student close
to its teacher at any T): it is the cancellation-free form of the kernels (docs/math.md
§1.5), whose every ``E_b[·]`` is a sum over the ranks of the shards' partial sums under
the global lse. With ``c = B − A`` as rounded and ``e = (u − z)/T − c``:

* KL(p‖q) has base q: ``X = E_q[expm1(e)]``, ``W = E_q[w(e)]``, ``w(e) = 1 + (e − 1)e^e``,
  ``KL = W/(1+X) + X/(1+X) − log1p(X)``, from one all-gather of (N, 4) partials
  ``[Σ q, Σ p, Σ q expm1(e), Σ q w(e)]``; reverse KL is the same with base p.
* JSD needs ``rp = log p − log q`` to full precision: the offset
  ``lse(u/T) − lse(z/T) = c + log1p(X)`` from one all-gather of (N, 3)
  ``[Σ q, Σ p, Σ q expm1(e)]``, then ``KL(p‖m) = E_p[φ((1−β) expm1(−rp))]``,
  ``KL(q‖m) = E_q[φ(β expm1(rp))]``, ``φ(y) = y − log1p(y)``, from one more of (N, 2).

``Σ q`` and ``Σ p`` (≈ 1) give the lse's of the logits as scaled here to full precision,
``A + log Σ q``, kept as that unrounded pair: a rounded lse is off by ε|lse| (2.4e−4 at
|lse| = 4000 in fp32, T = 1e−3), and the shard kernels may scale by 1/T with another
rounding. JSD's shares use them, since they form p and q here; the backward kernel does
not need them (it scales the logits as the shard kernels did, under which A and B are the
rows' lse's: see the forward). The partial sums are formed in row chunks in the
accumulation dtype; every rank sums the gathered numbers in rank order, so all of them
agree bit for bit.

``kd_loss_backward`` reads only the stats and the rank's own logits, so given the global
stats it writes this rank's columns of the global gradient without communication. That
holds on the rows of its cancellation-free pass too (where p ≈ q), because the pass does
not reduce over its row: it reads ``rp``'s offset ``c + log1p(X)`` from the stats column
``log_ratio_offset``, which the forward here fills with the global one.

No host sync on CUDA: the labels are checked against the global vocabulary by the
``check_labels`` op (a CUDA kernel records a bad one, raised at a later distillkit call or
by ``distillkit.ops.check_errors``); the only host values are the shard shapes, exchanged
as a CPU tensor where the group carries CPU tensors (see ``_shard_layout``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _C
from ..ops import KD_STATS, check_labels, kd_loss_backward, kd_loss_forward, reject_functorch
from ..ops.options import KDOptions
from .functional import kd_rows_inputs, reduce_kd_rows

__all__ = ["vocab_parallel_kd_loss"]

# The shard ops' ignore_index: never a column index, whatever the caller's ignore_index.
_LOCAL_IGNORE = -1
# Each temporary of the PyTorch passes (row chunks in the accumulation dtype) holds at most
# this many elements, 4 MiB in fp32; a pass keeps about ten of them alive.
_CHUNK_ELEMENTS = 1 << 20
# Columns of a rank's per-row numbers in the first all-gather.
_A, _B, _LSE1, _Z_Y = range(4)


def _series(terms: int) -> List[float]:
    """(n − 1)/n! for n = 2..terms + 1: w(e)'s coefficients, as RatioWeightSeries builds them."""
    return [(n - 1) / math.factorial(n) for n in range(2, terms + 2)]


# The kernels' series lengths (kRatioWeightTerms64/32, kLog1pGapTerms64/32 of
# csrc/kd_loss.h): the truncation is below the dtype's rounding for the arguments they
# get, |e| <= 1/2 and φ's y in [-0.4, 1/2] (β expm1(rp) and (1 − β) expm1(−rp), |rp| <= 1/2).
_RATIO_WEIGHT = {dtype: _series(terms)
                 for dtype, terms in zip((torch.float64, torch.float32), _C.kd_ratio_weight_terms)}
_LOG1P_GAP_TERMS = dict(zip((torch.float64, torch.float32), _C.kd_log1p_gap_terms))


def _resolve(opts: KDOptions) -> str:
    """JSD at beta = 0 / 1 is forward / reverse KL (docs/math.md §1.1), as in the kernels."""
    if opts.divergence == "jsd" and opts.beta in (0.0, 1.0):
        return "forward_kl" if opts.beta == 0.0 else "reverse_kl"
    return opts.divergence


def _all_gather(t: Tensor, group, world: int) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _row_chunks(n: int, width: int) -> List[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [slice(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _scaled(x: Tensor, rows, acc: torch.dtype, temperature: float) -> Tensor:
    """Rows of logits / T in the accumulation dtype (one rounding, as the exact value's)."""
    return x[rows].to(acc) / temperature


def _masked(weight: Tensor, diff: Tensor) -> Tensor:
    """weight · diff, 0 where the weight is 0 (a −inf logit's 0 · ±inf)."""
    return torch.where(weight == 0, 0.0, weight * diff)


def _ratio_weight(e: Tensor) -> Tensor:
    """w(e) = 1 + (e − 1)e^e = Σ_{n≥2} (n − 1)/n! eⁿ by its series: for |e| ≤ 1/2, where
    the closed form cancels."""
    series = torch.zeros_like(e)
    for coef in reversed(_RATIO_WEIGHT[e.dtype]):
        series = series * e + coef
    return series * e * e


def _log1p_gap(y: Tensor) -> Tensor:
    """φ(y) = y − log1p(y) ≥ 0; for |y| ≤ 1/2 as y s − 2 s³ Σ_j s^{2j}/(2j + 3),
    s = y/(2 + y) (log1p(y) = 2 atanh(s)), which does not cancel."""
    s = y / (2 + y)
    s2 = s * s
    series = torch.zeros_like(y)
    for j in reversed(range(_LOG1P_GAP_TERMS[y.dtype])):
        series = series * s2 + 1.0 / (2 * j + 3)
    return torch.where(y.abs() <= 0.5, y * s - 2 * s * s2 * series, y - torch.log1p(y))


def _mixture_logs(rp: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    """(log q − log m, log p − log m) from rp = log p − log q, m = βp + (1 − β)q: log1p of a
    small expm1 near rp = 0 (full precision), a logaddexp of the weights beyond (no
    overflow), as MixtureLogs of csrc/cpu/kd_loss.cpp."""
    small = rp.abs() <= 0.5
    log_b, log_b1 = rp.new_tensor(math.log(beta)), rp.new_tensor(math.log1p(-beta))
    student = torch.where(small, -torch.log1p(beta * torch.expm1(rp)),
                          -torch.logaddexp(log_b1, log_b + rp))
    teacher = torch.where(small, -torch.log1p((1.0 - beta) * torch.expm1(-rp)),
                          -torch.logaddexp(log_b, log_b1 - rp))
    return student, teacher


def _ratio_partials(base: Tensor, other: Tensor, lse_base: Tensor, lse_other: Tensor,
                    c: Tensor, temperature: float, acc: torch.dtype, with_w: bool) -> Tensor:
    """This shard's (n, 4) ``[Σ b, Σ a, Σ b expm1(e), Σ b w(e)]`` (the last only
    ``with_w``, else (n, 3)) with ``b = exp(x − lse_base)``, ``a = exp(y − lse_other)``
    under the *global* lse's, x, y the base and other logits / T, ``e = (y − x) − c``:
    summed over ranks, X and W of docs/math.md §1.5 are the third and fourth totals over
    the first, and the first two are e^{lse − lse_base} of the logits as scaled here (the
    lse's themselves are the shard kernels', whose scaling may round differently). Beyond
    |e| > 1/2 the terms are ``be − b`` and ``b + (e − 1) be`` with ``be = b e^e`` formed as
    one exp (finite where e is large, and not 0 where b underflowed but the other side has
    mass)."""
    n, width = base.shape
    out = lse_base.new_empty((n, 4 if with_w else 3))
    for rows in _row_chunks(n, width):
        x, y = (_scaled(t, rows, acc, temperature) for t in (base, other))
        lse, ref = lse_base[rows, None], c[rows, None]
        b = torch.exp(x - lse)
        be = torch.exp((y - ref) - lse)
        e = (y - x) - ref
        small = e.abs() <= 0.5
        none = (b == 0) & (be == 0)  # −inf on both sides (or both underflowed)
        out[rows, 0] = b.sum(1)
        out[rows, 1] = torch.exp(y - lse_other[rows, None]).sum(1)
        out[rows, 2] = torch.where(small, b * torch.expm1(e), be - b).masked_fill(none, 0).sum(1)
        if with_w:
            w = torch.where(small, b * _ratio_weight(e), b + _masked(be, e - 1))
            out[rows, 3] = w.masked_fill(none, 0).sum(1)
    return out


def _ratio_totals(parts: Tensor) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """(X, W or None, log Σ b, log Σ a) from the gathered (R, n, k) ratio partials, summed
    over the ranks in rank order."""
    total = parts.sum(0)
    x = total[:, 2] / total[:, 0]
    w = total[:, 3] / total[:, 0] if total.shape[1] > 3 else None
    return x, w, torch.log(total[:, 0]), torch.log(total[:, 1])


def _kl(x: Tensor, w: Tensor) -> Tensor:
    """KL(a‖b) = W/(1+X) + X/(1+X) − log1p(X) (docs/math.md §1.5), the last two as
    φ(X) − X²/(1+X): X is about the rounding of the reference c (up to ε|lse|, not small
    next to a divergence of order 1e−11 at T = 1e6 in fp32), and X/(1+X) − log1p(X) would
    cancel to an error ε X instead of ε X²."""
    return w / (1 + x) + (_log1p_gap(x) - x * x / (1 + x))


def _jsd_partials(z: Tensor, u: Tensor, lse_s: Tensor, lse_t: Tensor, precise: Tensor,
                  temperature: float, beta: float, acc: torch.dtype) -> Tensor:
    """This shard's (n, 2) ``[Σ p φ((1−β) expm1(−rp)), Σ q φ(β expm1(rp))]`` of the global
    KL(p‖m), KL(q‖m), with ``rp = (u − z)/T − offset = log p − log q`` to full precision
    from the precise offset, and p, q normalized by the corrections (precise, see
    _log_probs). Beyond |rp| > 1/2 each term is taken as
    ``p (log p − log m) + (1 − β)(q − p)`` (likewise for q): its value, without the expm1
    overflowing; the added first-order terms sum to 0 over the whole row."""
    n, width = z.shape
    out = lse_s.new_empty((n, 2))
    for rows in _row_chunks(n, width):
        x, y = _scaled(z, rows, acc, temperature), _scaled(u, rows, acc, temperature)
        rp, log_q, log_p = _log_probs(x, y, lse_s[rows, None], lse_t[rows, None], precise[rows])
        p, q = torch.exp(log_p), torch.exp(log_q)
        small = rp.abs() <= 0.5
        log_qm, log_pm = _mixture_logs(rp, beta)
        d_t = torch.where(small, _masked(p, _log1p_gap((1.0 - beta) * torch.expm1(-rp))),
                          _masked(p, log_pm) + (1.0 - beta) * (q - p))
        d_s = torch.where(small, _masked(q, _log1p_gap(beta * torch.expm1(rp))),
                          _masked(q, log_qm) + beta * (p - q))
        out[rows, 0], out[rows, 1] = d_t.sum(1), d_s.sum(1)
    return out


def _log_probs(x: Tensor, y: Tensor, lse_s: Tensor, lse_t: Tensor,
               precise: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(rp, log q, log p) of rows of z/T, u/T from the forward's (rows, 3) ``precise``
    ``[lse(u/T) − lse(z/T), lse(z/T) − lse_s, lse(u/T) − lse_t]``: rp to full precision,
    and log q = (x − lse_s) − correction, whose first difference is exact where q is large
    (a rounded lse(z/T) would be off by ε|lse|, 2.4e−4 at |lse| = 4000 in fp32)."""
    rp = (y - x) - precise[:, 0, None]
    return rp, (x - lse_s) - precise[:, 1, None], (y - lse_t) - precise[:, 2, None]


def _shard_layout(z: Tensor, group) -> Tuple[int, List[int]]:
    """(this shard's first global column, every rank's width), checked alike on
    every rank so that all of them raise together rather than hang in a collective
    (under NCCL, all-gathers of unequal sizes hang or read garbage; they do not raise).

    The shapes are host values, and are exchanged as a CPU tensor where the group
    carries CPU tensors (gloo, or a ``"cpu:gloo,cuda:nccl"`` group): no device memory
    is read. A group with a device backend only (plain NCCL) exchanges them on the
    device, and reading the 2R integers back is this function's one device-to-host
    copy per call (made without any host-to-device copy: the tensor is filled there)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    pg = group if group is not None else dist.group.WORLD
    device = torch.device("cpu") if torch.device("cpu") in pg._device_types else z.device
    shape = torch.full((2,), z.shape[1], dtype=torch.int64, device=device)
    shape[:1].fill_(z.shape[0])
    shapes = _all_gather(shape, group, world).tolist()
    if len({rows for rows, _ in shapes}) != 1:
        raise ValueError("every rank must pass the same number of rows (got "
                         f"{[rows for rows, _ in shapes]} by rank)")
    widths = [width for _, width in shapes]
    if min(widths) < 1 and shapes[0][0] > 0:
        raise ValueError(f"every rank's shard must hold at least one class (got widths {widths})")
    return sum(widths[:rank]), widths


class _VocabParallelKD(torch.autograd.Function):
    """Per-row global KD loss (N,) from this rank's (N, C_r) shards."""

    @staticmethod
    def forward(ctx, z, u, y, group, opts: KDOptions):
        start, widths = _shard_layout(z, group)
        world = len(widths)
        n, width = z.shape
        num_classes = sum(widths)
        kind = _resolve(opts)
        temperature, beta, hard_weight, ignore_index = (opts.temperature, opts.beta,
                                                        opts.hard_weight, opts.ignore_index)
        hard = y is not None and hard_weight > 0
        y_fwd = None
        owned = keep = None
        bad = None
        if y is not None:
            # Labels against the global vocabulary (the shard kernels see only their
            # width): kd_loss's ValueError, raised at the call on the CPU and, from a
            # kernel's record, at a later call on CUDA (no host read). Until then a bad
            # row is treated as ignored, with a NaN loss, as kd_loss's CUDA kernels do.
            check_labels(y, num_classes, ignore_index)
            keep = y != ignore_index
            bad = keep & ((y < 0) | (y >= num_classes))
            keep = keep & ~bad
            local = y - start
            owned = keep & (local >= 0) & (local < width)
            ignore = torch.full_like(y, _LOCAL_IGNORE)
            # Rows whose label another rank owns get the valid placeholder column 0: the
            # forward's own hard term is discarded, and the backward gives back the −1 the
            # kernel puts on column 0 (kernels validate every label, so no sentinel).
            y_fwd = torch.where(keep, torch.where(owned, local, torch.zeros_like(y)), ignore)
        # The shard pass gives only the lse's (its own divergence, of the shard, is unused).
        _, st = kd_loss_forward(z, u, y_fwd, opts.replace(divergence="forward_kl",
                                                          ignore_index=_LOCAL_IGNORE))
        acc = st.dtype
        mine = st.new_zeros((n, 4))
        mine[:, _A], mine[:, _B] = st[:, KD_STATS.lse_student], st[:, KD_STATS.lse_teacher]
        mine[:, _LSE1] = st[:, KD_STATS.lse_student_t1]
        if hard:
            z_y = z.gather(1, y_fwd.clamp(min=0)[:, None])[:, 0].to(acc)
            mine[:, _Z_Y] = torch.where(owned, z_y, torch.zeros_like(z_y))

        g = _all_gather(mine, group, world)  # (R, n, 4), the same on every rank
        lse_s, lse_t = torch.logsumexp(g[:, :, _A], 0), torch.logsumexp(g[:, :, _B], 0)
        c = lse_t - lse_s  # the reference of §1.5: e = log p − log q up to its rounding
        d_s = d_t = torch.zeros_like(lse_s)
        if kind == "reverse_kl":
            # Base p, reference −c: lse(z/T) − lse(u/T) = −c + log1p(X).
            x, w, lo_t, lo_s = _ratio_totals(_all_gather(
                _ratio_partials(u, z, lse_t, lse_s, -c, temperature, acc, True), group, world))
            offset = c - torch.log1p(x)
            d_s = soft = _kl(x, w)
        else:
            x, w, lo_s, lo_t = _ratio_totals(_all_gather(
                _ratio_partials(z, u, lse_s, lse_t, c, temperature, acc, kind == "forward_kl"),
                group, world))
            offset = c + torch.log1p(x)
        if kind == "forward_kl":
            d_t = soft = _kl(x, w)
        elif kind == "jsd":
            precise = torch.stack([offset, lo_s, lo_t], 1)
            terms = _all_gather(_jsd_partials(z, u, lse_s, lse_t, precise, temperature, beta,
                                              acc), group, world).sum(0)
            d_t, d_s = terms[:, 0], terms[:, 1]
            soft = beta * d_t + (1.0 - beta) * d_s
        soft_scale = (1.0 - hard_weight) * (temperature ** 2 if opts.scale_by_t2 else 1.0)
        rows = soft_scale * soft
        lse1 = lse_s
        if hard:
            lse1 = torch.logsumexp(g[:, :, _LSE1], 0)
            rows = rows + hard_weight * (lse1 - g[:, :, _Z_Y].sum(0))
        # The global precise offset is what the backward kernel's cancellation-free
        # pass reads (on the rows it picks by the same test on these stats): no pass
        # over a shard could form it. It is the offset of the logits as scaled here,
        # and the kernel scales them by its own 1/T, but the two roundings of z/T differ
        # by at most an ulp of |z/T|, the size of the kernel's own rounding of
        # (u − z)/T in rp. The normalizations lo_s, lo_t (log Σq, log Σp of the logits
        # as scaled here) are not folded into the lse columns: they correct for this
        # module's scaling, while the kernel's q = exp(z·(1/T) − A) uses the shard
        # kernels' own, under which A is the row's lse up to the rounding of the
        # logsumexp over ranks (a few ε|A|, as in a single kernel). Adding them would
        # mix the two scalings (an ulp of |z/T| where they round apart) for no gain:
        # tests/test_extreme_scalars_parallel.py's worst errors are the same on the p ≈ q
        # rows with and without them (0.02 √C ε for the gradient in fp32).
        stats = KD_STATS.stack(lse_student=lse_s, lse_teacher=lse_t, lse_student_t1=lse1,
                               d_student=d_s, d_teacher=d_t, log_ratio_offset=offset)
        if keep is not None:
            # Ignored rows: loss 0, and all-zero stats as the kernels write them; rows
            # with a bad label (CUDA: raised later) NaN.
            rows = torch.where(keep, rows, torch.zeros_like(rows))
            rows = torch.where(bad, torch.full_like(rows, math.nan), rows)
            stats = torch.where(keep[:, None], stats, torch.zeros_like(stats))

        foreign = keep & ~owned if hard else None
        ctx.save_for_backward(z, u, y_fwd, stats, foreign)
        ctx.options = opts.replace(divergence=kind, ignore_index=_LOCAL_IGNORE)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        z, u, y, stats, foreign = ctx.saved_tensors
        teacher_grad = ctx.needs_input_grad[1]
        # Global stats, the precise offset included, make the shard kernel write this
        # rank's columns of the global gradient on every row: no communication.
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
    one all-gather of the ranks' shapes (2 ints each), one of an (N, 4) array of row
    statistics per rank (shard lse's of z/T, u/T and z, the label logit), then for the KL
    divergences one of (N, 4) partial sums of the cancellation-free divergence
    (docs/math.md §3), for JSD (0 < β < 1) one of (N, 3) (the precise log-ratio offset and
    normalizations) and one of (N, 2) (the shares of its two KL terms): three all-gathers
    in all, four for JSD. Backward, none — each rank runs the fused backward kernel on its
    shard with the global statistics (the precise log-ratio offset among them). Every
    rank sums the gathered numbers in rank order, so all ranks agree bit for bit.

    Host syncs (CUDA): none when ``group`` carries CPU tensors as well (gloo, or
    ``init_process_group("cpu:gloo,cuda:nccl")``): the shapes go through the CPU, and
    bad labels are recorded on the device and raise (kd_loss's ``ValueError``, global
    bound) at a later distillkit CUDA call or :func:`distillkit.ops.check_errors`; until
    then a bad row's loss is NaN and its gradient 0. A plain NCCL group exchanges the
    shapes on the device: one read of 2R integers per call.

    Accuracy: per-row losses and gradients within c √C ε of the accumulation dtype of the
    exact values for T from 1e-3 to 1e6 and for a student close to its teacher, as
    :func:`distillkit.kd_loss` (c = 4, tests/test_extreme_scalars_parallel.py).

    Memory: besides the gradients, the forward keeps only the (N, ``KD_STATS.cols``)
    global stats for the backward (the shard logits themselves are saved, not copied)
    and gathers R × N × 4 numbers at most. The partial sums are formed in row chunks in
    the accumulation dtype, each temporary at most 2²⁰ elements. Gradients flow only through this function's autograd node (the collectives
    are not differentiated).
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
