"""sparse_kd_loss with the teacher's tail bucket (docs/math.md §4.1) and the fused top-K
path fused_linear_sparse_kd_loss (§4.2): the K + 1 bucket divergences (forward KL,
reverse KL, JSD) against sparse_kd_loss_ref, which forms the student's tail exactly from
its full log-softmax; K = C against the dense kd_loss; gradcheck and opcheck; the fused
path against the reference on full logits."""
import pytest
import torch

from distillkit import fused_linear_sparse_kd_loss, kd_loss, sparse_kd_loss
from distillkit.data.sparse_cache import teacher_topk
from distillkit.ops.options import LogitHead
from distillkit.reference import sparse_kd_loss_ref

from conftest import DEVICES
from test_sparse_kd import assert_matches, run_both

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def make_inputs(n, c, k, dtype=torch.float32, device="cpu", temperature=2.0, scale=3.0):
    """Student logits (requires grad) and a random teacher's cached top-k at T: indices,
    log-probabilities and log tail mass, as write_teacher_topk stores them."""
    z = (torch.randn(n, c, device=device) * scale).to(dtype).requires_grad_()
    u = torch.randn(n, c, device=device) * scale
    lp, idx, tail = teacher_topk(u, k, temperature)
    lp_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return z, idx, lp.to(lp_dtype), tail.to(lp_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=str)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "labels+padding"])
def test_tail_table(device, dtype, divergence, beta, renormalize, masked):
    n, c, k = 6, 37, 5
    z, idx, lp, tail = make_inputs(n, c, k, dtype, device)
    kw = dict(temperature=2.0, renormalize=renormalize, divergence=divergence, beta=beta,
              reduction="none")
    if masked:
        idx[0, 2:] = -1          # fewer kept classes (their mass is not in the tail: raw
        idx[2] = -1              # rows then sum below 1, renormalized ones are rescaled)
        labels = torch.zeros(n, dtype=torch.long, device=device)
        labels[4] = -100
        kw.update(labels=labels)
    assert_matches(*run_both(z, idx, lp, teacher_tail_logprob=tail, **kw), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=str)
@pytest.mark.parametrize("n,c,k", [(3, 1001, 8), (2, 4099, 64), (2, 32000, 32)], ids=str)
def test_tail_shapes(device, divergence, beta, n, c, k):
    z, idx, lp, tail = make_inputs(n, c, k, device=device, temperature=1.5)
    kw = dict(temperature=1.5, divergence=divergence, beta=beta)
    assert_matches(*run_both(z, idx, lp, teacher_tail_logprob=tail, **kw), torch.float32)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=str)
def test_every_class_kept_is_dense_kd(divergence, beta):
    """K = C: the tail is empty on both sides (-inf), and every divergence is kd_loss's."""
    n, c, T = 4, 29, 2.0
    z = (torch.randn(n, c, dtype=torch.float64) * 3).requires_grad_()
    u = torch.randn(n, c, dtype=torch.float64) * 3
    lp, idx, tail = teacher_topk(u, c, T)
    assert torch.isneginf(tail).all()
    loss = sparse_kd_loss(z, idx, lp.double(), teacher_tail_logprob=tail.double(),
                          temperature=T, divergence=divergence, beta=beta, reduction="none")
    dense = kd_loss(z, u, temperature=T, divergence=divergence, beta=beta, reduction="none")
    # teacher_topk's fp32 log-softmax is the only difference: fp32 rounding.
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-5)
    g, gd = (torch.autograd.grad(x.sum(), z)[0] for x in (loss, dense))
    torch.testing.assert_close(g, gd, rtol=1e-4, atol=1e-6)


def test_forward_kl_with_tail_is_the_bucket_kl():
    """A hand-made row: P = (0.5, 0.3 | 0.2), the student's buckets from its softmax."""
    z = torch.tensor([[1.0, 0.0, -1.0, 2.0]], dtype=torch.float64)
    idx = torch.tensor([[3, 0]])
    lp = torch.tensor([[0.5, 0.3]], dtype=torch.float64).log()
    tail = torch.tensor([0.2], dtype=torch.float64).log()
    q = torch.softmax(z, -1)[0]
    Q = torch.stack([q[3], q[0], q[1] + q[2]])
    P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for divergence, expected in (("forward_kl", (P * (P / Q).log()).sum()),
                                 ("reverse_kl", (Q * (Q / P).log()).sum())):
        loss = sparse_kd_loss(z, idx, lp, teacher_tail_logprob=tail, divergence=divergence,
                              reduction="sum")
        torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)


