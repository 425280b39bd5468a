"""slam_loss and the correlation distances over the whole valid range of their scalars
and input magnitudes (issue 11): per-row losses and gradients within c sqrt(n) eps of
the accumulation dtype of the exact value (n the reduction length, C or D), computed
with mpmath at 60 digits from the inputs as given (fp32 inputs are exact binary
numbers; the oracle does not round them again).

slam_loss (docs/math.md §5), over alpha from 1e-30 to 1 (1 - eps and 1 exactly), k from
1 to C (normalized: 2 to C), soft and hard, logits of scale 3, offset by 1e4 (z - max z
is exact near the top: the kernels keep lse as max z and log1p of the rest), spread
over 1e4 (most f underflow) and confident rows (f_max = 1 - 1e-8: the kernels keep
1 - f_max, see row_lse), and teachers soft, one-hot, with exact zeros and with 1e-30
entries. Stated constants: c = 4 for the loss, relative to |loss| (every term
-t log q is >= 0, as q <= 1: no cancellation; a loss below the dtype's smallest normal
number may underflow), and c = 4 for the gradient, relative to
the row's max_j (|h_j| + f_j |S|), the size of the terms that form an entry
dz_j = h_j - f_j S (an entry itself may cancel to 0). alpha = 0, alpha > 1, k = 0,
k > C and normalized k = 1 are rejected naming the argument.

Correlation distances (cosine, Pearson), entries of magnitude 1e-30 to 1e30 (in fp32
their squares under- and overflow: the kernels take a careful path, scaled by powers
of two), rows of the two inputs at unrelated scales, Pearson rows offset far above
their spread, and degenerate rows (constant for Pearson, zero for cosine: distance 1,
zero gradient, by definition). Stated constants: c = 4 for the distance, relative to
1 + |cos w| (d = 1 - cos w, w = |u||v| / (|u||v| + eps): the two terms that form it;
d itself cancels when s and t align), and c = 4 for the gradient, relative to the
row's max_j ((|t_j| + |mean t|) + |cos| w (|s_j| + |mean s|) |v| / |u|) / (|u||v| + eps),
the terms that form an entry (u_j = s_j - mean s is formed from s_j and the stored mean,
whose rounding, eps |mean s|, is part of any kernel that saves the mean in the
accumulation dtype; for cosine this is |v_j| + |cos| w |u_j| |v| / |u|). The only other scalar of distance(), the temperature of op="kl", is kd_loss's
(tests/test_extreme_scalars.py).
"""
import math

import mpmath
import pytest
import torch

from distillkit import check_errors, distance, slam_loss
from distillkit.reference import topk_mask_ref

from conftest import DEVICES

mpmath.mp.dps = 60
C_LOSS, C_GRAD = 4.0, 4.0
C_DIST, C_DIST_GRAD = 4.0, 4.0
N, C = 3, 97


# ----------------------------------------------------------------- slam_loss

def exact_slam(z, t, alpha, k, normalized, hard):
    """Per-row loss, gradient and gradient scale max_j (|h_j| + f_j |S|), in mpmath."""
    mask = topk_mask_ref(t.double(), k).tolist()
    rows, grads, scales = [], [], []
    for zr, tr, a, kk, mr in zip(z.double().tolist(), t.double().tolist(),
                                 alpha.double().tolist(), k.tolist(), mask):
        a = mpmath.mpf(a)
        c = mpmath.mpf(1) / (kk - 1) if normalized else mpmath.mpf(1)
        b = (1 - a) * c
        zs = [mpmath.mpf(v) for v in zr]
        # In the log domain, with 1 - f and 1 - q in closed form: a loss of e^-500
        # (a confident row) is 1 - q to 60 digits only as log1p of -(1 - q).
        top = zs.index(max(zs))
        ls = mpmath.log1p(mpmath.fsum(mpmath.exp(v - zs[top]) for i, v in enumerate(zs)
                                      if i != top))
        log_f = [(v - zs[top]) - ls for v in zs]
        f = [mpmath.exp(v) for v in log_f]
        omf = [-mpmath.expm1(v) for v in log_f]
        q = [a * fi + (b * oi if mi else 0) for fi, oi, mi in zip(f, omf, mr)]
        log_q = [(mpmath.log1p(-((1 - a) * ((1 - c) + c * fi) + a * oi)) if qi > 0.5
                  else mpmath.log(qi)) if mi else mpmath.log(a) + lf
                 for fi, oi, qi, lf, mi in zip(f, omf, q, log_f, mr)]
        if hard:
            y = max(range(len(tr)), key=lambda i: (tr[i], -i))  # the first argmax
            w = [mpmath.mpf(1) if i == y else mpmath.mpf(0) for i in range(len(tr))]
        else:
            w = [mpmath.mpf(v) for v in tr]
        loss = -mpmath.fsum(wi * lq for wi, lq in zip(w, log_q) if wi != 0)
        # h_i = -w_i f_i (alpha - b M_i) / q_i: -w_i for non-members.
        h = [-wi * fi * (a - (b if mi else 0)) / qi if wi != 0 else mpmath.mpf(0)
             for wi, fi, qi, mi in zip(w, f, q, mr)]
        S = mpmath.fsum(h)
        rows.append(float(loss))
        grads.append([float(hi - fi * S) for hi, fi in zip(h, f)])
        scales.append(float(max(abs(hi) + fi * abs(S) for hi, fi in zip(h, f))))
    return (torch.tensor(rows, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64),
            torch.tensor(scales, dtype=torch.float64)[:, None])


