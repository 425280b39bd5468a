"""distillkit's case table for the CUDA emulator (../shared/cudaemu): every
CUDA op, forward and backward, run through a backend namespace
(torch.ops.distillkit for the CPU kernels, torch.ops.distillkit_emu for the
emulated CUDA kernels) on the same inputs, outputs returned by name.

    python ../shared/cudaemu/run.py --csrc csrc --cases tests/cuda_emulated/cases.py

The calls below follow the schemas of csrc/ops.cpp: a schema change updates
its op's case builder here. Sizes are small: the emulator runs every thread of
a block as a fiber. Not collected by pytest (not a test_*.py file).
"""
import math
import os

import torch

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
SHORT = {F32: "f32", F64: "f64", BF16: "bf16", F16: "f16"}
IGNORE = -100


def acc_of(dtype):
    return F64 if dtype == F64 else F32


class Case:
    """name, the op family, and run(ops) -> {output name: tensor}."""

    def __init__(self, family, name, make):
        self.family = family
        self.name = f"{family}/{name}"
        self._make = make  # seed -> run(ops)
        self._run = None

    def run(self, ops):
        if self._run is None:
            seed = sum(ord(c) * (i + 1) for i, c in enumerate(self.name)) % (2**31)
            self._run = self._make(torch.Generator().manual_seed(seed))
        return self._run(ops)


def randn(shape, dtype, g, scale=1.0, misalign=False):
    """A contiguous tensor; misalign: its data starts one element past an
    aligned allocation (storage offset 1), so no 16-byte pack is aligned."""
    n = math.prod(shape)
    base = (torch.randn(n + 1, generator=g, dtype=F64) * scale).to(dtype)
    return base[1:].view(shape) if misalign else base[:n].clone().view(shape)


def like(x, dtype, misalign=False):
    """x (float64) copied into a fresh tensor of dtype, optionally misaligned."""
    n = x.numel()
    base = torch.empty(n + 1, dtype=dtype)
    out = base[1:].view(x.shape) if misalign else base[:n].view(x.shape)
    out.copy_(x)
    return out


# ----------------------------------------------------------------- kd_loss

def row_strided(x, pad):
    """x in the first columns of a buffer `pad` columns wider: rows of stride C + pad, the
    class dimension contiguous (read in place by the kernels)."""
    base = torch.empty(x.shape[0], x.shape[1] + pad, dtype=x.dtype)
    base.fill_(float("nan"))  # never read
    base[:, :x.shape[1]].copy_(x)
    return base[:, :x.shape[1]]


def kd_case(N, C, div="forward_kl", beta=0.5, T=1.0, labels=False, hard=0.0,
            sdt=F32, tdt=None, misalign=False, teacher_grad=True, t2=True, scale=3.0,
            single_pass=False, grad_scale=None, pad=0):
    """single_pass: kd_loss_forward_grad with grad_scale None, "rows" (N,) or "scalar"
    (0-d), else kd_loss_forward + kd_loss_backward; pad: row stride C + pad."""
    tdt = tdt or sdt
    name = (f"{div}{'' if div != 'jsd' else f'_b{beta}'}_T{T:g}_N{N}_C{C}_{SHORT[sdt]}"
            f"{'' if tdt == sdt else '-' + SHORT[tdt]}"
            f"{'' if not labels else '_labels' if labels is True else '_' + labels}"
            f"{f'_hw{hard:g}' if hard else ''}"
            f"{'_misaligned' if misalign else ''}{'' if teacher_grad else '_no_tgrad'}"
            f"{'' if t2 else '_no_t2'}{f'_stride+{pad}' if pad else ''}"
            f"{'' if not single_pass else '_scale_' + (grad_scale or 'none')}")

    def make(g):
        z = randn((N, C), sdt, g, scale, misalign)
        u = randn((N, C), tdt, g, scale, misalign)
        if pad:
            z, u = row_strided(z, pad), row_strided(u, pad + 8)  # two strides
        y = None
        if labels:
            y = torch.randint(0, C, (N,), generator=g)
            if labels == "all_ignored":
                y[:] = IGNORE
            elif N > 1:
                y[1::3] = IGNORE
        gl = torch.rand(N, generator=g, dtype=acc_of(sdt)) + 0.5
        gs = {None: None, "rows": gl, "scalar": gl[0].clone()}[grad_scale]

        def run(ops):
            if single_pass:
                loss, stats, gz, gu = ops.kd_loss_forward_grad(z, u, y, gs, T, div, beta, hard,
                                                               IGNORE, t2, teacher_grad)
            else:
                loss, stats = ops.kd_loss_forward(z, u, y, T, div, beta, hard, IGNORE, t2)
                gz, gu = ops.kd_loss_backward(gl, z, u, y, stats, T, div, beta, hard, IGNORE,
                                              t2, teacher_grad)
            return {"loss": loss, "stats": kd_stats_compared(stats), "grad_student": gz,
                    "grad_teacher": gu}
        return run
    return Case("kd_loss", name, make)


def kd_stats_compared(stats):
    """The stats with the log-ratio offset replaced by the teacher lse it implies,
    lse_student + offset: on a row without the cancellation-free pass the offset is the
    difference of the two lse's, rounded against their size, not its own (a tolerance
    relative to the offset would fail on ε|lse|). Its precision on the other rows is
    what the gradients compared here depend on (rp = (u − z)/T − offset)."""
    from distillkit.ops import KD_STATS  # the columns, by name
    out = stats.clone()
    out[:, KD_STATS.log_ratio_offset] += stats[:, KD_STATS.lse_student]
    return out