def test_tail_edge_values():
    """A teacher tail of exactly 0 (-inf); a student tail of 1e-9, formed as
    log1p(-sum q) and so good to eps / 1e-9 relative (docs/math.md §4.1); and the named
    limit of that form: a student whose kept mass rounds to 1 has an empty tail, and
    against a teacher tail of nonzero mass its forward KL is +inf (exact: finite)."""
    z = torch.tensor([[0.0, 0.0, -200.0], [0.0, 0.0, -20.0]], dtype=torch.float64,
                     requires_grad=True)
    idx = torch.tensor([[0, 1], [0, 1]])
    lp = torch.full((2, 2), 0.5, dtype=torch.float64).log()
    for tail_value in (float("-inf"), -3.0):
        tail = torch.full((2,), tail_value, dtype=torch.float64)
        for divergence in ("forward_kl", "reverse_kl", "jsd"):
            kw = dict(teacher_tail_logprob=tail, divergence=divergence, reduction="none")
            loss = sparse_kd_loss(z, idx, lp, **kw)
            ref = sparse_kd_loss_ref(z, idx, lp, **kw)
            g = torch.autograd.grad(loss.sum(), z)[0]
            gr = torch.autograd.grad(ref.sum(), z)[0]
            if tail_value == -3.0 and divergence == "forward_kl":
                assert torch.isposinf(loss[0]) and torch.isfinite(ref[0])
                loss, ref, g, gr = loss[1:], ref[1:], g[1:], gr[1:]
            elif tail_value == float("-inf") and divergence == "reverse_kl":
                # Student tail mass against a teacher tail of 0: +inf, exactly; row 0's
                # tail (1e-88) is the named limit again: empty, so its row is finite.
                assert torch.isposinf(loss[1]) and torch.isposinf(ref).all()
                assert torch.isfinite(loss[0])
                continue
            torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-12)
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, gr, rtol=1e-6, atol=1e-12)


def test_reverse_and_jsd_need_the_tail():
    z, idx, lp, _ = make_inputs(3, 10, 2)
    for divergence, beta in (("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 1.0)):
        with pytest.raises(ValueError, match="needs teacher_tail_logprob"):
            sparse_kd_loss(z, idx, lp, divergence=divergence, beta=beta)
    sparse_kd_loss(z, idx, lp, divergence="jsd", beta=0.0)  # beta = 0 is forward KL
    with pytest.raises(ValueError, match="divergence must be one of"):
        sparse_kd_loss(z, idx, lp, divergence="tv")


@pytest.mark.parametrize("bad,message", [
    (lambda t: t[:-1], r"teacher_tail_logprob must have shape \(3,\)"),
    (lambda t: t.long(), "teacher_tail_logprob must be a floating-point tensor"),
], ids=["shape", "dtype"])
def test_bad_tail(bad, message):
    z, idx, lp, tail = make_inputs(3, 10, 2)
    with pytest.raises(ValueError, match=message):
        sparse_kd_loss(z, idx, lp, teacher_tail_logprob=bad(tail))


def test_op_level_tail_checks_name_arguments():
    z, idx, lp, tail = make_inputs(3, 10, 2)
    with pytest.raises(ValueError, match="teacher_tail_logprob must have teacher_logprobs' dtype"):
        torch.ops.distillkit.sparse_kd_loss_forward(z, idx, lp, None, 1.0, True, -100, True, True,
                                                    tail.double(), "forward_kl", 0.5)
    with pytest.raises(ValueError, match="needs teacher_tail_logprob"):
        torch.ops.distillkit.sparse_kd_loss_forward(z, idx, lp, None, 1.0, True, -100, True, True,
                                                    None, "reverse_kl", 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=str)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_gradcheck(device, divergence, beta, renormalize):
    z, idx, lp, tail = make_inputs(4, 9, 3, torch.float64, device, temperature=1.7)
    idx[1, 1] = -1
    labels = torch.tensor([0, 0, -100, 0], device=device)

    def f(z):
        return sparse_kd_loss(z, idx, lp, teacher_tail_logprob=tail, temperature=1.7,
                              renormalize=renormalize, divergence=divergence, beta=beta,
                              labels=labels, reduction="none")

    assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_opcheck(device, divergence):
    z, idx, lp, tail = make_inputs(5, 33, 4, device=device)
    idx[3] = -1
    y = torch.tensor([0, 3, -100, 32, 7], device=device)
    args = (z, idx, lp, y, 2.0, True, -100, True, True, tail, divergence, 0.3)
    torch.library.opcheck(torch.ops.distillkit.sparse_kd_loss_forward, args)
    loss, stats = torch.ops.distillkit.sparse_kd_loss_forward(*args)
    torch.library.opcheck(torch.ops.distillkit.sparse_kd_loss_backward,
                          (torch.rand_like(loss), z.detach(), idx, lp, y, stats, 2.0, True,
                           -100, True, tail, divergence, 0.3))


# --- fused_linear_sparse_kd_loss ----------------------------------------------------------

def fused_and_reference(h, w, b, idx, lp, tail, head=None, chunk_rows=5, **kw):
    """The fused loss and its gradients w.r.t. (h, w, b), and the reference on the full
    logits z = head(h Wᵀ + b)."""
    out = []
    for fused in (True, False):
        leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
        if fused:
            loss = fused_linear_sparse_kd_loss(leaves[0], leaves[1], idx, lp, tail,
                                               student_bias=leaves[2], student_head=head,
                                               chunk_rows=chunk_rows, **kw)
        else:
            z = leaves[0] @ leaves[1].t() + leaves[2]
            if head is not None:
                z = z * head.scale
                if head.softcap is not None:
                    z = torch.tanh(z / head.softcap) * head.softcap
            loss = sparse_kd_loss_ref(z, idx, lp, teacher_tail_logprob=tail, **kw)
        out.append((loss, torch.autograd.grad(loss, leaves)))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_tail", [True, False], ids=["tail", "no_tail"])
def test_fused_matches_reference(device, divergence, beta, reduction, with_tail):
    if not with_tail and divergence != "forward_kl":
        pytest.skip("reverse KL and JSD need the tail")
    n, hid, c, k, T = 13, 16, 97, 8, 2.0
    h = torch.randn(n, hid, device=device)
    w = torch.randn(c, hid, device=device) * 0.5
    b = torch.randn(c, device=device) * 0.1
    _, idx, lp, tail = make_inputs(n, c, k, device=device, temperature=T)
    idx[3] = -1  # a dead row
    labels = torch.zeros(n, dtype=torch.long, device=device)
    labels[5] = -100
    weight = torch.rand(n, device=device)
    (loss, grads), (rloss, rgrads) = fused_and_reference(
        h, w, b, idx, lp, tail if with_tail else None, temperature=T, divergence=divergence,
        beta=beta, reduction=reduction, labels=labels, weight=weight)
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-6)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)


