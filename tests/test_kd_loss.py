"""kd_loss (docs/math.md §1) against kd_loss_ref: numeric tables, edge cases, bad input,
autograd machinery (gradcheck, opcheck, torch.compile) and determinism."""
import pytest
import torch

from distillkit import KDLoss, kd_loss
from distillkit.reference import kd_loss_ref

from conftest import DEVICES, GRAD_TOL, HAS_CUDA, LOSS_TOL, NEEDS_CUDA

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def make_inputs(n, c, dtype=torch.float32, device="cpu", scale=3.0, teacher_dtype=None):
    z = (torch.randn(n, c, device=device) * scale).to(dtype).requires_grad_()
    u = (torch.randn(n, c, device=device) * scale).to(teacher_dtype or dtype).requires_grad_()
    return z, u


def run_both(z, u, **kw):
    """Loss and (student, teacher) grads of the fused op and of the reference."""
    out, g = [], None
    for fn in (kd_loss, kd_loss_ref):
        loss = fn(z, u, **kw)
        if g is None:  # one random grad_output for both, to test per-row scaling
            g = torch.randn_like(loss) if loss.dim() else torch.ones_like(loss)
        out.append((loss, torch.autograd.grad(loss, (z, u), g)))
    return out


def assert_matches(fused, ref, dtype):
    (loss, grads), (rloss, rgrads) = fused, ref
    assert loss.dtype == rloss.dtype
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss, rloss, rtol=rtol, atol=atol)
    rtol, atol = GRAD_TOL[dtype]
    for g, rg in zip(grads, rgrads):
        assert g.dtype == rg.dtype
        torch.testing.assert_close(g.float(), rg.float(), rtol=rtol, atol=atol)


# --- the full table -----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_table(device, dtype, reduction, divergence, hard, weighted):
    n, c = 6, 37
    z, u = make_inputs(n, c, dtype, device)
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, reduction=reduction)
    # Both sides see the same rounded `dtype` inputs; the reference upcasts them.
    if hard:
        labels = torch.randint(0, c, (n,), device=device)
        labels[1] = -100
        kw.update(labels=labels, hard_weight=0.25)
    if weighted:
        kw["weight"] = torch.rand(n, device=device)
    assert_matches(*run_both(z, u, **kw), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 3), (7, 1001), (3, 2049), (3, 32000), (2, 128256)],
                         ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_shapes(device, shape, divergence):
    z, u = make_inputs(*shape, device=device)
    labels = torch.randint(0, shape[1], (shape[0],), device=device)
    assert_matches(*run_both(z, u, divergence=divergence, temperature=1.5, labels=labels,
                             hard_weight=0.5), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.0, 1e-3, 0.5, 0.999, 1.0])
def test_jsd_beta(device, beta):
    z, u = make_inputs(4, 50, device=device)
    assert_matches(*run_both(z, u, divergence="jsd", beta=beta), torch.float32)


