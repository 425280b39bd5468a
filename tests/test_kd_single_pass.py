"""kd_loss in one pass (issue 15): with a gradient to come, the forward is
kd_loss_forward_grad, which forms the unit gradient while each row is in cache, and the
backward only scales it. Checked against kd_loss_ref, against the two-pass ops
(kd_loss_forward + kd_loss_backward), and for the autograd contract: what is saved,
retain_graph, double backward, the grad_scale variant, opcheck."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distillkit import KDOptions, kd_loss
from distillkit.ops import kd_loss_forward_grad
from distillkit.reference import kd_loss_ref

from conftest import DEVICES, GRAD_TOL, LOSS_TOL

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]
IGNORE = -100


def logits(n, c, dtype, device, scale=3.0):
    return (torch.randn(n, c, device=device) * scale).to(dtype)


def losses_and_grads(fn, z, u, g, **kw):
    z, u = (t.detach().requires_grad_() for t in (z, u))
    loss = fn(z, u, **kw)
    return loss, torch.autograd.grad(loss, (z, u), g)


def assert_close_to_ref(z, u, dtype, **kw):
    """The one-pass gradient against kd_loss_ref under a non-trivial upstream gradient.
    GRAD_TOL covers the one extra rounding of 16-bit logits (the unit gradient is kept in
    the logits' dtype, then scaled and rounded once more: at most 1.5 ulp in all, 6e-3
    relative for bf16, 1.5e-3 for fp16)."""
    with torch.no_grad():
        shape_of = kd_loss(z, u, **kw)
    g = torch.rand_like(shape_of) + 0.5 if shape_of.dim() else torch.full_like(shape_of, 1.7)
    fused = losses_and_grads(kd_loss, z, u, g, **kw)
    ref = losses_and_grads(kd_loss_ref, z, u, g, **kw)
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(fused[0], ref[0], rtol=rtol, atol=atol)
    rtol, atol = GRAD_TOL[dtype]
    for a, b in zip(fused[1], ref[1]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (1, 7), (5, 3), (6, 101), (3, 2049), (2, 32768)],
                         ids=str)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_reference(device, dtype, shape, divergence, beta, reduction):
    n, c = shape
    z, u = logits(n, c, dtype, device), logits(n, c, dtype, device)
    labels = torch.randint(0, c, (n,), device=device)
    labels[1::3] = IGNORE
    assert_close_to_ref(z, u, dtype, divergence=divergence, beta=beta, temperature=2.0,
                        labels=labels, hard_weight=0.25, reduction=reduction,
                        weight=torch.rand(n, device=device) + 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_neg_inf_entries(device, divergence, beta):
    z, u = logits(4, 300, torch.float32, device), logits(4, 300, torch.float32, device)
    z[:, 250:] = float("-inf")  # a padded vocabulary: -inf in both
    u[:, 250:] = float("-inf")
    # One side -inf alone where that keeps the loss finite (docs/math.md §1.6): the teacher
    # for forward KL, the student for reverse KL, either for JSD.
    if divergence != "reverse_kl":
        u[1, 7] = float("-inf")
    if divergence != "forward_kl":
        z[2, 9] = float("-inf")
    assert_close_to_ref(z, u, torch.float32, divergence=divergence, beta=beta,
                        labels=torch.arange(4, device=device), hard_weight=0.3,
                        reduction="none")


@pytest.mark.parametrize("device", DEVICES)
def test_row_strided_and_non_contiguous(device):
    base_z = logits(12, 130, torch.float32, device)
    base_u = logits(130, 12, torch.float32, device)
    z = base_z[::2, :101]               # row stride 260, unit class stride: read in place
    u = base_u.t()[::2, :101]           # class stride 12: copied
    assert not z.is_contiguous() and z.stride(1) == 1 and u.stride(1) != 1
    for divergence, beta in DIVERGENCES:
        assert_close_to_ref(z, u, torch.float32, divergence=divergence, beta=beta,
                            temperature=1.5, reduction="none")
    # A (B, S - 1, V) slice of (B, S, V) logits, as TRL takes them.
    zs, us = (logits(2 * 6 * 40, 1, torch.float32, device).view(2, 6, 40)[:, :-1, :]
              for _ in range(2))
    assert_close_to_ref(zs, us, torch.float32, divergence="jsd", beta=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_same_bits_as_the_two_pass_ops(device, divergence, beta):
    """Where forward_grad's gradient pass is backward_row (JSD; the hard term at T != 1,
    as here) it is the backward op's math per element: its gradient with grad_scale g is
    the backward op's gradient of sum g * rows, bit for bit; a 0-d scale is a per-row one."""
    n, c = 7, 1500
    z, u = logits(n, c, torch.bfloat16, device), logits(n, c, torch.float32, device)
    y = torch.randint(0, c, (n,), device=device)
    y[2] = IGNORE
    opts = KDOptions(temperature=3.0, divergence=divergence, beta=beta, hard_weight=0.4)
    g = torch.rand(n, device=device) + 0.5
    loss0, stats0 = torch.ops.distillkit.kd_loss_forward(z, u, y, *opts.schema_args())
    gz0, gu0 = torch.ops.distillkit.kd_loss_backward(g, z, u, y, stats0, *opts.schema_args(),
                                                     True)
    loss, stats, gz, gu = kd_loss_forward_grad(z, u, y, opts, grad_scale=g, teacher_grad=True)
    for a, b in ((loss, loss0), (stats, stats0), (gz, gz0), (gu, gu0)):
        assert torch.equal(a, b)
    g1 = torch.tensor(0.75, device=device)
    _, _, gz1, gu1 = kd_loss_forward_grad(z, u, y, opts, grad_scale=g1, teacher_grad=True)
    gz2, gu2 = torch.ops.distillkit.kd_loss_backward(g1.expand(n).contiguous(), z, u, y, stats0,
                                                     *opts.schema_args(), True)
    assert torch.equal(gz1, gz2) and torch.equal(gu1, gu2)
    _, _, gz_unit, gu_unit = kd_loss_forward_grad(z, u, y, opts)
    assert gu_unit.shape == (0,)
    assert torch.equal(gz_unit, torch.ops.distillkit.kd_loss_backward(
        torch.ones(n, device=device), z, u, y, stats0, *opts.schema_args(), False)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_kept_exponentials_match_the_two_pass_ops(device, divergence, dtype, teacher_grad):
    """KL rows (no hard term at T != 1) take their gradient from the forward's own
    exponentials, q = exp(z/T - m_j)·exp(m_j - lse) with m_j the online max after tile j,
    instead of exp(z/T - lse). Each exp is within 2 ulp (exp_u20) of its rounded
    argument, and an argument x rounded in fp32 moves exp(x) by up to ε|x| relatively;
    with |z/T - m_j| and |m_j - lse| at most |z/T - lse|, the two q differ by at most
    δq = q·ε·(8 + 2|z/T - lse|), likewise p. A gradient entry is c·(q - p) or c times a
    probability times a log ratio (|log q - log p| + |D| at most) plus the hard term's
    h·q, so the two ops differ by at most (|c|·W + h)·(δq + δp), W = 1 + |log q - log
    p| + |D_s| + |D_t|, plus a rounding of the output dtype each. Rows span 3 tiles:
    the first all -inf in one row (q = 0 before any live entry), a late large max in
    another (m_j rises by ~30), an ignored row, a hard term at T = 1."""
    n, c, temperature, hard_weight = 4, 5000, 1.0, 0.25
    z, u = logits(n, c, dtype, device), logits(n, c, dtype, device)
    z[0, :2048] = u[0, :2048] = float("-inf")
    z[1, 4500], u[1, 4600] = 40.0, 35.0
    y = torch.randint(0, c, (n,), device=device)
    y[0] = 3000
    y[2] = IGNORE
    opts = KDOptions(temperature=temperature, divergence=divergence, hard_weight=hard_weight)
    g = torch.rand(n, device=device) + 0.5
    _, stats0 = torch.ops.distillkit.kd_loss_forward(z, u, y, *opts.schema_args())
    two = torch.ops.distillkit.kd_loss_backward(g, z, u, y, stats0, *opts.schema_args(),
                                                teacher_grad)
    _, stats, *one = kd_loss_forward_grad(z, u, y, opts, grad_scale=g, teacher_grad=teacher_grad)
    assert torch.equal(stats, stats0)
    eps = torch.finfo(torch.float32).eps
    log_q = torch.log_softmax(z.double() / temperature, 1)
    log_p = torch.log_softmax(u.double() / temperature, 1)
    spread = [torch.nan_to_num(lx.abs(), posinf=0.0) for lx in (log_q, log_p)]
    dq, dp = (lx.exp() * eps * (8 + 2 * sx) for lx, sx in zip((log_q, log_p), spread))
    d = stats0[:, 3:5].double().abs().sum(1, keepdim=True)
    w = 1 + torch.nan_to_num((log_q - log_p).abs(), nan=0.0, posinf=0.0) + d
    cg = (g.double() * (1 - hard_weight) / temperature)[:, None]
    bound = (cg * w + g.double()[:, None] * hard_weight) * (dq + dp)
    for got, want in zip(one, two if teacher_grad else two[:1]):
        out = 2 * torch.finfo(dtype).eps * want.double().abs()
        assert (got.double() - want.double()).abs().le(bound + out).all()
    assert one[0][2].eq(0).all()  # the ignored row


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket).split(".")[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_which_pass_runs(device):
    z, u = logits(4, 50, torch.float32, device), logits(4, 50, torch.float32, device)
    with torch.no_grad(), OpLog() as log:
        kd_loss(z.requires_grad_(), u)
    assert "kd_loss_forward" in log.ops and "kd_loss_forward_grad" not in log.ops
    with OpLog() as log:
        loss = kd_loss(z, u)
    assert "kd_loss_forward_grad" in log.ops and "kd_loss_forward" not in log.ops
    with OpLog() as log:
        loss.backward(retain_graph=True)
    # Scaling only: the logits are not read again; the saved gradient is kept for the
    # next backward of the retained graph (a new tensor)...
    assert [op for op in log.ops if op.startswith("kd_loss")] == ["kd_loss_scale_grad"]
    with OpLog() as log:
        loss.backward()
    # ... and scaled in place by the last one (no second N x C buffer).
    assert [op for op in log.ops if op.startswith("kd_loss")] == ["kd_loss_scale_grad_"]
    with OpLog() as log:
        kd_loss(z.detach(), u)  # nothing needs a gradient
    assert "kd_loss_forward" in log.ops


@pytest.mark.parametrize("device", DEVICES)
def test_saves_the_gradient_not_the_logits(device):
    z = logits(6, 64, torch.bfloat16, device).requires_grad_()
    u = logits(6, 64, torch.bfloat16, device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kd_loss(z, u, divergence="jsd", reduction="none")
    big = [t for t in saved if t.numel() >= z.numel()]
    assert len(big) == 1 and big[0].dtype == z.dtype  # the unit gradient, in bf16
    assert all(t.untyped_storage().data_ptr() not in
               (z.untyped_storage().data_ptr(), u.untyped_storage().data_ptr()) for t in saved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_retain_graph_backward_twice(device, reduction):
    z = logits(5, 40, torch.float32, device).requires_grad_()
    u = logits(5, 40, torch.float32, device).requires_grad_()
    loss = kd_loss(z, u, divergence="jsd", reduction=reduction)
    g = torch.rand_like(loss) + 0.5
    first = torch.autograd.grad(loss, (z, u), g, retain_graph=True)
    second = torch.autograd.grad(loss, (z, u), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrt", ["student", "teacher"])
def test_double_backward_raises(device, wrt):
    z = logits(4, 9, torch.float32, device).requires_grad_(wrt == "student")
    u = logits(4, 9, torch.float32, device).requires_grad_(wrt == "teacher")
    x = z if wrt == "student" else u
    (g,) = torch.autograd.grad(kd_loss(z, u, divergence="jsd"), x, create_graph=True)
    with pytest.raises(RuntimeError, match="kd_loss does not support double backward"):
        torch.autograd.grad(g.square().sum(), x, allow_unused=True)


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_only_gradient(device):
    z, u = logits(3, 20, torch.float32, device), logits(3, 20, torch.float32, device)
    assert_close_to_ref(z, u, torch.float32, divergence="jsd", beta=0.3, reduction="none")
    uu = u.clone().requires_grad_()
    kd_loss(z, uu, divergence="jsd").backward()
    ref = u.clone().requires_grad_()
    kd_loss_ref(z, ref, divergence="jsd").backward()
    torch.testing.assert_close(uu.grad, ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_labels_and_grad_scale(device):
    z = logits(4, 10, torch.float32, device).requires_grad_()
    u = logits(4, 10, torch.float32, device)
    opts = KDOptions(hard_weight=0.5)
    with pytest.raises(ValueError, match=r"labels\[3\] = 10"):
        kd_loss(z, u, labels=torch.tensor([0, 1, 2, 10], device=device), hard_weight=0.5)
        torch.ops.distillkit.check_errors(z)
    y = torch.tensor([0, 1, 2, 3], device=device)
    for scale, message in ((torch.ones(3, device=device), "grad_scale must have shape"),
                           (torch.ones(4, device=device, dtype=torch.float64),
                            "grad_scale must be Float"),
                           (torch.ones(4, 1, device=device), "grad_scale must have shape")):
        with pytest.raises(ValueError, match=message):
            kd_loss_forward_grad(z.detach(), u, y, opts, grad_scale=scale)
    loss, *_ = kd_loss_forward_grad(z, u, y, opts, grad_scale=torch.ones(4, device=device))
    with pytest.raises(RuntimeError, match="grad_scale the returned gradient is already final"):
        loss.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    for n, reduction in ((0, "mean"), (0, "none")):
        z = logits(n, 8, torch.float32, device).requires_grad_()
        u = logits(n, 8, torch.float32, device).requires_grad_()
        loss = kd_loss(z, u, reduction=reduction)
        gz, gu = torch.autograd.grad(loss.sum(), (z, u))
        assert gz.shape == z.shape and gu.shape == u.shape


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["unit", "unit_teacher", "rows_scale", "scalar_scale"])
def test_opcheck(device, variant):
    z, u = logits(5, 33, torch.float32, device), logits(5, 33, torch.float32, device)
    y = torch.tensor([0, 3, IGNORE, 32, 7], device=device)
    scale = {"rows_scale": torch.rand(5, device=device),
             "scalar_scale": torch.tensor(0.5, device=device)}.get(variant)
    # With a grad_scale the losses are not differentiable: no autograd inputs then.
    grad = scale is None
    torch.library.opcheck(torch.ops.distillkit.kd_loss_forward_grad,
                          (z.requires_grad_(grad), u.requires_grad_(grad), y, scale, 2.0, "jsd",
                           0.4, 0.3, IGNORE, True, variant != "rows_scale"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad_in_place_op(device, dtype):
    """kd_loss_scale_grad_ is kd_loss_scale_grad in place: the same bits, for (N,) scales
    with factors of exactly 1 among them (rows the CPU kernel skips: x·1 is x) and 0-d
    scales of 1 and not."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    unit = logits(5, 37, dtype, device)
    rows = torch.rand(5, dtype=acc, device=device) + 0.5
    rows[1::2] = 1.0
    for g in (rows, torch.tensor(1.0, dtype=acc, device=device),
              torch.tensor(0.3, dtype=acc, device=device)):
        grad = unit.clone()
        torch.ops.distillkit.kd_loss_scale_grad_(grad, g)
        assert torch.equal(grad, torch.ops.distillkit.kd_loss_scale_grad(unit, g))
    with pytest.raises(ValueError, match="grad must be contiguous"):
        torch.ops.distillkit.kd_loss_scale_grad_(unit.t().contiguous().t(), rows)
    torch.library.opcheck(torch.ops.distillkit.kd_loss_scale_grad_, (unit.clone(), rows))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_loss_saves_its_final_gradient(device, reduction):
    """A reduced loss has its gradient w.r.t. the rows (weight / denominator) before the
    pass: the forward forms the loss's final gradient, and the backward of
    loss.backward() (an upstream 1) only hands it over, in place; a weight or normalizer
    that requires grad takes the per-row path (its gradient needs the rows)."""
    z = logits(6, 40, torch.float32, device).requires_grad_()
    u = logits(6, 40, torch.float32, device)
    y = torch.tensor([0, IGNORE, 2, 3, IGNORE, 5], device=device)
    w = torch.rand(6, device=device) + 0.5
    with OpLog() as log:
        loss = kd_loss(z, u, labels=y, weight=w, hard_weight=0.3, reduction=reduction)
    assert "kd_loss_forward_grad" in log.ops
    (got,) = torch.autograd.grad(loss, z, retain_graph=True)
    ref = z.detach().clone().requires_grad_()
    kd_loss_ref(ref, u, labels=y, weight=w, hard_weight=0.3, reduction=reduction).backward()
    rtol, atol = GRAD_TOL[torch.float32]
    torch.testing.assert_close(got, ref.grad, rtol=rtol, atol=atol)
    (twice,) = torch.autograd.grad(loss, z, torch.tensor(2.0, device=device))
    torch.testing.assert_close(twice, 2 * got, rtol=torch.finfo(torch.float32).eps, atol=0)
    wg = w.clone().requires_grad_()
    loss = kd_loss(z, u, labels=y, weight=wg, hard_weight=0.3, reduction=reduction)
    gz, gw = torch.autograd.grad(loss, (z, wg))
    torch.testing.assert_close(gz, got, rtol=rtol, atol=atol)
    rows = kd_loss(z, u, labels=y, hard_weight=0.3, reduction="none").detach()
    keep = (y != IGNORE).sum() if reduction == "mean" else 1
    torch.testing.assert_close(gw, rows / keep, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad_op(device, dtype):
    """kd_loss_scale_grad against the product formed in the accumulation dtype and rounded
    once: equal up to the one rounding of the result (half an ulp each way)."""
    unit = logits(5, 37, dtype, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for g in (torch.rand(5, dtype=acc, device=device) + 0.5, torch.tensor(0.3, dtype=acc,
                                                                          device=device)):
        out = torch.ops.distillkit.kd_loss_scale_grad(unit, g)
        want = (unit.to(acc) * g.reshape(-1, 1)).to(dtype)
        assert out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out, want, rtol=torch.finfo(dtype).eps, atol=0)
    with pytest.raises(ValueError, match="grad_rows must have shape"):
        torch.ops.distillkit.kd_loss_scale_grad(unit, torch.ones(4, dtype=acc, device=device))
    torch.library.opcheck(torch.ops.distillkit.kd_loss_scale_grad,
                          (unit.t().contiguous().t(), torch.rand(5, dtype=acc, device=device)))