def kd_cases():
    out = []
    # The one-warp-per-row path (C <= 1024) and the block-per-row path (C > 1024),
    # each divergence, both temperatures.
    for N, C in [(7, 100), (3, 1500)]:
        for div, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5),
                          ("jsd", 0.0), ("jsd", 1.0), ("jsd", 0.3)]:
            for T in (1.0, 2.0):
                out.append(kd_case(N, C, div, beta, T))
    # Labels (with ignored rows) and a hard term, T = 1 and T != 1 (lse(z) tracked).
    for N, C in [(9, 37), (4, 2001)]:
        for T in (1.0, 2.0):
            out.append(kd_case(N, C, "forward_kl", T=T, labels=True, hard=0.3))
            out.append(kd_case(N, C, "jsd", 0.5, T=T, labels=True, hard=0.7))
        out.append(kd_case(N, C, "reverse_kl", T=2.0, labels=True, hard=0.0))
        out.append(kd_case(N, C, "forward_kl", T=2.0, labels=True, hard=1.0))
    # dtypes, mixed pairs, C not a multiple of any pack width, misaligned bases.
    for sdt, tdt in [(F64, F64), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F32),
                     (F16, BF16), (F32, F16)]:
        for N, C in [(5, 203), (2, 1100)]:
            out.append(kd_case(N, C, "forward_kl", T=2.0, sdt=sdt, tdt=tdt))
        out.append(kd_case(3, 333, "jsd", 0.5, T=1.0, sdt=sdt, tdt=tdt, labels=True, hard=0.2))
    for sdt, tdt in [(F32, F32), (BF16, BF16), (F64, F64), (F32, BF16)]:
        for N, C in [(6, 77), (2, 1300)]:
            out.append(kd_case(N, C, "forward_kl", T=2.0, sdt=sdt, tdt=tdt, misalign=True,
                               labels=True, hard=0.5))
        out.append(kd_case(3, 64, "reverse_kl", T=1.0, sdt=sdt, tdt=tdt, misalign=True))
    # N = 1 and N = 1000; C = 1 and the path boundary C = 1024 / 1025.
    for N, C in [(1, 5), (1, 1), (1, 3000), (1000, 40), (1000, 8), (2, 1024), (2, 1025)]:
        out.append(kd_case(N, C, "jsd", 0.5, T=2.0, labels=True, hard=0.25))
    out.append(kd_case(1000, 13, "reverse_kl", T=1.0, sdt=BF16))
    for N, C in [(3, 50), (2, 1500)]:
        out.append(kd_case(N, C, "jsd", 0.5, T=2.0, labels="all_ignored", hard=0.5))
    # Large temperatures: p ~ q, the rows take the cancellation-free passes (kd_loss.h).
    for N, C in [(4, 97), (2, 1500)]:
        for div, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]:
            for T in (1e2, 1e4, 1e6):
                out.append(kd_case(N, C, div, beta, T))
        out.append(kd_case(N, C, "jsd", 0.5, T=1e4, sdt=F64, labels=True, hard=0.3))
        out.append(kd_case(N, C, "forward_kl", T=1e4, sdt=BF16, tdt=F32, misalign=True))
    out.append(kd_case(5, 300, "forward_kl", T=2.0, teacher_grad=False, t2=False))
    out.append(kd_case(4, 1200, "jsd", 0.5, T=4.0, teacher_grad=False, t2=False, scale=20.0))
    # The single pass (kd_loss_forward_grad): warp rows and block rows, each divergence,
    # every grad_scale form, teacher gradient on and off.
    for N, C in [(7, 100), (3, 1500)]:
        for div, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]:
            for grad_scale in (None, "rows", "scalar"):
                out.append(kd_case(N, C, div, beta, T=2.0, labels=True, hard=0.3,
                                   single_pass=True, grad_scale=grad_scale))
        out.append(kd_case(N, C, "jsd", 0.5, T=1.0, single_pass=True, teacher_grad=False))
        out.append(kd_case(N, C, "forward_kl", T=1e4, single_pass=True, grad_scale="rows"))
        # The saved log-ratio offset of every cancellation-free forward pass, read by the
        # gradient pass from registers (single pass) and from the stats (backward).
        for div, beta in [("reverse_kl", 0.5), ("jsd", 0.3)]:
            out.append(kd_case(N, C, div, beta, T=1e4, single_pass=True, grad_scale="rows"))
            out.append(kd_case(N, C, div, beta, T=1e4, labels=True, hard=0.2))
        out.append(kd_case(N, C, "jsd", 0.5, T=2.0, labels="all_ignored", hard=0.5,
                           single_pass=True))
    # dtypes and mixed pairs, misaligned bases, C not a multiple of a pack.
    for sdt, tdt in [(F64, F64), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F32)]:
        for N, C in [(5, 203), (2, 1100)]:
            out.append(kd_case(N, C, "jsd", 0.5, T=2.0, sdt=sdt, tdt=tdt, labels=True,
                               hard=0.2, single_pass=True, grad_scale="rows"))
            out.append(kd_case(N, C, "forward_kl", T=1.0, sdt=sdt, tdt=tdt, misalign=True,
                               single_pass=True))
    for N, C in [(1, 1), (1, 3000), (1000, 40), (2, 1024), (2, 1025)]:
        out.append(kd_case(N, C, "reverse_kl", T=2.0, labels=True, hard=0.25, single_pass=True,
                           grad_scale="scalar"))
    # Row-strided logits read in place: strides that keep the pack phase (pad 8, 16) and
    # strides that do not (pad 1, 3: scalar rows), in all three passes.
    for sdt, tdt in [(F32, F32), (BF16, BF16), (F64, F64), (BF16, F32)]:
        for N, C in [(6, 77), (3, 1300)]:
            for pad in (16, 3):
                out.append(kd_case(N, C, "forward_kl", T=2.0, sdt=sdt, tdt=tdt, labels=True,
                                   hard=0.5, pad=pad))
                out.append(kd_case(N, C, "jsd", 0.5, T=2.0, sdt=sdt, tdt=tdt, labels=True,
                                   hard=0.5, pad=pad, single_pass=True, grad_scale="rows"))
    out.append(kd_case(4, 96, "reverse_kl", T=1.0, pad=8, single_pass=True))
    out.append(kd_case(4, 2048, "reverse_kl", T=1.0, sdt=BF16, pad=1, single_pass=True))
    for dt in (F32, BF16, F16, F64):
        for rows_scale in (True, False):
            out.append(kd_scale_case(5, 203, dt, rows_scale))
            out.append(kd_scale_case(5, 203, dt, rows_scale, in_place=True))
    return out