def test_jsd_ends_are_kl():
    z, u = make_inputs(4, 50)
    fwd = kd_loss(z, u, divergence="forward_kl")
    rev = kd_loss(z, u, divergence="reverse_kl")
    torch.testing.assert_close(kd_loss(z, u, divergence="jsd", beta=0.0), fwd)
    torch.testing.assert_close(kd_loss(z, u, divergence="jsd", beta=1.0), rev)
    # The documented discontinuity: the mixture formula vanishes at the ends.
    assert kd_loss(z, u, divergence="jsd", beta=0.01) < fwd / 30


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_by_t2", [True, False])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_temperature(device, temperature, scale_by_t2):
    z, u = make_inputs(5, 40, device=device)
    assert_matches(*run_both(z, u, temperature=temperature, scale_by_t2=scale_by_t2),
                   torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("student_dtype,teacher_dtype", [
    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
    (torch.float16, torch.bfloat16), (torch.float32, torch.float64),
], ids=str)
def test_mixed_dtypes(device, student_dtype, teacher_dtype):
    z, u = make_inputs(4, 300, student_dtype, device, teacher_dtype=teacher_dtype)
    fused, ref = run_both(z, u, divergence="jsd", temperature=2.0)
    low = min((student_dtype, teacher_dtype), key=lambda d: torch.finfo(d).bits)
    assert_matches(fused, ref, low if low != torch.float32 else torch.float32)
    assert fused[1][0].dtype == student_dtype and fused[1][1].dtype == teacher_dtype


# --- rows, reductions, labels, weights --------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_sequence_rows_and_ignore_index(device):
    b, s, v = 2, 5, 33
    z = torch.randn(b, s, v, device=device, requires_grad=True)
    u = torch.randn(b, s, v, device=device, requires_grad=True)
    labels = torch.randint(0, v, (b, s), device=device)
    labels[0, :2] = -100
    for reduction in REDUCTIONS:
        fused, ref = run_both(z, u, labels=labels, hard_weight=0.5, reduction=reduction)
        assert_matches(fused, ref, torch.float32)
    per_row = kd_loss(z, u, labels=labels, reduction="none")
    assert per_row.shape == (b, s) and (per_row[0, :2] == 0).all()
    # mean = per-token mean over the 8 non-ignored tokens (not / B, not / S*B).
    torch.testing.assert_close(kd_loss(z, u, labels=labels), per_row.sum() / 8)


def test_mean_divides_by_rows_not_weights():
    z, u = make_inputs(4, 10)
    w = torch.tensor([0.0, 2.0, 0.5, 1.0])
    rows = kd_loss(z, u, reduction="none")
    torch.testing.assert_close(kd_loss(z, u, weight=w), (rows * w).sum() / 4)
    assert kd_loss(z, u, weight=torch.zeros(4)).item() == 0.0


def test_batchmean_equivalence():
    z, u = make_inputs(6, 20)
    expected = torch.nn.functional.kl_div(torch.log_softmax(z, -1), torch.log_softmax(u, -1),
                                          reduction="batchmean", log_target=True)
    torch.testing.assert_close(kd_loss(z, u), expected)


@pytest.mark.parametrize("normalizer", [3, 7.5, torch.tensor(12.0)], ids=str)
def test_normalizer(normalizer):
    z, u = make_inputs(6, 20)
    labels = torch.tensor([0, 1, -100, 3, 4, 5])
    fused, ref = run_both(z, u, labels=labels, normalizer=normalizer)
    assert_matches(fused, ref, torch.float32)
    torch.testing.assert_close(fused[0], kd_loss(z, u, labels=labels, reduction="sum") / normalizer)


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored_and_empty(device):
    z, u = make_inputs(3, 8, device=device)
    labels = torch.full((3,), -100, device=device)
    for kw in (dict(labels=labels, hard_weight=0.5), dict()):
        zz, uu = (z, u) if kw else make_inputs(0, 8, device=device)
        loss = kd_loss(zz, uu, **kw)
        assert loss.item() == 0.0
        gz, gu = torch.autograd.grad(loss, (zz, uu))
        assert gz.shape == zz.shape and not gz.any() and not gu.any()


def test_teacher_grad_only_when_required():
    z = torch.randn(3, 9, requires_grad=True)
    u = torch.randn(3, 9)
    kd_loss(z, u, divergence="jsd").backward()
    assert z.grad is not None and u.grad is None


def test_module_matches_functional():
    z, u = make_inputs(4, 12)
    labels = torch.tensor([1, 2, -100, 0])
    w = torch.rand(4)
    mod = KDLoss(temperature=3.0, divergence="reverse_kl", hard_weight=0.2)
    torch.testing.assert_close(
        mod(z, u, labels=labels, weight=w),
        kd_loss(z, u, temperature=3.0, divergence="reverse_kl", hard_weight=0.2, labels=labels,
                weight=w))
    assert "reverse_kl" in repr(mod)


# --- numerics: extreme and masked logits -------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits(device, divergence):
    z = (torch.randint(-1, 2, (4, 257), device=device) * 1e4).float().requires_grad_()
    u = (torch.randint(-1, 2, (4, 257), device=device) * 1e4).float().requires_grad_()
    fused, ref = run_both(z, u, divergence=divergence, temperature=2.0)
    assert torch.isfinite(fused[0]).all()
    # fp32 rounding of logits of size 1e4 is ~1e-3 absolute, in both implementations.
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-2)
    for g, rg in zip(fused[1], ref[1]):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padded_vocabulary(device, divergence):
    """-inf in the same padded columns of teacher and student: finite, as if absent."""
    z, u = make_inputs(5, 3000, device=device)
    with torch.no_grad():
        z[:, 2900:] = float("-inf")
        u[:, 2900:] = float("-inf")
    fused, ref = run_both(z, u, divergence=divergence, labels=torch.arange(5, device=device),
                          hard_weight=0.3)
    assert torch.isfinite(fused[0]).all()
    assert_matches(fused, ref, torch.float32)
    z2, u2 = (t[:, :2900].detach().clone().requires_grad_() for t in (z, u))
    torch.testing.assert_close(fused[0], kd_loss(z2, u2, divergence=divergence,
                                                 labels=torch.arange(5, device=device),
                                                 hard_weight=0.3))


