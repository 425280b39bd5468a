"""The exact sparse_kd_loss of a row, in mpmath: the oracle of tests/test_sparse_extreme_scalars.py.

Takes the floats the op reads (z, I, l, lambda) as exact numbers and forms, at 60 digits,
the teacher's buckets P (renormalized or raw, with or without the tail), the student's
q = softmax(z/T) and buckets Q (the tail as the sum over the classes outside I, not
1 - sum), the divergence D and its gradient w.r.t. z (docs/math.md §4, §4.1), and the
size of the terms each is formed from: the scale rounding is relative to.
"""
import mpmath

mpmath.mp.dps = 60


def _xlog(w, a, b):
    return mpmath.mpf(0) if w == 0 else w * (a - b)


def exact_row(z, idx, lp, T, renormalize=True, tail=None, divergence="forward_kl", beta=0.5,
              scale_by_t2=True):
    """(row loss, gradient list, loss term scale, gradient term scale) as floats.

    The term scales: s * sum_b (P_b + Q_b)(|log P_b| + |log Q_b| + |D|) for the loss,
    s / T * max_j q_j (1 + |G| terms) for the gradient (see exact_grad_scale)."""
    T = mpmath.mpf(T)
    s = T * T if scale_by_t2 else mpmath.mpf(1)
    beta = mpmath.mpf(beta)
    xs = [mpmath.mpf(v) / T for v in z]
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
    lq_all = [v - lse for v in xs]
    kept = [(j, mpmath.mpf(l)) for j, l in zip(idx, lp) if j >= 0]
    kept_set = {j for j, _ in kept}
    ls = [l for _, l in kept] + ([mpmath.mpf(tail)] if tail is not None else [])
    finite = [l for l in ls if l != -mpmath.inf]
    log_norm = mpmath.log(mpmath.fsum(mpmath.exp(l) for l in finite)) if renormalize else 0
    lP = [l - log_norm for l in ls]
    lQ = [lq_all[j] for j, _ in kept]
    if tail is not None:
        rest = [mpmath.exp(lq_all[j]) for j in range(len(z)) if j not in kept_set]
        q_tail = mpmath.fsum(rest)
        lQ.append(mpmath.log(q_tail) if q_tail > 0 else -mpmath.inf)
    P = [mpmath.exp(v) for v in lP]
    Q = [mpmath.exp(v) for v in lQ]
    mass = mpmath.fsum(P)
    if divergence == "jsd" and beta == 0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        d = mpmath.fsum(_xlog(p, a, b) for p, a, b in zip(P, lP, lQ))
        G = [-p / q if p != 0 else mpmath.mpf(0) for p, q in zip(P, Q)]
        dval = d
    elif divergence == "reverse_kl":
        d = mpmath.fsum(_xlog(q, b, a) for q, a, b in zip(Q, lP, lQ))
        G = [b - a + 1 for a, b in zip(lP, lQ)]
        dval = d
    else:
        lM = [mpmath.log(beta * p + (1 - beta) * q) for p, q in zip(P, Q)]
        d_t = mpmath.fsum(_xlog(p, a, m) for p, a, m in zip(P, lP, lM))
        d_s = mpmath.fsum(_xlog(q, b, m) for q, b, m in zip(Q, lQ, lM))
        d = beta * d_t + (1 - beta) * d_s
        G = [(1 - beta) * (b - m) for b, m in zip(lQ, lM)]
        dval = d_s
    # d/dx_j = q_j (G_{b(j)} - Gbar) with Gbar = sum_b G_b Q_b; classes outside I belong
    # to the tail bucket (G = 0 without a tail: forward KL over the kept classes only).
    g_tail = G[-1] if tail is not None else mpmath.mpf(0)
    gbar = mpmath.fsum(g * q for g, q in zip(G, Q) if q != 0)
    bucket_of = {j: b for b, (j, _) in enumerate(kept)}
    grads = []
    for j in range(len(z)):
        g = G[bucket_of[j]] if j in bucket_of else g_tail
        grads.append(s / T * mpmath.exp(lq_all[j]) * (g - gbar))
    terms = s * mpmath.fsum((p + q) * (abs(a) + abs(b) + abs(dval) + 1)
                            for p, q, a, b in zip(P, Q, lP, lQ) if p + q != 0)
    gscale = s / T * max(mpmath.exp(lq_all[j]) * (abs(G[bucket_of[j]] if j in bucket_of else g_tail)
                                                  + abs(gbar) + mass + abs(dval) + 1)
                         for j in range(len(z)))
    return float(s * d), [float(g) for g in grads], float(terms), float(gscale)