def kd_scale_case(N, C, dt, rows_scale, in_place=False):
    """kd_loss_scale_grad, the backward of the single pass: (N,) and 0-d scales; or
    kd_loss_scale_grad_, in place, with factors of exactly 1 among the rows."""
    def make(g):
        unit = randn((N, C), dt, g)
        scale = torch.rand(N if rows_scale else (), generator=g, dtype=acc_of(dt)) + 0.5
        if in_place and rows_scale:
            scale[::2] = 1.0

        def run(ops):
            if not in_place:
                return {"grad": ops.kd_loss_scale_grad(unit, scale)}
            grad = unit.clone()
            ops.kd_loss_scale_grad_(grad, scale)
            return {"grad": grad}
        return run
    return Case("kd_loss", f"scale_grad{'_' if in_place else ''}_N{N}_C{C}_{SHORT[dt]}"
                f"{'_rows' if rows_scale else ''}", make)


# ----------------------------------------------------------------- slam_loss

def row_slice(x, pad):
    """x (N, C) copied into the first C columns of an (N, C + pad) buffer: rows
    `C + pad` apart, read in place by the kernels (pad = 0: x itself)."""
    if pad == 0:
        return x
    buf = torch.zeros(x.shape[0], x.shape[1] + pad, dtype=x.dtype)
    buf[:, :x.shape[1]] = x
    return buf[:, :x.shape[1]]


def slam_case(N, C, k, normalized, hard, sdt=F32, tdt=None, ties=False, misalign=False,
              alpha_one=False, pads=(0, 0)):
    tdt = tdt or sdt
    name = (f"k{k}_{'norm' if normalized else 'unnorm'}_{'hard' if hard else 'soft'}"
            f"_N{N}_C{C}_{SHORT[sdt]}{'' if tdt == sdt else '-' + SHORT[tdt]}"
            f"{'_ties' if ties else ''}{'_misaligned' if misalign else ''}"
            f"{'_alpha1' if alpha_one else ''}"
            f"{'_rowpad%d-%d' % pads if any(pads) else ''}")

    def make(g):
        acc = acc_of(sdt)
        z = randn((N, C), sdt, g, 2.0, misalign)
        if ties:
            # Few distinct values, exact zeros and many equal entries at the
            # top-k threshold, so the select's ties and the cut are exercised.
            levels = torch.randint(0, 4, (N, C), generator=g).to(F64)
            levels[:, ::5] = 0
            levels[:, 0] = 3  # no all-zero row
            t = levels / levels.sum(1, keepdim=True)
        else:
            t = torch.softmax(torch.randn(N, C, generator=g, dtype=F64) * 2.0, 1)
        t = like(t, tdt, misalign)
        z, t = row_slice(z, pads[0]), row_slice(t, pads[1])
        alpha = (torch.rand(N, generator=g, dtype=F64) * 0.9 + 0.1).to(acc)
        if alpha_one:
            alpha[::2] = 1.0
        kmin = 2 if normalized else 1
        kk = torch.randint(kmin, k + 1, (N,), generator=g) if k > kmin else torch.full((N,), k)
        kk[0] = k
        gl = torch.rand(N, generator=g, dtype=acc) + 0.5

        def run(ops):
            loss, stats = ops.slam_loss_forward(z, t, alpha, kk, normalized, hard)
            grad = ops.slam_loss_backward(gl, z, t, alpha, kk, stats, normalized, hard)
            return {"loss": loss, "stats": stats, "grad_student": grad}
        return run
    return Case("slam_loss", name, make)


def slam_cases():
    out = []
    for k, normalized in [(1, False), (2, False), (2, True), (5, False), (5, True)]:
        for hard in (False, True):
            out.append(slam_case(6, 50, k, normalized, hard))
            out.append(slam_case(2, 3000, k, normalized, hard))
    for k in (1, 2, 5):
        out.append(slam_case(5, 97, k, False, False, ties=True))
        out.append(slam_case(3, 2500, k, k > 1, False, ties=True))
    out.append(slam_case(4, 40, 40, True, False, ties=True))  # k = C: every entry a member
    for sdt, tdt in [(F64, F64), (BF16, BF16), (F16, F32), (F32, BF16)]:
        out.append(slam_case(4, 333, 5, True, False, sdt=sdt, tdt=tdt))
        out.append(slam_case(2, 1500, 2, False, True, sdt=sdt, tdt=tdt, ties=True))
    out.append(slam_case(4, 201, 5, True, False, misalign=True, alpha_one=True))
    out.append(slam_case(3, 1029, 5, False, False, misalign=True, ties=True))
    out.append(slam_case(1, 7, 5, True, False, alpha_one=True))
    out.append(slam_case(1, 1, 1, False, False))
    out.append(slam_case(1, 1, 1, False, True))
    out.append(slam_case(64, 30, 3, True, False, alpha_one=True))
    # Row-strided inputs (slices of wider rows), read in place: equal strides
    # that are whole packs, equal odd strides, and unequal ones (scalar path).
    for pads in [(8, 8), (3, 3), (5, 2)]:
        for hard in (False, True):
            out.append(slam_case(5, 200, 5, True, hard, ties=not hard, pads=pads))
        out.append(slam_case(3, 1500, 2, False, False, BF16, F32, pads=pads))
    return out