@pytest.mark.parametrize("device", DEVICES)
def test_inf_edge_rows(device):
    z, u = make_inputs(3, 16, device=device)
    with torch.no_grad():
        z[0, 3] = float("-inf")          # student -inf where the teacher has mass
        u[1, 5] = float("-inf")          # teacher -inf only: finite
        z[2] = float("-inf")             # an all -inf row: NaN like the reference
        u[2] = float("-inf")
    fused = kd_loss(z, u, reduction="none")
    ref = kd_loss_ref(z, u, reduction="none")
    assert fused[0] == float("inf") and ref[0] == float("inf")
    torch.testing.assert_close(fused[1], ref[1])
    assert torch.isnan(fused[2]) and torch.isnan(ref[2])
    rev = kd_loss(z[1:2], u[1:2], divergence="reverse_kl")
    assert rev == float("inf") == kd_loss_ref(z[1:2], u[1:2], divergence="reverse_kl")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    base_z = torch.randn(40, 12, device=device)
    base_u = torch.randn(12, 40, device=device)
    z = base_z[::2, :].t().contiguous().t()[:, :9].requires_grad_()  # row stride 12... sliced
    u = base_u.t()[::2][:, :9].requires_grad_()                       # class stride 40
    z2 = base_z[::2].requires_grad_()                                  # row stride 24
    assert not z2.is_contiguous() and not u.is_contiguous()
    assert_matches(*run_both(z2, base_u.t()[::2].requires_grad_(), divergence="jsd"),
                   torch.float32)
    assert_matches(*run_both(z, u, divergence="reverse_kl"), torch.float32)


# --- bad input -------------------------------------------------------------------

