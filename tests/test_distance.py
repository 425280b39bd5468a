"""distance (docs/math.md §7) against distance_ref and PyTorch's own losses."""
import pytest
import torch
import torch.nn.functional as F

from distillkit import distance
from distillkit.reference import DISTANCE_OPS, distance_ref

from conftest import DEVICES, GRAD_TOL, HAS_CUDA, NEEDS_CUDA, copies_made

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Sums of many elements: compare relative to the magnitude.
LOSS_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
            torch.bfloat16: (1e-4, 1e-4), torch.float16: (1e-4, 1e-4)}


def make(shape, dtype=torch.float32, device="cpu", teacher_grad=True):
    s = (torch.randn(shape, device=device) * 2).to(dtype).requires_grad_()
    t = (torch.randn(shape, device=device) * 2).to(dtype).requires_grad_(teacher_grad)
    return s, t


def run_both(s, t, op, **kw):
    out, g = [], None
    wrt = (s, t) if t.requires_grad else (s,)
    for fn in (distance, distance_ref):
        loss = fn(s, t, op, **kw)
        if g is None:
            g = torch.randn_like(loss)
        out.append((loss, torch.autograd.grad(loss, wrt, g)))
    return out


def assert_matches(fused, ref, dtype):
    (loss, grads), (rloss, rgrads) = fused, ref
    assert loss.dtype == rloss.dtype and loss.shape == rloss.shape
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss, rloss, rtol=rtol, atol=atol * max(1.0, rloss.abs().max().item()))
    rtol, atol = GRAD_TOL[dtype]
    for g, rg in zip(grads, rgrads):
        assert g.dtype == rg.dtype
        torch.testing.assert_close(g.float(), rg.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", DISTANCE_OPS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,dim", [((6, 37), -1), ((4, 3, 5, 7), 1), ((33, 10), 0)], ids=str)
def test_table(device, dtype, op, reduction, shape, dim):
    s, t = make(shape, dtype, device)
    assert_matches(*run_both(s, t, op, dim=dim, temperature=2.0, reduction=reduction), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", DISTANCE_OPS)
@pytest.mark.parametrize("shape,dim", [((1, 2), -1), ((3, 32000), -1), ((2, 16, 9, 9), 1),
                                       ((2, 3, 4), 2), ((40, 17), 0)], ids=str)
def test_shapes(device, op, shape, dim):
    s, t = make(shape, device=device, teacher_grad=False)
    assert_matches(*run_both(s, t, op, dim=dim, temperature=3.0), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["cosine", "pearson"])
@pytest.mark.parametrize("shape,dim", [
    ((2, 4099), -1),        # inner == 1: rows of two full tiles and a ragged one
    ((2, 5, 1), 1),         # inner == 1 through a trailing unit dim
    ((3, 40, 15), 1),       # inner < one vector; D spans a partial Chan block
    ((2, 33, 1500), 1),     # inner > one block of columns, ragged last block
    ((3000, 3), 0),         # "intra": outer == 1, long D across many Chan blocks
], ids=str)
def test_correlation_layouts(device, dtype, op, shape, dim):
    """Both layouts of the correlation kernels, teacher requiring grad."""
    s, t = make(shape, dtype, device)
    assert_matches(*run_both(s, t, op, dim=dim, reduction="none"), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", [((4, 3000), -1), ((2, 300, 20), 1)], ids=str)
def test_pearson_large_offset(device, shape, dim):
    """One-pass Pearson stays exact for rows whose mean dwarfs their spread."""
    base = torch.randn(shape, device=device, dtype=torch.float64)
    s64 = 1e4 + base
    t64 = 1e4 + base + 0.5 * torch.randn_like(base)
    got = distance(s64.float(), t64.float(), "pearson", dim=dim, reduction="none")
    want = distance_ref(s64.float().double(), t64.float().double(), "pearson", dim=dim,
                        reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", DISTANCE_OPS)
def test_large_outputs(device, op):
    """Gradients of 9.8 MB, rows not 64-byte aligned."""
    s, t = make((61, 40003), device=device)
    assert_matches(*run_both(s, t, op, temperature=2.0), torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["l2", "pearson"])
def test_huge_page_gradients(op):
    """CPU gradients of 128 MiB and more come from huge-page-advised blocks (output_cache.cpp)."""
    s, t = make((1025, 32771), teacher_grad=op == "pearson")
    assert_matches(*run_both(s, t, op), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_pytorch_losses(device):
    s, t = make((8, 50), device=device)
    torch.testing.assert_close(distance(s, t, "l1"), F.l1_loss(s, t))
    torch.testing.assert_close(distance(s, t, "l2"), F.mse_loss(s, t))
    torch.testing.assert_close(distance(s, t, "smooth_l1"), F.smooth_l1_loss(s, t))
    torch.testing.assert_close(distance(s, t, "cosine"), (1 - F.cosine_similarity(s, t)).mean())
    expected = F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), reduction="batchmean",
                        log_target=True) * 16
    torch.testing.assert_close(distance(s, t, "kl", temperature=4.0), expected)
    rho = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(s, t)])
    torch.testing.assert_close(distance(s, t, "pearson"), (1 - rho).mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["cosine", "pearson"])