# ----------------------------------------------------------------- distances

def pointwise_run(s, t, op, teacher_grad):
    """run(ops) of a pointwise case: the forward sum and the backward of grad 0.75."""
    gr = torch.tensor(0.75, dtype=acc_of(s.dtype))

    def run(ops):
        out = ops.pointwise_distance_forward(s, t, op)
        gs, gt = ops.pointwise_distance_backward(gr, s, t, op, teacher_grad)
        return {"sum": out, "grad_student": gs, "grad_teacher": gt}
    return run


def pointwise_case(shape, op, sdt=F32, tdt=None, misalign=False, teacher_grad=True):
    tdt = tdt or sdt
    name = (f"{op}_{'x'.join(map(str, shape))}_{SHORT[sdt]}"
            f"{'' if tdt == sdt else '-' + SHORT[tdt]}{'_misaligned' if misalign else ''}"
            f"{'' if teacher_grad else '_no_tgrad'}")

    def make(g):
        s = randn(shape, sdt, g, 1.5, misalign)
        t = randn(shape, tdt, g, 1.5, misalign)
        return pointwise_run(s, t, op, teacher_grad)
    return Case("distance", name, make)


def corr_case(outer, D, inner, center, sdt=F32, tdt=None, misalign=False, degenerate=False,
              teacher_grad=True, pads=(0, 0), scales=(1.0, 1.0), offset=0.0):
    tdt = tdt or sdt
    name = (f"{'pearson' if center else 'cosine'}_{outer}x{D}x{inner}_{SHORT[sdt]}"
            f"{'' if tdt == sdt else '-' + SHORT[tdt]}{'_misaligned' if misalign else ''}"
            f"{'_degenerate' if degenerate else ''}{'' if teacher_grad else '_no_tgrad'}"
            f"{'_rowpad%d-%d' % pads if any(pads) else ''}"
            f"{'_scale%g-%g' % scales if scales != (1.0, 1.0) else ''}"
            f"{'_offset%g' % offset if offset else ''}")

    def make(g):
        s64 = torch.randn(outer, D, inner, generator=g, dtype=F64) + 0.3
        t64 = 0.5 * s64 + torch.randn(outer, D, inner, generator=g, dtype=F64)
        # Magnitudes whose squares leave the dtype's range, and rows far above
        # their spread: the kernels' careful path.
        s64, t64 = (s64 + offset) * scales[0], (t64 - offset) * scales[1]
        if degenerate:
            s64[0, :, 0] = 0.0                     # |u| = 0 (cosine and Pearson)
            if outer * inner > 1:
                r = (1, 0) if outer > 1 else (0, 1)
                t64[r[0], :, r[1]] = 2.5           # constant: |v| = 0 for Pearson
        s = like(s64, sdt, misalign)
        t = like(t64, tdt, misalign)
        if inner == 1 and any(pads):  # rows of wider buffers, read in place
            s = row_slice(s[:, :, 0], pads[0]).unsqueeze(2)
            t = row_slice(t[:, :, 0], pads[1]).unsqueeze(2)
        gr = torch.rand(outer, inner, generator=g, dtype=acc_of(sdt)) + 0.5

        def run(ops):
            rows, stats = ops.correlation_distance_forward(s, t, center)
            gs, gt = ops.correlation_distance_backward(gr, s, t, stats, center, teacher_grad)
            return {"rows": rows, "stats": stats, "grad_student": gs, "grad_teacher": gt}
        return run
    return Case("distance", name, make)