def slam_logits(kind, g, dtype):
    z = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    if kind == "offset":
        z = z + 1e4
    elif kind == "spread":
        z = z * 3e3
    elif kind == "confident":
        z = torch.zeros(N, C, dtype=torch.float64)
        z[:, 5] = 23.0 if dtype == torch.float32 else 40.0  # 1 - f_max ~ C e^-23 ~ 1e-8
        z[:, 7] = -5.0
    return z.to(dtype)


def slam_teacher(kind, g, dtype):
    t = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64) * 2, 1)
    if kind == "one_hot":
        t = torch.zeros(N, C, dtype=torch.float64)
        t[:, 5] = 1.0
    elif kind == "zeros":
        t[:, ::3] = 0.0
    elif kind == "tiny":
        t[:, ::4] = 1e-30
    return (t / t.sum(1, keepdim=True)).to(dtype)


def check_slam(device, dtype, z, t, alpha, k, normalized, hard):
    alpha = torch.full((N,), alpha, dtype=dtype)
    k = torch.full((N,), k, dtype=torch.int64)
    exact, exact_grad, scale = exact_slam(z, t, alpha, k, normalized, hard)
    zz = z.to(device).requires_grad_()
    rows = slam_loss(zz, t.to(device), alpha.to(device), k.to(device), normalized=normalized,
                     hard=hard, reduction="none")
    (grad,) = torch.autograd.grad(rows.sum(), zz)
    eps = torch.finfo(dtype).eps
    # A loss below the dtype's normal range (e^-500 for a confident row) may underflow.
    tiny = torch.finfo(dtype).tiny
    rel = ((rows.double().cpu() - exact).abs().sub(tiny).clamp_min(0)
           / exact.abs().clamp_min(1e-300)).max().item()
    assert rel <= C_LOSS * math.sqrt(C) * eps, f"loss relative error {rel:.3g}"
    # A row whose gradient vanishes exactly (alpha = b: a = 0) has scale 0 and must be 0.
    grad_rel = ((grad.double().cpu() - exact_grad).abs() / scale.clamp_min(1e-300)).max().item()
    assert grad_rel <= C_GRAD * math.sqrt(C) * eps, f"gradient relative error {grad_rel:.3g}"


def one_minus_eps(dtype):
    return 1.0 - torch.finfo(dtype).eps / 2


ALPHAS = [1e-30, 1e-6, 0.5, "1-eps", 1.0]
KS = [(1, False), (2, False), (5, False), (C, False), (2, True), (5, True), (C, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("k,normalized", KS, ids=lambda v: str(v))
@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
def test_slam_alpha_and_k(device, dtype, hard, k, normalized, alpha):
    g = torch.Generator().manual_seed(11)
    a = one_minus_eps(dtype) if alpha == "1-eps" else alpha
    check_slam(device, dtype, slam_logits("randn", g, dtype), slam_teacher("soft", g, dtype),
               a, k, normalized, hard)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("logits", ["randn", "offset", "spread", "confident"])
@pytest.mark.parametrize("teacher", ["soft", "one_hot", "zeros", "tiny"])
@pytest.mark.parametrize("alpha", [1e-6, 0.5, 1.0], ids=str)
def test_slam_logits_and_teachers(device, dtype, hard, logits, teacher, alpha):
    g = torch.Generator().manual_seed(12)
    check_slam(device, dtype, slam_logits(logits, g, dtype), slam_teacher(teacher, g, dtype),
               alpha, 5, True, hard)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha,k,normalized,name", [
    (0.0, 3, False, "alpha"), (1.5, 3, False, "alpha"), (-0.1, 3, False, "alpha"),
    (0.5, 0, False, "k"), (0.5, C + 1, False, "k"), (0.5, 1, True, "k")])
def test_slam_rejects_out_of_range_scalars_by_name(device, alpha, k, normalized, name):
    z = torch.randn(N, C, device=device)
    t = torch.softmax(torch.randn(N, C, device=device), 1)
    with pytest.raises(ValueError, match=name):
        slam_loss(z, t, alpha, k, normalized=normalized)
        check_errors(torch.device(device))  # CUDA kernels record, this raises


# ----------------------------------------------------------------- correlation distances