BAD_INPUTS = [
    (dict(teacher=(4, 11)), "teacher_logits must have the shape"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(beta=1.5, divergence="jsd"), "beta"),
    (dict(beta=-0.1, divergence="jsd"), "beta"),
    (dict(divergence="kl"), "divergence"),
    (dict(reduction="batchmean"), "reduction"),
    (dict(labels=torch.tensor([0, 1, 2, 10])), r"labels\[3\] = 10"),
    (dict(labels=torch.tensor([0, 1, -1, 2])), r"labels\[2\] = -1"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels must have shape"),
    (dict(labels=torch.tensor([0.0, 1, 2, 3])), "labels must be int64"),
    (dict(hard_weight=0.5), "hard_weight > 0 needs labels"),
    (dict(hard_weight=1.5, labels=torch.tensor([0, 1, 2, 3])), "hard_weight"),
    (dict(weight=torch.ones(3)), "weight must have shape"),
    (dict(normalizer=0), "normalizer"),
    (dict(normalizer=torch.tensor(-2.0)), "normalizer"),
    (dict(normalizer=4, reduction="sum"), "normalizer"),
    (dict(int_logits=True), "floating"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad,message", BAD_INPUTS, ids=lambda x: str(x)[:40])
def test_bad_input(device, bad, message):
    bad = dict(bad)
    z = torch.randn(4, 10, device=device)
    u = torch.randn(*bad.pop("teacher", (4, 10)), device=device)
    if bad.pop("int_logits", False):
        z = z.long()
    bad = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in bad.items()}
    with pytest.raises(ValueError, match=message):
        kd_loss(z, u, **bad)


def test_op_level_checks_name_arguments():
    z = torch.randn(4, 10)
    with pytest.raises(ValueError, match="teacher_logits must have the same last dimension"):
        torch.ops.distillkit.kd_loss_forward(z, torch.randn(4, 11), None, 1.0, "forward_kl",
                                             0.5, 0.0, -100, True)
    with pytest.raises(ValueError, match="student_logits must be 2-D"):
        torch.ops.distillkit.kd_loss_forward(z[0], z[0], None, 1.0, "forward_kl", 0.5, 0.0,
                                             -100, True)
    with pytest.raises(ValueError, match="both be fp64"):
        torch.ops.distillkit.kd_loss_forward(z, z.double(), None, 1.0, "forward_kl", 0.5,
                                             0.0, -100, True)


@pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
def test_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        kd_loss(torch.randn(2, 3, device="cuda"), torch.randn(2, 3))


# --- autograd machinery, compile, determinism --------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(device, divergence):
    z, u = make_inputs(3, 7, torch.float64, device)
    labels = torch.tensor([1, -100, 4], device=device)
    w = torch.rand(3, dtype=torch.float64, device=device)

    def f(z, u):
        return kd_loss(z, u, divergence=divergence, temperature=1.7, labels=labels,
                       hard_weight=0.3, weight=w, reduction="none")

    assert torch.autograd.gradcheck(f, (z, u))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence,labels", [("forward_kl", False), ("jsd", True)])
def test_opcheck(device, divergence, labels):
    z, u = make_inputs(5, 33, device=device)
    y = torch.tensor([0, 3, -100, 32, 7], device=device) if labels else None
    torch.library.opcheck(torch.ops.distillkit.kd_loss_forward,
                          (z, u, y, 2.0, divergence, 0.4, 0.3 if labels else 0.0, -100, True))
    loss, stats = torch.ops.distillkit.kd_loss_forward(z, u, y, 2.0, divergence, 0.4, 0.0,
                                                       -100, True)
    torch.library.opcheck(torch.ops.distillkit.kd_loss_backward,
                          (torch.rand_like(loss), z.detach(), u.detach(), y, stats, 2.0,
                           divergence, 0.4, 0.0, -100, True, True))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    z, u = make_inputs(6, 50, device=device)
    labels = torch.tensor([0, 1, -100, 3, 4, 5], device=device)

    def f(z, u):
        return kd_loss(z, u, divergence="jsd", temperature=2.0, labels=labels, hard_weight=0.5)

    compiled = torch.compile(f, fullgraph=True)
    eager = f(z, u)
    out = compiled(z, u)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out, (z, u)), torch.autograd.grad(eager, (z, u)))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    z, u = make_inputs(64, 3001, device=device)
    runs = [run_both(z, u, divergence="jsd", temperature=2.0)[0] for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


def test_deterministic_across_thread_counts():
    z, u = make_inputs(64, 3001)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(kd_loss(z, u, reduction="none"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)),
], ids=str)
def test_autocast_runs_on_inputs_as_given(device, dtype):
    """Under autocast the op is not re-cast: low-precision logits from autocast matmuls go
    in as they are, and the loss is still accumulated and returned in fp32."""
    x = torch.randn(8, 16, device=device)
    student = torch.nn.Linear(16, 40).to(device)
    teacher = torch.nn.Linear(16, 40).to(device)
    with torch.autocast(device, dtype=dtype):
        z, u = student(x), teacher(x)
        assert z.dtype == dtype
        inside = kd_loss(z, u, temperature=2.0)
    outside = kd_loss(z, u, temperature=2.0)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, outside)
    inside.backward()
    assert student.weight.grad is not None


# --- CUDA build and CUDA-vs-CPU --------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cuda_matches_cpu(dtype, divergence):
    z, u = make_inputs(9, 32000, dtype)
    labels = torch.randint(0, 32000, (9,))
    labels[3] = -100
    kw = dict(divergence=divergence, temperature=2.0, labels=labels, hard_weight=0.2,
              reduction="none")
    cpu = run_both(z, u, **kw)[0]
    zc, uc = (t.detach().cuda().requires_grad_() for t in (z, u))
    kw["labels"] = labels.cuda()
    loss = kd_loss(zc, uc, **kw)
    torch.manual_seed(1)
    grads = torch.autograd.grad(loss, (zc, uc), torch.ones_like(loss))
    cpu_grads = torch.autograd.grad(kd_loss(z, u, **{**kw, "labels": labels}), (z, u),
                                    torch.ones(9))
    torch.testing.assert_close(loss.cpu(), cpu[0], rtol=1e-5, atol=1e-5)
    rtol, atol = GRAD_TOL[dtype]
    for g, cg in zip(grads, cpu_grads):
        torch.testing.assert_close(g.cpu().float(), cg.float(), rtol=rtol, atol=atol)