def distance_cases():
    out = []
    for op in ("l1", "l2", "smooth_l1"):
        out.append(pointwise_case((7, 33), op))
        out.append(pointwise_case((1, 1), op))
        out.append(pointwise_case((64, 1000), op))
        out.append(pointwise_case((3, 101), op, BF16, misalign=True))
    out.append(pointwise_case((1100, 1000), "l2"))                # > 1024 partials' worth
    out.append(pointwise_case((300, 1001), "smooth_l1", misalign=True))
    for sdt, tdt in [(F64, F64), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F16)]:
        out.append(pointwise_case((17, 129), "smooth_l1", sdt, tdt))
    out.append(pointwise_case((5, 77), "l1", teacher_grad=False))
    for center in (False, True):
        # logits layout (dim = -1: rows contiguous), warp and block paths
        out.append(corr_case(8, 100, 1, center))
        out.append(corr_case(3, 2000, 1, center))
        out.append(corr_case(1000, 7, 1, center))
        out.append(corr_case(5, 1024, 1, center, degenerate=True))
        out.append(corr_case(4, 515, 1, center, BF16, misalign=True))
        out.append(corr_case(2, 1031, 1, center, F64, misalign=True))
        # features layout (B, C, H*W) over dim = 1, and (1, N, C) for dim = 0
        out.append(corr_case(2, 64, 49, center))
        out.append(corr_case(3, 10, 33, center, degenerate=True))
        out.append(corr_case(1, 300, 40, center))
        out.append(corr_case(1, 9, 70, center, BF16, F32))
        out.append(corr_case(2, 5, 3, center, F64))
    for sdt, tdt in [(F16, F16), (F32, BF16), (BF16, BF16)]:
        out.append(corr_case(6, 200, 1, True, sdt, tdt))
        out.append(corr_case(2, 37, 17, False, sdt, tdt))
    out.append(corr_case(4, 50, 1, True, teacher_grad=False))
    out.append(corr_case(2, 20, 5, False, teacher_grad=False))
    for center in (False, True):
        # Row-strided inputs (inner == 1), read in place: equal strides that
        # are whole packs, equal odd strides, unequal ones; warp and block rows.
        for pads in [(8, 8), (3, 3), (5, 2)]:
            out.append(corr_case(6, 300, 1, center, pads=pads))
            out.append(corr_case(2, 1500, 1, center, BF16, pads=pads))
        # Magnitudes and offsets that take the careful path, all layouts.
        for scales in [(1e30, 1e30), (1e-30, 1e-30), (1e30, 1e-30)]:
            out.append(corr_case(5, 64, 1, center, scales=scales, degenerate=True))
            out.append(corr_case(2, 1100, 1, center, scales=scales))
            out.append(corr_case(2, 33, 7, center, scales=scales, degenerate=True))
            out.append(corr_case(3, 40, 1, center, F64, scales=scales))
    # Pearson rows far above their spread (for cosine such rows are nearly
    # parallel, whose gradient cancels to below the tolerance's reach).
    out.append(corr_case(4, 100, 1, True, offset=3e3))
    out.append(corr_case(2, 40, 6, True, offset=3e3))
    return out + pointwise_rows_cases()


def wide_rows(x, pad, misalign=False):
    """x (R, L) in the first L columns of an (R, L + pad) buffer of NaN (never read):
    rows L + pad apart, read in place by the pointwise kernels; misalign: the buffer
    starts one element past an aligned allocation."""
    R, L = x.shape
    flat = torch.full((R * (L + pad) + 1,), float("nan"), dtype=x.dtype)
    buf = (flat[1:] if misalign else flat[:-1]).view(R, L + pad)
    buf[:, :L] = x
    return buf[:, :L]


def pointwise_rows_case(rows, len_, op, sdt=F32, tdt=None, pads=(0, 0), misalign=(False, False),
                        shape=None, teacher_grad=True, broadcast_teacher=False):
    """Row-strided inputs: `rows` rows of `len_` elements, each input's rows `len_ + pad`
    apart (viewed with `shape`, e.g. (B, S, V) rows of S V as logits[:, :-1, :]);
    broadcast_teacher: the teacher is one row expanded (row stride 0)."""
    tdt = tdt or sdt
    shape = shape or (rows, len_)
    name = (f"{op}_rows{rows}x{len_}_{SHORT[sdt]}{'' if tdt == sdt else '-' + SHORT[tdt]}"
            f"_rowpad{pads[0]}-{pads[1]}"
            f"{'_misaligned%d%d' % misalign if any(misalign) else ''}"
            f"{'_as' + 'x'.join(map(str, shape)) if len(shape) != 2 else ''}"
            f"{'_bcast' if broadcast_teacher else ''}{'' if teacher_grad else '_no_tgrad'}")

    def make(g):
        s64 = torch.randn(rows, len_, generator=g, dtype=F64) * 1.5
        t64 = torch.randn(1 if broadcast_teacher else rows, len_, generator=g, dtype=F64) * 1.5
        s = wide_rows(s64.to(sdt), pads[0], misalign[0]).view(shape)
        t = wide_rows(t64.to(tdt), pads[1], misalign[1])
        t = (t.expand(rows, len_) if broadcast_teacher else t).view(shape)
        return pointwise_run(s, t, op, teacher_grad)
    return Case("distance", name, make)


def pointwise_rows_cases():
    out = []
    for op in ("l1", "l2", "smooth_l1"):
        # Strides that are whole packs, equal odd ones, unequal ones; odd lengths (tails).
        out.append(pointwise_rows_case(6, 301, op, pads=(8, 8)))
        out.append(pointwise_rows_case(6, 301, op, BF16, pads=(3, 3)))
        out.append(pointwise_rows_case(6, 301, op, F16, pads=(5, 2), misalign=(True, False)))
        # Rows shorter than a pack: units cross rows.
        out.append(pointwise_rows_case(40, 7, op, pads=(1, 3)))
        out.append(pointwise_rows_case(33, 3, op, BF16, pads=(2, 5), misalign=(False, True)))
    # (B, S, V) = logits[:, :-1, :]: B rows of S V, (S + 1) V apart.
    out.append(pointwise_rows_case(3, 4 * 37, "smooth_l1", pads=(37, 37), shape=(3, 4, 37)))
    out.append(pointwise_rows_case(3, 4 * 37, "l1", BF16, pads=(37, 1), shape=(3, 4, 37)))
    for sdt, tdt, misalign in [(F64, F64, (True, True)), (F32, BF16, (False, True)),
                               (BF16, F16, (True, False)), (F16, F32, (False, False))]:
        out.append(pointwise_rows_case(17, 129, "smooth_l1", sdt, tdt, (5, 2), misalign))
    out.append(pointwise_rows_case(9, 77, "l2", pads=(3, 0), broadcast_teacher=True))
    out.append(pointwise_rows_case(5, 77, "l1", pads=(2, 6), teacher_grad=False))
    out.append(pointwise_rows_case(1, 1001, "l2", pads=(3, 3), misalign=(True, False)))
    # More units than the forward's grid: each thread's row position advances.
    out.append(pointwise_rows_case(1100, 1000, "l2", pads=(3, 8)))
    return out