def test_constant_rows(device, op):
    """Zero-variance (pearson) or zero (cosine) rows: distance 1, finite zero gradient."""
    s, t = make((4, 12), device=device)
    with torch.no_grad():
        s[0] = 0.0
        t[1] = 0.0
        if op == "pearson":
            s[2] = 3.0
    fused, ref = run_both(s, t, op, reduction="none")
    assert_matches(fused, ref, torch.float32)
    degenerate = [0, 1, 2] if op == "pearson" else [0, 1]
    assert (fused[0][degenerate] == 1).all()
    assert torch.isfinite(fused[1][0]).all() and torch.isfinite(fused[1][1]).all()
    assert not fused[1][0][degenerate].any()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_mixed(device):
    base = torch.randn(10, 24, device=device)
    s = base[::2, ::2].requires_grad_()
    t = torch.randn(12, 5, device=device).t().requires_grad_()
    for op in DISTANCE_OPS:
        assert_matches(*run_both(s, t, op), torch.float32)
    sb = torch.randn(5, 12, device=device).bfloat16().requires_grad_()
    fused, ref = run_both(sb, torch.randn(5, 12, device=device, requires_grad=True), "pearson")
    assert fused[1][0].dtype == torch.bfloat16 and fused[1][1].dtype == torch.float32
    assert_matches(fused, ref, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("center", [False, True], ids=["cosine", "pearson"])
@pytest.mark.parametrize("pads", [(8, 8), (3, 3), (5, 2)], ids=str)
def test_correlation_reads_row_strided_rows_in_place(device, dtype, center, pads):
    """Rows of wider buffers ((outer, D, 1) views of x[:, :D]) give bitwise the
    contiguous result, without a copy."""
    outer, D = 6, 301
    s = torch.randn(outer, D, device=device).to(dtype)
    t = (0.5 * s.float() + torch.randn(outer, D, device=device)).to(dtype)
    ss = torch.zeros(outer, D + pads[0], device=device, dtype=dtype)[:, :D].copy_(s)
    ts = torch.zeros(outer, D + pads[1], device=device, dtype=dtype)[:, :D].copy_(t)
    ops = torch.ops.distillkit
    rows, stats = ops.correlation_distance_forward(s[:, :, None], t[:, :, None], center)
    g = torch.rand(outer, 1, device=device) + 0.5
    grads = ops.correlation_distance_backward(g, s[:, :, None], t[:, :, None], stats, center, True)
    out = {}
    copies = copies_made(lambda: out.update(
        fwd=ops.correlation_distance_forward(ss[:, :, None], ts[:, :, None], center)),
        (outer, D, 1))
    copies += copies_made(lambda: out.update(bwd=ops.correlation_distance_backward(
        g, ss[:, :, None], ts[:, :, None], stats, center, True)), (outer, D, 1))
    assert copies == []
    assert torch.equal(out["fwd"][0], rows) and torch.equal(out["fwd"][1], stats)
    for got, want in zip(out["bwd"], grads):
        assert torch.equal(got, want) and got.is_contiguous()


def wide_rows(x, pad):
    """x in the first columns of rows `pad` elements wider: x.reshape(R, L) copied into an
    (R, L + pad) buffer of NaN (never read), its [:, :L] viewed with x's shape."""
    rows = x.reshape(-1, x.shape[-1] if x.dim() == 2 else x[0].numel())
    buf = torch.full((rows.shape[0], rows.shape[1] + pad), float("nan"), dtype=x.dtype,
                     device=x.device)
    buf[:, :rows.shape[1]] = rows
    return buf[:, :rows.shape[1]].view(x.shape)


def pointwise_both_ways(s, t, op, layouts):
    """Forward and backward (teacher gradient too) of the op on contiguous s, t and on
    layouts(s), layouts(t), and the aten copies of the input shape the latter made."""
    ops = torch.ops.distillkit
    g = torch.tensor(0.75, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32,
                     device=s.device)
    want = (ops.pointwise_distance_forward(s, t, op),
            *ops.pointwise_distance_backward(g, s, t, op, True))
    sv, tv = layouts
    out = {}
    copies = copies_made(lambda: out.update(fwd=ops.pointwise_distance_forward(sv, tv, op)),
                         s.shape)
    copies += copies_made(lambda: out.update(
        bwd=ops.pointwise_distance_backward(g, sv, tv, op, True)), s.shape)
    return want, (out["fwd"], *out["bwd"]), copies


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["l1", "l2", "smooth_l1"])
@pytest.mark.parametrize("pads", [(8, 8), (3, 3), (5, 2)], ids=str)
@pytest.mark.parametrize("shape", [(6, 301), (1, 301), (40, 7), (3, 4, 37), (2, 3, 5)], ids=str)
def test_pointwise_reads_row_strided_rows_in_place(device, dtype, op, pads, shape):
    """Rows of wider buffers, each input its own row stride (x[:, :D]; (B, S, V) rows of
    S V such as logits[:, :-1, :]; rows shorter than a vector step, so steps cross rows)
    give bitwise the contiguous result, gradients contiguous, without a copy: the kernels
    walk the same element order, so lanes and partial sums are the same."""
    s = (torch.randn(shape, device=device) * 2).to(dtype)
    t = (0.5 * s.float() + torch.randn(shape, device=device)).to(dtype)
    want, got, copies = pointwise_both_ways(s, t, op, (wide_rows(s, pads[0]), wide_rows(t, pads[1])))
    assert copies == []
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == w.dtype and g.is_contiguous() and torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                    (torch.float32, torch.float16)], ids=str)
def test_pointwise_row_strided_mixed_dtypes(device, dtypes):
    """Each input is read in place in its own dtype, the gradients are written in it."""
    s = (torch.randn(17, 59, device=device) * 2).to(dtypes[0])
    t = (torch.randn(17, 59, device=device) * 2).to(dtypes[1])
    for op in ("l1", "l2", "smooth_l1"):
        want, got, copies = pointwise_both_ways(s, t, op, (wide_rows(s, 3), wide_rows(t, 6)))
        assert copies == [] and [g.dtype for g in got[1:]] == list(dtypes)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,copied", [
    ("teacher_broadcast_row", 0),      # expand of one row: row stride 0, read in place
    ("trl_and_sliced_classes", 1),     # rows of S V and of V: the teacher is copied
    ("transposed_student", 1),         # no unit-stride rows: copied
    ("column_strided_both", 2),        # x[:, ::2]
], ids=str)
def test_pointwise_layouts_copied_or_not(device, layout, copied):
    """Which inputs are made contiguous (aten::contiguous of the input shape in the forward);
    the values and gradients are the contiguous inputs' bitwise."""
    B, S, V = 3, 4, 37
    s = torch.randn(B, S, V, device=device)
    t = torch.randn(B, S, V, device=device)
    if layout == "teacher_broadcast_row":
        t = t[:1, :1].expand(B, S, V).contiguous()
        views = (torch.empty(B, S, V + 5, device=device)[..., :V].copy_(s),
                 t[:1, :1].expand(B, S, V))
    elif layout == "trl_and_sliced_classes":
        views = (torch.empty(B, S + 1, V, device=device)[:, :-1].copy_(s),
                 torch.empty(B, S, V + 3, device=device)[..., :V].copy_(t))
    elif layout == "transposed_student":
        views = (s.transpose(0, 1).contiguous().transpose(0, 1), wide_rows(t, 2))
    else:
        views = tuple(torch.empty(B, S, 2 * V, device=device)[..., ::2].copy_(x) for x in (s, t))
    want, got, _ = pointwise_both_ways(s, t, "smooth_l1", views)
    fwd_copies = copies_made(lambda: torch.ops.distillkit.pointwise_distance_forward(
        *views, "smooth_l1"), s.shape)
    assert fwd_copies.count("aten::contiguous") == copied
    for g, w in zip(got, want):
        assert g.is_contiguous() and torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["l1", "l2", "smooth_l1"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                    (torch.float32, torch.float16)], ids=str)