def test_fused_head_bf16_and_shapes():
    """(B, S, H) hidden states, a soft-capped head, bf16 weights: the reference on the
    same bf16 logits."""
    torch.manual_seed(3)
    B, S, hid, c, k = 2, 7, 16, 64, 6
    h = torch.randn(B, S, hid).bfloat16()
    w = (torch.randn(c, hid) * 0.5).bfloat16()
    b = (torch.randn(c) * 0.1).bfloat16()
    _, idx, lp, tail = make_inputs(B * S, c, k)
    idx, lp, tail = idx.view(B, S, k), lp.view(B, S, k), tail.view(B, S)
    head = LogitHead(scale=0.7, softcap=5.0)
    (loss, grads), (rloss, rgrads) = fused_and_reference(h, w, b, idx, lp, tail, head=head,
                                                         chunk_rows=4, divergence="jsd")
    torch.testing.assert_close(loss, rloss, rtol=2e-2, atol=2e-3)
    for g, rg in zip(grads, rgrads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), rg.float(), rtol=5e-2, atol=5e-3)


def test_fused_no_grad_and_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    _, idx, lp, tail = make_inputs(4, 10, 3)
    with torch.no_grad():
        loss = fused_linear_sparse_kd_loss(h, w, idx, lp, tail)
    torch.testing.assert_close(loss, sparse_kd_loss_ref(h @ w.t(), idx, lp,
                                                        teacher_tail_logprob=tail))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        fused_linear_sparse_kd_loss(h, w, idx, lp, reduction="none")
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        fused_linear_sparse_kd_loss(h, w, idx, lp, chunk_rows=0)
    with pytest.raises(ValueError, match=r"student_weight must have shape \(V, 8\)"):
        fused_linear_sparse_kd_loss(h, w.t(), idx, lp)
    with pytest.raises(ValueError, match="needs teacher_tail_logprob"):
        fused_linear_sparse_kd_loss(h, w, idx, lp, divergence="reverse_kl")
    with pytest.raises(ValueError, match=r"teacher_indices must have shape \(4,\)"):
        fused_linear_sparse_kd_loss(h, w, idx[:3], lp[:3])
    h.requires_grad_()
    (g,) = torch.autograd.grad(fused_linear_sparse_kd_loss(h, w, idx, lp), h, create_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_sparse_kd_loss does not support double"):
        g.sum().backward()