# ----------------------------------------------------------------- sparse_kd_loss

def sparse_case(N, C, K, renorm=True, T=1.0, labels=False, sdt=F32, padding=False,
                dead_row=False, misalign=False, row_pad=None, col_strided=False, tail=False,
                div="forward_kl", beta=0.5):
    """row_pad: the student is the first C columns of (N, C + row_pad) logits (rows
    C + row_pad apart, read in place); col_strided: a transposed (column-major) view;
    tail: the teacher's tail bucket (its log mass outside the K kept classes) under
    divergence div (beta for "jsd")."""
    name = (f"K{K}_{'renorm' if renorm else 'raw'}_T{T:g}_N{N}_C{C}_{SHORT[sdt]}"
            f"{'_labels' if labels else ''}{'_padding' if padding else ''}"
            f"{'_deadrow' if dead_row else ''}{'_misaligned' if misalign else ''}"
            f"{f'_rowpad{row_pad}' if row_pad is not None else ''}"
            f"{'_colstrided' if col_strided else ''}"
            f"{f'_tail_{div}{beta:g}' if tail else ''}")

    def make(g):
        if row_pad is not None:
            z = randn((N, C + row_pad), sdt, g, 3.0, misalign)[:, :C]
        elif col_strided:
            z = randn((C, N), sdt, g, 3.0, misalign).t()
        else:
            z = randn((N, C), sdt, g, 3.0, misalign)
        idx = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(N)])
        teacher = torch.log_softmax(torch.randn(N, C, generator=g, dtype=F64) * 3.0 / T, 1)
        lp = teacher.gather(1, idx).to(sdt)
        lt = None
        if tail:
            rest = teacher.scatter(1, idx, float("-inf"))
            lt = torch.logsumexp(rest, 1).to(sdt)
        if padding:
            idx[::2, K - max(1, K // 3):] = -1
        if dead_row:
            idx[0] = -1
        y = None
        if labels:
            y = torch.randint(0, C, (N,), generator=g)
            if N > 1:
                y[1::3] = IGNORE
        gl = torch.rand(N, generator=g, dtype=acc_of(sdt)) + 0.5

        def run(ops):
            if not tail:  # the schemas' original positional form (the tail arguments' defaults)
                loss, stats = ops.sparse_kd_loss_forward(z, idx, lp, y, T, renorm, IGNORE, True,
                                                         True)
                gz = ops.sparse_kd_loss_backward(gl, z, idx, lp, y, stats, T, renorm, IGNORE, True)
            else:
                loss, stats = ops.sparse_kd_loss_forward(z, idx, lp, y, T, renorm, IGNORE, True,
                                                         True, lt, div, beta)
                gz = ops.sparse_kd_loss_backward(gl, z, idx, lp, y, stats, T, renorm, IGNORE, True,
                                                 lt, div, beta)
                # With the tail the teacher's K + 1 buckets are its whole distribution: the
                # log normalizer is 0 up to rounding on every row, a column of noise that no
                # relative tolerance fits. It reaches the loss and the gradient, compared.
                from distillkit.ops import SPARSE_KD_STATS
                keep = [c for c in range(stats.shape[1])
                        if c != SPARSE_KD_STATS.teacher_log_normalizer]
                stats = stats[:, keep]
            return {"loss": loss, "stats": stats, "grad_student": gz}
        return run
    return Case("sparse_kd_loss", name, make)


def sparse_cases():
    out = []
    for K in (1, 8, 32):
        for renorm in (True, False):
            out.append(sparse_case(9, 100, K, renorm, T=1.0))
            out.append(sparse_case(3, 1800, K, renorm, T=2.0))
        out.append(sparse_case(7, 64, K, True, T=2.0, labels=True, padding=True, dead_row=True))
        out.append(sparse_case(2, 1500, K, False, labels=True, padding=True, dead_row=True))
    for sdt in (F64, BF16, F16):
        out.append(sparse_case(5, 203, 8, True, T=2.0, sdt=sdt, padding=True))
        out.append(sparse_case(2, 1100, 32, False, sdt=sdt))
    out.append(sparse_case(4, 99, 8, True, misalign=True, labels=True))
    out.append(sparse_case(2, 1201, 32, False, T=2.0, sdt=BF16, misalign=True))
    out.append(sparse_case(1, 1, 1, True))
    out.append(sparse_case(1000, 50, 8, True, T=2.0, labels=True, padding=True))
    out.append(sparse_case(2, 2000, 500, True))  # K > a block's threads
    # Row-strided students, read in place: pads that keep every row at the same
    # pack phase as the contiguous gradient (a multiple of the pack) and pads that
    # do not (the backward then walks rows unpacked), warp and block rows.
    for sdt in (F32, BF16, F64):
        out.append(sparse_case(6, 96, 8, True, T=2.0, sdt=sdt, labels=True, row_pad=8))
        out.append(sparse_case(5, 203, 8, False, sdt=sdt, padding=True, row_pad=3))
        out.append(sparse_case(3, 1500, 32, True, sdt=sdt, row_pad=5))
    out.append(sparse_case(3, 1100, 8, True, row_pad=4, misalign=True))
    out.append(sparse_case(4, 50, 8, True, T=2.0, col_strided=True))
    # The tail bucket: every divergence, warp and block rows, renormalized and raw,
    # padding and dead rows, 16-bit and fp64, K beyond a block's threads.
    for div, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)):
        out.append(sparse_case(9, 100, 8, True, T=2.0, tail=True, div=div, beta=beta))
        out.append(sparse_case(3, 1800, 32, False, tail=True, div=div, beta=beta))
        out.append(sparse_case(7, 64, 8, True, labels=True, padding=True, dead_row=True,
                               tail=True, div=div, beta=beta))
        out.append(sparse_case(5, 203, 8, True, T=2.0, sdt=BF16, padding=True, tail=True,
                               div=div, beta=beta))
        out.append(sparse_case(4, 99, 8, False, sdt=F64, tail=True, div=div, beta=beta,
                               row_pad=3))
    out.append(sparse_case(2, 2000, 500, True, tail=True, div="jsd", beta=0.5))
    out.append(sparse_case(3, 40, 40, True, tail=True, div="reverse_kl"))  # K = C: no tail mass
    return out