def test_pointwise_mixed_dtypes(device, op, dtypes):
    """Each input is read and its gradient written in its own dtype; 1003 elements leave a tail."""
    s = (torch.randn(17, 59, device=device) * 2).to(dtypes[0]).requires_grad_()
    t = (torch.randn(17, 59, device=device) * 2).to(dtypes[1]).requires_grad_()
    fused, ref = run_both(s, t, op)
    assert [g.dtype for g in fused[1]] == list(dtypes)
    assert_matches(fused, ref, torch.bfloat16)


@pytest.mark.parametrize("bad,message", [
    (dict(op="l3"), "op must be one of"),
    (dict(reduction="batchmean"), "reduction"),
    (dict(teacher_shape=(4, 11)), "teacher must have the shape"),
    (dict(dim=2), "dim must be in"),
    (dict(int_input=True), "floating"),
])
def test_bad_input(bad, message):
    s, t = torch.randn(4, 10), torch.randn(*bad.get("teacher_shape", (4, 10)))
    if bad.get("int_input"):
        s, t = s.long(), t.long()
    with pytest.raises(ValueError, match=message):
        distance(s, t, bad.get("op", "cosine"), dim=bad.get("dim", -1),
                 reduction=bad.get("reduction", "mean"))


def test_op_level_checks():
    with pytest.raises(ValueError, match="student must be 3-D"):
        torch.ops.distillkit.correlation_distance_forward(torch.randn(2, 3), torch.randn(2, 3), True)
    with pytest.raises(ValueError, match="op must be one of 'l1'"):
        torch.ops.distillkit.pointwise_distance_forward(torch.randn(2), torch.randn(2), "kl")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,shape,dim", [("smooth_l1", (3, 5), -1), ("cosine", (3, 6), -1),
                                          ("pearson", (2, 3, 4), 1), ("pearson", (5, 3), 0)])
