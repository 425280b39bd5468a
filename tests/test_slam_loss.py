"""slam_loss (docs/math.md §5) and forward_corrected_loss (§6) against their references."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from distillkit import forward_corrected_loss, slam_loss
from distillkit.reference import forward_corrected_loss_ref, slam_loss_ref, topk_mask_ref

from conftest import DEVICES, GRAD_TOL, HAS_CUDA, LOSS_TOL, NEEDS_CUDA, copies_made

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def teacher(n, c, device="cpu", dtype=torch.float32, sharp=2.0):
    return torch.softmax(torch.randn(n, c, device=device) * sharp, 1).to(dtype)


def run_both(z, t, alpha, k, **kw):
    out, g = [], None
    for fn in (slam_loss, slam_loss_ref):
        loss = fn(z, t, alpha, k, **kw)
        if g is None:
            g = torch.randn_like(loss) if loss.dim() else torch.ones_like(loss)
        out.append((loss, torch.autograd.grad(loss, z, g)[0]))
    return out


def assert_matches(fused, ref, dtype, loss_tol=None):
    (loss, grad), (rloss, rgrad) = fused, ref
    assert loss.dtype == rloss.dtype and grad.dtype == rgrad.dtype
    torch.testing.assert_close(loss, rloss, **dict(zip(("rtol", "atol"), loss_tol or LOSS_TOL[dtype])))
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.float(), rgrad.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hard,normalized", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_table(device, dtype, hard, normalized, reduction, weighted):
    n, c = 7, 41
    z = (torch.randn(n, c, device=device) * 3).to(dtype).requires_grad_()
    t = teacher(n, c, device)
    t = (t / t.sum(1, keepdim=True)).to(dtype)
    alpha = torch.rand(n, device=device) * 0.9 + 0.05
    k = torch.randint(2, 8, (n,), device=device)
    w = torch.rand(n, device=device) if weighted else None
    tol = (1e-4, 1e-4) if dtype in (torch.bfloat16, torch.float16) else None
    assert_matches(*run_both(z, t, alpha, k, hard=hard, normalized=normalized,
                             reduction=reduction, weight=w), dtype, tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [2, 3, 37, 1000, 32000])
@pytest.mark.parametrize("k_kind", ["1", "2", "C", "mixed"])
@pytest.mark.parametrize("alpha", [1e-3, 0.5, 1.0])
def test_shapes_k_alpha(device, c, k_kind, alpha):
    n = 4 if c > 1000 else 6
    z = (torch.randn(n, c, device=device) * 3).requires_grad_()
    t = teacher(n, c, device)
    k = {"1": 1, "2": 2, "C": c, "mixed": torch.randint(1, c + 1, (n,), device=device)}[k_kind]
    (loss, grad), (rloss, rgrad) = run_both(z, t, alpha, k, reduction="none")
    torch.testing.assert_close(loss, rloss, rtol=2e-5, atol=1e-5)
    # Member gradients grow like 1/alpha (h = -t f a / q with q >= alpha) and then
    # cancel against f S, so fp32 rounding scales with 1/alpha in both implementations.
    torch.testing.assert_close(grad, rgrad, rtol=1e-4, atol=1e-7 / alpha)


@pytest.mark.parametrize("device", DEVICES)
def test_forced_ties_and_zero_rows(device):
    c = 50
    t = torch.zeros(5, c, device=device)
    t[0, [3, 7, 9, 20]] = 0.25            # four-way tie at the top, k = 2 takes 3 and 7
    t[1, :] = 1.0 / c                     # all tied: the lowest indices win
    t[2, 10] = 1.0                        # one-hot: everything else is an exact zero
    t[3, [5, 6]] = 0.5                    # tie at the top, k = 3 reaches into the zeros
    t[4, [1, 2, 40]] = torch.tensor([0.2, 0.4, 0.4])
    k = torch.tensor([2, 5, 3, 3, 2], device=device)
    mask = topk_mask_ref(t, k)
    assert mask[0].nonzero().flatten().tolist() == [3, 7]
    assert mask[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert mask[3].nonzero().flatten().tolist() == [0, 5, 6]
    assert mask[4].nonzero().flatten().tolist() == [2, 40]
    z = torch.randn(5, c, device=device, requires_grad=True)
    for hard in (False, True):
        assert_matches(*run_both(z, t, 0.3, k, hard=hard, reduction="none"), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_one_is_cross_entropy(device):
    z = torch.randn(6, 20, device=device, requires_grad=True)
    t = teacher(6, 20, device)
    loss = slam_loss(z, t, 1.0, 3)
    expected = F.cross_entropy(z, t)
    torch.testing.assert_close(loss, expected)
    grad, = torch.autograd.grad(loss, z)
    torch.testing.assert_close(grad, (torch.softmax(z, 1) - t).detach() / 6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hard", [False, True])
def test_gradient_rows_sum_to_zero(device, hard):
    z = (torch.randn(5, 300, device=device) * 4).requires_grad_()
    loss = slam_loss(z, teacher(5, 300, device), torch.rand(5, device=device), 4, hard=hard,
                     reduction="sum")
    grad, = torch.autograd.grad(loss, z)
    torch.testing.assert_close(grad.sum(1), torch.zeros(5, device=device), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits_and_underflow(device):
    """f underflows to 0 for most classes: finite loss, no NaN, matches the reference."""
    z = (torch.randint(-1, 2, (4, 257), device=device) * 1e4).float().requires_grad_()
    t = teacher(4, 257, device, sharp=5.0)
    for alpha, normalized in itertools.product([1e-3, 0.5, 1.0], [False, True]):
        fused, ref = run_both(z, t, alpha, 5, normalized=normalized, reduction="none")
        assert torch.isfinite(fused[1]).all()
        torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-2)
        torch.testing.assert_close(fused[1], ref[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_mixed_dtypes(device):
    base = torch.randn(12, 30, device=device)
    z = base[::2].requires_grad_()
    t = teacher(6, 30, device).t().contiguous().t()  # column-major
    assert not z.is_contiguous() and not t.is_contiguous()
    assert_matches(*run_both(z, t, 0.4, 3), torch.float32)
    zb = torch.randn(6, 30, device=device).bfloat16().requires_grad_()
    fused, ref = run_both(zb, teacher(6, 30, device), 0.4, 3)
    assert fused[1].dtype == torch.bfloat16
    assert_matches(fused, ref, torch.bfloat16, loss_tol=(1e-4, 1e-4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pads", [(8, 8), (3, 3), (5, 2)], ids=str)
@pytest.mark.parametrize("hard", [False, True])
def test_row_strided_inputs_are_read_in_place(device, dtype, pads, hard):
    """Slices of wider rows (class dim contiguous, any row stride) give bitwise the
    contiguous result, and the kernels read them without a copy (the value checks'
    fp32 view of a 16-bit teacher, made for contiguous inputs too, aside)."""
    n, c = 6, 203
    z = (torch.randn(n, c, device=device) * 3).to(dtype)
    t = teacher(n, c, device, dtype=dtype)
    zs = torch.zeros(n, c + pads[0], device=device, dtype=dtype)[:, :c].copy_(z)
    ts = torch.zeros(n, c + pads[1], device=device, dtype=dtype)[:, :c].copy_(t)
    alpha = torch.rand(n, device=device) * 0.9 + 0.05
    k = torch.randint(2, 8, (n,), device=device)
    flags = (True, hard)
    gl = torch.rand(n, device=device) + 0.5
    want = {}
    contiguous_copies = copies_made(lambda: want.update(
        fwd=torch.ops.distillkit.slam_loss_forward(z, t, alpha, k, *flags)), (n, c))
    loss, stats = want["fwd"]
    contiguous_copies += copies_made(lambda: want.update(
        bwd=torch.ops.distillkit.slam_loss_backward(gl, z, t, alpha, k, stats, *flags)), (n, c))
    grad = want["bwd"]
    out = {}
    copies = copies_made(lambda: out.update(
        fwd=torch.ops.distillkit.slam_loss_forward(zs, ts, alpha, k, *flags)), (n, c))
    copies += copies_made(lambda: out.update(
        bwd=torch.ops.distillkit.slam_loss_backward(gl, zs, ts, alpha, k, stats, *flags)), (n, c))
    assert copies == contiguous_copies
    assert torch.equal(out["fwd"][0], loss) and torch.equal(out["fwd"][1], stats)
    assert torch.equal(out["bwd"], grad) and out["bwd"].is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    z = torch.randn(0, 5, device=device, requires_grad=True)
    loss = slam_loss(z, torch.zeros(0, 5, device=device), 0.5, 2)
    assert loss.item() == 0.0
    assert torch.autograd.grad(loss, z)[0].shape == (0, 5)


BAD = [
    (dict(alpha=0.0), r"alpha must be in \(0, 1\]"),
    (dict(alpha=1.5), r"alpha must be in \(0, 1\]"),
    (dict(k=0), r"k must be in \[1, 10\]"),
    (dict(k=11), r"k must be in \[1, 10\]"),
    (dict(k=1, normalized=True), "normalized=True needs k >= 2"),
    (dict(k=torch.tensor([1, 2, 3])), "k must have shape"),
    (dict(k=2.5), "k must be int64"),
    (dict(alpha=torch.full((3,), 0.5)), "alpha must have shape"),
    (dict(teacher="negative"), "teacher_probs must be non-negative"),
    (dict(teacher="unnormalized"), "teacher_probs rows must sum to 1"),
    (dict(teacher="nan"), "teacher_probs must be non-negative"),
    (dict(teacher="shape"), "teacher_probs must have the shape"),
    (dict(reduction="batchmean"), "reduction"),
    (dict(weight=torch.ones(3)), "weight must have shape"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad,message", BAD, ids=lambda x: str(x)[:40])
def test_bad_input(device, bad, message):
    bad = dict(bad)
    z = torch.randn(4, 10, device=device)
    t = teacher(4, 10, device)
    kind = bad.pop("teacher", None)
    if kind == "negative":
        t[1, 0] = -0.1
    elif kind == "unnormalized":
        t[2] *= 1.1
    elif kind == "nan":
        t[0, 0] = float("nan")
    elif kind == "shape":
        t = teacher(4, 11, device)
    args = dict(alpha=0.5, k=2)
    args.update({key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in bad.items()})
    alpha, k = args.pop("alpha"), args.pop("k")
    with pytest.raises(ValueError, match=message):
        slam_loss(z, t, alpha, k, **args)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hard,normalized", [(False, False), (True, True)])
def test_gradcheck(device, hard, normalized):
    z = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    t = teacher(3, 6, device, torch.float64)
    alpha = torch.tensor([0.2, 0.7, 1.0], dtype=torch.float64, device=device)
    k = torch.tensor([2, 3, 6], device=device)
    assert torch.autograd.gradcheck(
        lambda z: slam_loss(z, t, alpha, k, hard=hard, normalized=normalized, reduction="none"),
        (z,))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    z = torch.randn(5, 33, device=device, requires_grad=True)
    t = teacher(5, 33, device)
    alpha = torch.rand(5, device=device) * 0.9 + 0.1
    k = torch.tensor([1, 2, 5, 33, 3], device=device)
    torch.library.opcheck(torch.ops.distillkit.slam_loss_forward, (z, t, alpha, k, False, False))
    loss, stats = torch.ops.distillkit.slam_loss_forward(z, t, alpha, k, False, True)
    torch.library.opcheck(torch.ops.distillkit.slam_loss_backward,
                          (torch.rand_like(loss), z.detach(), t, alpha, k, stats, False, True))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    z = torch.randn(6, 40, device=device, requires_grad=True)
    t = teacher(6, 40, device)
    alpha = torch.rand(6, device=device) * 0.9 + 0.1
    k = torch.randint(1, 6, (6,), device=device)

    def f(z):
        return slam_loss(z, t, alpha, k, normalized=False)

    compiled = torch.compile(f, fullgraph=True)
    out, eager = compiled(z), f(z)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out, z), torch.autograd.grad(eager, z))


def test_deterministic_across_thread_counts():
    z = torch.randn(64, 3001)
    t = teacher(64, 3001)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(slam_loss(z, t, 0.5, 7, reduction="none"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hard", [False, True])
def test_cuda_matches_cpu(dtype, hard):
    n, c = 9, 32000
    z = torch.randn(n, c).to(dtype).requires_grad_()
    t = teacher(n, c)
    t[0, :] = 1.0 / c  # an all-tied row
    alpha = torch.rand(n) * 0.9 + 0.1
    k = torch.tensor([1, 2, 5, 5, 40, 100, 1000, c, 3])
    cpu = slam_loss(z, t, alpha, k, hard=hard, reduction="none")
    cpu_grad, = torch.autograd.grad(cpu.sum(), z)
    zc = z.detach().cuda().requires_grad_()
    gpu = slam_loss(zc, t.cuda(), alpha.cuda(), k.cuda(), hard=hard, reduction="none")
    gpu_grad, = torch.autograd.grad(gpu.sum(), zc)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(gpu_grad.cpu().float(), cpu_grad.float(), rtol=rtol, atol=atol)


# --- forward loss correction ---------------------------------------------------------

def transition_matrix(c, noise=0.3, device="cpu"):
    m = torch.full((c, c), noise / (c - 1), device=device)
    m.fill_diagonal_(1 - noise)
    return m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_corrected_loss(device, soft, reduction):
    z = (torch.randn(8, 10, device=device) * 3).requires_grad_()
    targets = teacher(8, 10, device) if soft else torch.randint(0, 10, (8,), device=device)
    tr = transition_matrix(10, device=device)
    a = forward_corrected_loss(z, targets, tr, reduction=reduction)
    b = forward_corrected_loss_ref(z, targets, tr, reduction=reduction)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    torch.testing.assert_close(torch.autograd.grad(a, z, g), torch.autograd.grad(b, z, g))


def test_forward_corrected_identity_is_cross_entropy_and_stable():
    z = torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    torch.testing.assert_close(forward_corrected_loss(z, y, torch.eye(5)), F.cross_entropy(z, y))
    # Logits of 1e4: exp would overflow in a naive softmax @ T; finite here.
    big = torch.tensor([[1e4, -1e4, 0.0]])
    loss = forward_corrected_loss(big, torch.tensor([1]), transition_matrix(3))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, -torch.log(torch.tensor(0.15)))


@pytest.mark.parametrize("bad,message", [
    (dict(transition=torch.ones(4, 4)), "row-stochastic"),
    (dict(transition=torch.eye(3)), "transition must have shape"),
    (dict(targets=torch.tensor([0, 1, 9])), r"targets must be in \[0, 4\)"),
    (dict(targets=torch.tensor([0, 1])), "targets must have shape"),
])
def test_forward_corrected_bad_input(bad, message):
    args = dict(targets=torch.tensor([0, 1, 2]), transition=torch.eye(4))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        forward_corrected_loss(torch.randn(3, 4), args["targets"], args["transition"])