# ----------------------------------------------------------------- coordinate_lstm

def lstm_case(P, hidden, head, dt=F32, state_grads=True):
    name = (f"P{P}_H{'-'.join(map(str, hidden))}_{'head' if head else 'nohead'}_{SHORT[dt]}"
            f"{'' if state_grads else '_no_state_grads'}")

    def make(g):
        def r(*shape, s=1.0):
            return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dt)
        w_ih, w_hh, bias = [], [], []
        inp = 2
        for H in hidden:
            w_ih.append(r(4 * H, inp, s=0.6 / math.sqrt(inp)))
            w_hh.append(r(4 * H, H, s=0.6 / math.sqrt(H)))
            bias.append(r(4 * H, s=0.2))
            inp = H
        hw = r(1, hidden[-1], s=0.5) if head else None
        hb = r(1, s=0.1) if head else None
        width = sum(hidden)
        # Gradients over many scales: exact zeros, the |g| e^p clamp at +-1, tiny values.
        mag = torch.pow(10.0, torch.rand(P, generator=g, dtype=F64) * 8 - 9)
        grad = (torch.randn(P, generator=g, dtype=F64).sign() * mag).to(dt)
        grad[::17] = 0.0
        params = r(P)
        h = r(P, width, s=0.5)
        c = r(P, width, s=0.8)
        gpo = r(P)
        gho = r(P, width, s=0.3) if state_grads else None
        gco = r(P, width, s=0.3) if state_grads else None

        def run(ops):
            po, ho, co = ops.coordinate_lstm_forward(grad, params, h, c, w_ih, w_hh, bias, hw, hb,
                                                     10.0, 0.1)
            gg, gh, gc, gwi, gwh, gb, ghw, ghb = ops.coordinate_lstm_backward(
                gpo, gho, gco, grad, h, c, w_ih, w_hh, bias, hw, hb, 10.0, 0.1)
            out = {"params_out": po, "h_out": ho, "c_out": co, "grad_grad": gg,
                   "grad_h": gh, "grad_c": gc, "grad_head_weight": ghw, "grad_head_bias": ghb}
            for l in range(len(hidden)):
                out[f"grad_w_ih{l}"] = gwi[l]
                out[f"grad_w_hh{l}"] = gwh[l]
                out[f"grad_bias{l}"] = gb[l]
            return out
        return run
    return Case("coordinate_lstm", name, make)


def lstm_cases():
    out = []
    for dt in (F32, F64):
        for H in (20, 64):
            for layers in (1, 2, 3):
                out.append(lstm_case(37, [H] * layers, True, dt))
                out.append(lstm_case(37, [H] * (layers - 1) + [1], False, dt))
        out.append(lstm_case(1, [20, 20], True, dt))
        out.append(lstm_case(1, [64, 1], False, dt))
        out.append(lstm_case(5000, [20, 20], True, dt))
    out.append(lstm_case(5000, [64, 64, 1], False, F32))
    out.append(lstm_case(300, [128], True, F32))
    out.append(lstm_case(100, [1], False, F64, state_grads=False))
    out.append(lstm_case(70, [20, 64, 7], True, F32, state_grads=False))
    # More tiles than the backward's 2048 partial rows: blocks take several tiles.
    out.append(lstm_case(140000, [4, 1], False, F32))
    return out


# ----------------------------------------------------------------- bad input values

# The AddressSanitizer sweep's worker has libasan preloaded, and there a C++ exception
# aborts the process (ASan's __cxa_throw interceptor is not set up when the runtime is
# preloaded into Python): the raises_ cases, whose whole point is a throw, run in the
# first sweep only. Their indices are also far out of range (2^40), so an unchecked
# dereference would fault there rather than land inside another allocation.
UNDER_ASAN = "asan" in os.environ.get("LD_PRELOAD", "")


def raises_case(family, name, make_call):
    """A call with one bad input value. The CPU kernels raise it at the call; the
    emulated CUDA kernels must not read or write out of bounds, record it, and raise the
    same ValueError from check_errors. Output: the message's bytes."""
    def make(g):
        call = make_call(g)

        def run(ops):
            if UNDER_ASAN:
                return {}
            try:
                call(ops)
                ops.check_errors(torch.empty(0))
            except ValueError as e:
                msg = str(e).splitlines()[0]
                return {"message": torch.tensor(list(msg.encode()), dtype=torch.int64)}
            raise AssertionError(f"{name}: no ValueError")
        return run
    return Case(family, "raises_" + name, make)


def int_bits(value, dtype):
    """A stats entry holding the integer `value` as bits (stats_layout.h's int_stat)."""
    it = torch.int64 if dtype == F64 else torch.int32
    return torch.tensor([value], dtype=it).view(dtype)[0]