def exact_corr(s, t, center):
    """Per-row distance, its scale 1 + |cos w|, the gradient w.r.t. s and its per-row
    scale, rows along the last dim of 2-D inputs, in mpmath."""
    rows, rscale, grads, gscale = [], [], [], []
    eps = mpmath.mpf(1e-8)
    for sr, tr in zip(s.double().tolist(), t.double().tolist()):
        u = [mpmath.mpf(x) for x in sr]
        v = [mpmath.mpf(x) for x in tr]
        mu = mv = mpmath.mpf(0)
        if center:
            mu, mv = mpmath.fsum(u) / len(u), mpmath.fsum(v) / len(v)
            u = [x - mu for x in u]
            v = [x - mv for x in v]
        nu = mpmath.sqrt(mpmath.fsum(x * x for x in u))
        nv = mpmath.sqrt(mpmath.fsum(x * x for x in v))
        if nu == 0 or nv == 0:
            rows.append(1.0), rscale.append(1.0)
            grads.append([0.0] * len(u)), gscale.append(1e-300)
            continue
        dot = mpmath.fsum(x * y for x, y in zip(u, v))
        den = nu * nv + eps
        rows.append(float(1 - dot / den))
        rscale.append(float(1 + abs(dot / den)))
        grads.append([float(-y / den + dot * nv * x / (nu * den * den)) for x, y in zip(u, v)])
        # u_j = s_j - mean s is formed from terms of size |s_j| + |mean s|.
        gscale.append(float(max((abs(y1) + abs(mv)) / den
                                + abs(dot) * nv * (abs(x1) + abs(mu)) / (nu * den * den)
                                for x1, y1 in zip(sr, tr))))
    return (torch.tensor(rows, dtype=torch.float64), torch.tensor(rscale, dtype=torch.float64),
            torch.tensor(grads, dtype=torch.float64),
            torch.tensor(gscale, dtype=torch.float64)[:, None])


D = 64
MAGNITUDES = [1e-30, 1e-10, 1.0, 1e10, 1e30]


def corr_inputs(kind, scale_s, scale_t, center, g, dtype):
    s = torch.randn(4, D, generator=g, dtype=torch.float64)
    t = 0.6 * s + torch.randn(4, D, generator=g, dtype=torch.float64)
    if kind == "offset":  # rows far above their spread (Pearson's mean dominates)
        s, t = s + 3e3, t - 5e3
    s, t = s * scale_s, t * scale_t
    if kind == "degenerate":
        if center:
            s[0] = 2.5 * scale_s     # constant rows: zero variance
            t[1] = -0.1 * scale_t
        else:
            s[0] = 0.0
            t[1] = 0.0
        t[3] = s[3] * 1.5            # aligned: the distance cancels to ~0
    return s.to(dtype), t.to(dtype)


def check_corr(device, dtype, s, t, center, layout):
    exact, rscale, exact_grad, gscale = exact_corr(s, t, center)
    op = "pearson" if center else "cosine"
    ss = s.to(device)
    tt = t.to(device)
    if layout == "features":
        # (B, D, inner) over dim=1: rows 4 apart (the strided kernels); row r = (0, :, r).
        ss, tt = ss.t().unsqueeze(0).contiguous(), tt.t().unsqueeze(0).contiguous()
        dim = 1
    else:
        dim = -1
    ss.requires_grad_()
    rows = distance(ss, tt, op, dim=dim, reduction="none").reshape(-1)
    (grad,) = torch.autograd.grad(rows.sum(), ss)
    if layout == "features":
        grad = grad[0].t()
    eps = torch.finfo(dtype).eps
    err = ((rows.double().cpu() - exact).abs() / rscale).max().item()
    assert err <= C_DIST * math.sqrt(D) * eps, f"distance relative error {err:.3g}"
    gerr = ((grad.double().cpu() - exact_grad).abs() / gscale).max().item()
    assert gerr <= C_DIST_GRAD * math.sqrt(D) * eps, f"gradient relative error {gerr:.3g}"
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("center", [False, True], ids=["cosine", "pearson"])
@pytest.mark.parametrize("layout", ["rows", "features"])
@pytest.mark.parametrize("kind", ["randn", "offset", "degenerate"])
@pytest.mark.parametrize("magnitude", MAGNITUDES, ids=lambda m: f"{m:g}")
def test_correlation_over_magnitudes(device, dtype, center, layout, kind, magnitude):
    g = torch.Generator().manual_seed(13)
    s, t = corr_inputs(kind, magnitude, magnitude, center, g, dtype)
    check_corr(device, dtype, s, t, center, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("center", [False, True], ids=["cosine", "pearson"])
@pytest.mark.parametrize("scales", [(1e30, 1e-30), (1e-30, 1e20), (1e15, 1e15)], ids=str)
def test_correlation_inputs_at_unrelated_scales(device, dtype, center, scales):
    g = torch.Generator().manual_seed(14)
    s, t = corr_inputs("randn", *scales, center, g, dtype)
    check_corr(device, dtype, s, t, center, "rows")