def test_gradcheck(device, op, shape, dim):
    s, t = make(shape, torch.float64, device)
    if op == "smooth_l1":  # keep |d| away from the kinks at 0 and 1, where it is not smooth
        with torch.no_grad():
            t.copy_(s + torch.tensor([0.3, 1.7, -0.4, -2.2, 0.6], dtype=torch.float64, device=device))
    assert torch.autograd.gradcheck(lambda a, b: distance(a, b, op, dim=dim, reduction="none"),
                                    (s, t))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    s, t = make((3, 7, 5), device=device)
    torch.library.opcheck(torch.ops.distillkit.correlation_distance_forward, (s, t, True))
    torch.library.opcheck(torch.ops.distillkit.pointwise_distance_forward, (s, t, "smooth_l1"))
    rows, stats = torch.ops.distillkit.correlation_distance_forward(s, t, False)
    torch.library.opcheck(torch.ops.distillkit.correlation_distance_backward,
                          (torch.rand_like(rows), s.detach(), t.detach(), stats, False, True))
    torch.library.opcheck(torch.ops.distillkit.pointwise_distance_backward,
                          (torch.tensor(0.5, device=device), s.detach(), t.detach(), "l1", True))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    s, t = make((4, 8, 3, 3), device=device)

    def f(s, t):
        return (distance(s, t, "pearson", dim=1) + distance(s, t, "l2")
                + distance(s, t, "kl", dim=1, temperature=2.0))

    compiled = torch.compile(f, fullgraph=True)
    out, eager = compiled(s, t), f(s, t)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out, (s, t)), torch.autograd.grad(eager, (s, t)))


@pytest.mark.parametrize("shape,dim", [((300, 2049), -1), ((6, 40, 700), 1)], ids=str)
def test_deterministic_across_thread_counts(shape, dim):
    """Values and gradients; the features layout splits its columns by thread count."""
    s, t = make(shape)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            losses = torch.stack([distance(s, t, op, dim=dim) for op in DISTANCE_OPS])
            outs.append((losses, *torch.autograd.grad(losses.sum(), (s, t))))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        for a, b in zip(outs[0], out):
            assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
@pytest.mark.parametrize("op", DISTANCE_OPS)
@pytest.mark.parametrize("shape,dim", [((64, 32000), -1), ((8, 64, 16, 16), 1), ((256, 100), 0)],
                         ids=str)
def test_cuda_matches_cpu(op, shape, dim):
    s, t = make(shape)
    cpu = distance(s, t, op, dim=dim, reduction="none" if op not in ("l1", "l2", "smooth_l1") else "mean")
    cpu_grads = torch.autograd.grad(cpu.sum(), (s, t))
    sc, tc = (x.detach().cuda().requires_grad_() for x in (s, t))
    gpu = distance(sc, tc, op, dim=dim, reduction="none" if op not in ("l1", "l2", "smooth_l1") else "mean")
    gpu_grads = torch.autograd.grad(gpu.sum(), (sc, tc))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    for g, cg in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(g.cpu(), cg, rtol=1e-4, atol=1e-6)