def bad_kd(N, C, bad_label):
    def make_call(g):
        z, u = randn((N, C), F32, g), randn((N, C), F32, g)
        y = torch.randint(0, C, (N,), generator=g)
        y[N // 2] = bad_label
        return lambda ops: ops.kd_loss_forward(z, u, y, 2.0, "forward_kl", 0.5, 0.5, IGNORE, True)
    return raises_case("kd_loss", f"label{bad_label}_N{N}_C{C}", make_call)


def bad_kd_single_pass(N, C, bad_label):
    def make_call(g):
        z, u = randn((N, C), F32, g), randn((N, C), F32, g)
        y = torch.randint(0, C, (N,), generator=g)
        y[N // 2] = bad_label
        return lambda ops: ops.kd_loss_forward_grad(z, u, y, None, 2.0, "jsd", 0.5, 0.5, IGNORE,
                                                    True, True)
    return raises_case("kd_loss", f"single_pass_label{bad_label}_N{N}_C{C}", make_call)


def label_check_case(N, num_classes, ignore_index=IGNORE):
    """check_labels on valid labels (ignored entries included): no error recorded."""
    def make(g):
        y = torch.randint(0, num_classes, (N,), generator=g)
        y[::3] = ignore_index

        def run(ops):
            ops.check_labels(y, num_classes, ignore_index)
            ops.check_errors(torch.empty(0))
            return {"labels": y}
        return run
    return Case("check_labels", f"valid_N{N}_C{num_classes}_ignore{ignore_index}", make)


def bad_labels(N, num_classes, bad_label, row):
    def make_call(g):
        y = torch.randint(0, num_classes, (N,), generator=g)
        y[::5] = IGNORE
        y[row] = bad_label
        return lambda ops: ops.check_labels(y, num_classes, IGNORE)
    return raises_case("check_labels", f"label{bad_label}_row{row}_N{N}_C{num_classes}",
                       make_call)


def bad_sparse(N, C, K, what, in_backward=False):
    def make_call(g):
        z = randn((N, C), F32, g)
        idx = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(N)])
        lp = torch.log_softmax(torch.randn(N, K, generator=g), 1)
        gl = torch.ones(N)
        bad = idx.clone()
        r, e = N // 2, K - 1
        bad[r, e] = {"high": C, "huge": 2**40, "negative": -3, "very_negative": -(2**40),
                     "duplicate": int(idx[r, 0])}[what]

        def call(ops):
            loss, stats = ops.sparse_kd_loss_forward(z, idx if in_backward else bad, lp, None,
                                                     1.0, True, IGNORE, True, True)
            # The backward gets indices edited since the forward.
            ops.sparse_kd_loss_backward(gl, z, bad, lp, None, stats, 1.0, True, IGNORE, True)
        return call
    return raises_case("sparse_kd_loss",
                       f"{what}{'_in_backward' if in_backward else ''}_N{N}_C{C}_K{K}", make_call)


def bad_slam(N, C, what, normalized=False, hard=False):
    def make_call(g):
        z = randn((N, C), F32, g)
        t = torch.softmax(torch.randn(N, C, generator=g, dtype=F64), 1).float()
        alpha = torch.full((N,), 0.7)
        k = torch.full((N,), 2)
        r = N // 2
        if what == "alpha0":
            alpha[r] = 0.0
        elif what == "alpha_nan":
            alpha[r] = float("nan")
        elif what == "k_high":
            k[r] = C + 1
        elif what == "k_low":
            k[r] = 1 if normalized else 0
        elif what == "negative":
            t[r, 3] = -t[r, 3]
        elif what == "sum":
            t[r] *= 0.9
        gl = torch.ones(N)

        def call(ops):
            loss, stats = ops.slam_loss_forward(z, t, alpha, k, normalized, hard)
            if what == "argmax":
                from distillkit.ops import SLAM_STATS  # the column, by name
                stats = stats.clone()
                stats[r, SLAM_STATS.teacher_argmax] = int_bits(C + 5, F32)
                ops.slam_loss_backward(gl, z, t, alpha, k, stats, normalized, hard)
        return call
    return raises_case("slam_loss", f"{what}_N{N}_C{C}{'_norm' if normalized else ''}"
                       f"{'_hard' if hard else ''}", make_call)


def bad_input_cases():
    out = []
    for N, C in [(5, 40), (3, 1500)]:  # warp and block row paths
        out += [bad_kd(N, C, C), bad_kd(N, C, -5), bad_kd(N, C, 2**40)]
        out += [bad_kd_single_pass(N, C, C), bad_kd_single_pass(N, C, -(2**40))]
        for what in ("high", "huge", "negative", "very_negative", "duplicate"):
            out.append(bad_sparse(N, C, 8, what))
        for what in ("high", "huge", "negative", "very_negative"):
            out.append(bad_sparse(N, C, 8, what, in_backward=True))
        for what in ("alpha0", "alpha_nan", "k_high", "negative", "sum"):
            out.append(bad_slam(N, C, what))
        out.append(bad_slam(N, C, "k_low", normalized=True))
        out.append(bad_slam(N, C, "argmax", hard=True))
    out.append(bad_sparse(2, 2000, 500, "duplicate"))  # K > a block's threads
    # check_labels: one block and a grid-stride over several (N > 256), the bad entry
    # in the first and a later block.
    for N, C, row in [(7, 40, 3), (3000, 1000, 2999)]:
        for bad in (C, -1, 2**40, -(2**40)):
            out.append(bad_labels(N, C, bad, row))
    return out


def label_check_cases():
    return [label_check_case(N, C, ignore) for N, C, ignore in
            [(1, 1, IGNORE), (7, 40, IGNORE), (3000, 1000, -1), (300, 5, 3)]]


def all_cases():
    return (kd_cases() + slam_cases() + distance_cases() + sparse_cases() + lstm_cases()
            + label_check_cases() + bad_input_cases())
