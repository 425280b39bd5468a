"""sparse_kd_loss (docs/math.md §4) against sparse_kd_loss_ref, and against the dense kd_loss when
the teacher keeps every class: numeric tables, padding, dead rows, bad input, autograd
machinery (gradcheck, opcheck, torch.compile) and determinism."""
import pytest
import torch

from distillkit import kd_loss, sparse_kd_loss
from distillkit.reference import kd_loss_ref, sparse_kd_loss_ref

from conftest import DEVICES, GRAD_TOL, HAS_CUDA, LOSS_TOL, NEEDS_CUDA

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(n, c, k, dtype=torch.float32, device="cpu", temperature=2.0, lp_dtype=None,
                scale=3.0):
    """Student logits (requires grad) and the top-k of a random teacher at temperature T."""
    z = (torch.randn(n, c, device=device) * scale).to(dtype).requires_grad_()
    u = torch.randn(n, c, device=device) * scale
    logprobs, indices = torch.log_softmax(u / temperature, -1).topk(k, dim=-1)
    return z, indices, logprobs.to(lp_dtype or dtype)


def run_both(z, idx, lp, **kw):
    """Loss and student gradient of the fused op and of the reference."""
    out, g = [], None
    for fn in (sparse_kd_loss, sparse_kd_loss_ref):
        loss = fn(z, idx, lp, **kw)
        if g is None:  # one random grad_output for both, to test per-row scaling
            g = torch.randn_like(loss) if loss.dim() else torch.ones_like(loss)
        out.append((loss, torch.autograd.grad(loss, z, g)[0]))
    return out


def assert_matches(fused, ref, dtype):
    (loss, grad), (rloss, rgrad) = fused, ref
    assert loss.dtype == rloss.dtype and grad.dtype == rgrad.dtype
    torch.testing.assert_close(loss, rloss, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.float(), rgrad.float(), rtol=rtol, atol=atol)


# --- the table -----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "labels+weight+padding"])
def test_table(device, dtype, reduction, renormalize, masked):
    n, c, k = 6, 37, 5
    z, idx, lp = make_inputs(n, c, k, dtype, device)
    kw = dict(temperature=2.0, renormalize=renormalize, reduction=reduction)
    if masked:
        idx[0, 2:] = -1          # fewer kept classes
        idx[2] = -1              # a dead row
        labels = torch.zeros(n, dtype=torch.long, device=device)
        labels[4] = -100         # an ignored row
        kw.update(labels=labels, weight=torch.rand(n, device=device))
    assert_matches(*run_both(z, idx, lp, **kw), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,c,k", [(1, 2, 1), (5, 3, 3), (7, 1001, 8), (3, 2049, 32),
                                   (4, 32000, 64), (2, 128256, 32)], ids=str)
def test_shapes(device, n, c, k):
    z, idx, lp = make_inputs(n, c, k, device=device, temperature=1.5)
    assert_matches(*run_both(z, idx, lp, temperature=1.5), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("shape", [(4, 37), (3, 2049)], ids=str)
def test_all_classes_kept_is_dense_kd(device, dtype, renormalize, shape):
    """K = C (every class kept, in a random order per row): the dense forward KL."""
    n, c = shape
    T = 2.0
    z = (torch.randn(n, c, device=device) * 3).to(dtype).requires_grad_()
    u = (torch.randn(n, c, device=device) * 3).to(dtype)
    idx = torch.rand(n, c, device=device).argsort(-1)
    lp = torch.log_softmax(u.to(torch.float64) / T, -1).gather(1, idx).to(dtype)
    loss = sparse_kd_loss(z, idx, lp, temperature=T, renormalize=renormalize, reduction="none")
    g = torch.randn_like(loss)
    grad = torch.autograd.grad(loss, z, g)[0]
    for dense in (kd_loss_ref, kd_loss):
        dloss = dense(z, u, temperature=T, reduction="none")
        # The dense teacher is rounded to `dtype` before its softmax, the sparse one after.
        tol = LOSS_TOL[dtype] if dtype in (torch.float32, torch.float64) else (2e-2, 2e-2)
        torch.testing.assert_close(loss, dloss, rtol=tol[0], atol=tol[1])
        dgrad = torch.autograd.grad(dloss, z, g)[0]
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(grad.float(), dgrad.float(), rtol=rtol,
                                   atol=atol if dtype in (torch.float32, torch.float64) else 2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_by_t2", [True, False])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_temperature(device, temperature, scale_by_t2):
    z, idx, lp = make_inputs(5, 40, 7, device=device, temperature=temperature)
    assert_matches(*run_both(z, idx, lp, temperature=temperature, scale_by_t2=scale_by_t2),
                   torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("student_dtype,lp_dtype", [
    (torch.bfloat16, torch.float16), (torch.float32, torch.float16),
    (torch.float16, torch.float32), (torch.float32, torch.float64),
], ids=str)
def test_mixed_dtypes(device, student_dtype, lp_dtype):
    z, idx, lp = make_inputs(4, 300, 16, student_dtype, device, lp_dtype=lp_dtype)
    fused, ref = run_both(z, idx, lp)
    low = min((student_dtype, lp_dtype), key=lambda d: torch.finfo(d).bits)
    assert_matches(fused, ref, low)
    assert fused[1].dtype == student_dtype


# --- padding, dead rows, reductions ----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_padding_is_skipped(device):
    """-1 anywhere in a row is skipped, whatever the log-prob stored beside it."""
    z, idx, lp = make_inputs(4, 50, 8, device=device)
    pad = torch.zeros_like(idx, dtype=torch.bool)
    pad[0, 1] = pad[1, :4] = pad[3, 5:] = True
    idx_p = idx.masked_fill(pad, -1)
    lp_p = lp.masked_fill(pad, float("nan"))
    fused = sparse_kd_loss(z, idx_p, lp_p, reduction="none")
    for r in range(4):
        keep = ~pad[r]
        alone = sparse_kd_loss(z[r:r + 1], idx[r:r + 1, keep], lp[r:r + 1, keep], reduction="none")
        torch.testing.assert_close(fused[r], alone[0])
    assert_matches(*run_both(z, idx_p, lp_p, reduction="none"), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_dead_rows_and_sequences(device):
    """(B, S, C) rows; rows with an ignored label or no kept class give 0 and leave the mean."""
    b, s, c, k = 2, 5, 33, 4
    z = torch.randn(b, s, c, device=device, requires_grad=True)
    logprobs, idx = torch.log_softmax(torch.randn(b, s, c, device=device), -1).topk(k)
    labels = torch.zeros(b, s, dtype=torch.long, device=device)
    labels[0, :2] = -100
    idx[1, 4] = -1
    for reduction in REDUCTIONS:
        assert_matches(*run_both(z, idx, logprobs, labels=labels, reduction=reduction),
                       torch.float32)
    rows = sparse_kd_loss(z, idx, logprobs, labels=labels, reduction="none")
    assert rows.shape == (b, s) and not rows[0, :2].any() and rows[1, 4] == 0
    torch.testing.assert_close(sparse_kd_loss(z, idx, logprobs, labels=labels), rows.sum() / 7)
    grad = torch.autograd.grad(sparse_kd_loss(z, idx, logprobs, labels=labels), z)[0]
    assert not grad[0, :2].any() and not grad[1, 4].any() and grad[1, 3].any()


@pytest.mark.parametrize("device", DEVICES)
def test_all_dead_and_empty(device):
    z, idx, lp = make_inputs(3, 8, 2, device=device)
    for zz, ii, ll in ((z, torch.full_like(idx, -1), lp), make_inputs(0, 8, 2, device=device)):
        loss = sparse_kd_loss(zz, ii, ll)
        assert loss.item() == 0.0
        grad = torch.autograd.grad(loss, zz)[0]
        assert grad.shape == zz.shape and not grad.any()


@pytest.mark.parametrize("normalizer", [3, torch.tensor(12.0)], ids=str)
def test_normalizer_and_weights(normalizer):
    z, idx, lp = make_inputs(6, 20, 4)
    w = torch.tensor([0.0, 2.0, 0.5, 1.0, 1.0, 3.0])
    assert_matches(*run_both(z, idx, lp, weight=w, normalizer=normalizer), torch.float32)
    rows = sparse_kd_loss(z, idx, lp, reduction="none")
    torch.testing.assert_close(sparse_kd_loss(z, idx, lp, weight=w), (rows * w).sum() / 6)


def test_int32_indices_and_no_teacher_grad():
    z, idx, lp = make_inputs(4, 30, 5)
    lp.requires_grad_()
    loss = sparse_kd_loss(z, idx.int(), lp)
    torch.testing.assert_close(loss, sparse_kd_loss(z, idx, lp))
    loss.backward()
    assert z.grad is not None and lp.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_inf_entries(device):
    z, idx, lp = make_inputs(3, 16, 4, device=device)
    with torch.no_grad():
        lp[0, 3] = float("-inf")                  # a kept class with zero mass: finite
        z[1, idx[1, 0]] = float("-inf")           # student -inf where the teacher has mass
        lp[2] = float("-inf")                     # renormalizing nothing: NaN
    fused = sparse_kd_loss(z, idx, lp, reduction="none")
    ref = sparse_kd_loss_ref(z, idx, lp, reduction="none")
    torch.testing.assert_close(fused[0], ref[0])
    assert fused[1] == float("inf") == ref[1]
    assert torch.isnan(fused[2]) and torch.isnan(ref[2])
    raw = sparse_kd_loss(z[2:], idx[2:], lp[2:], renormalize=False)
    assert raw == 0 == sparse_kd_loss_ref(z[2:], idx[2:], lp[2:], renormalize=False)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_student(device):
    base = torch.randn(12, 40, device=device)
    z = base[::2, :33].requires_grad_()  # row stride 80, unit class stride
    _, idx, lp = make_inputs(6, 33, 6, device=device)
    assert not z.is_contiguous()
    assert_matches(*run_both(z, idx, lp, temperature=2.0), torch.float32)


# --- bad input -------------------------------------------------------------------------

BAD_INPUTS = [
    (dict(indices=[[0, 1], [2, 2], [3, 4]]), r"must not repeat a class within a row \(row 1 "
                                             r"holds class 2 twice"),
    (dict(indices=[[0, 1], [2, 10], [3, 4]]), r"teacher_indices must be in \[0, 10\) or -1 "
                                              r"for padding \(teacher_indices\[1, 1\] = 10\)"),
    (dict(indices=[[0, 1], [2, 3], [-2, 4]]), r"teacher_indices\[2, 0\] = -2"),
    (dict(indices=[[0.0, 1], [2, 3], [3, 4]]), "teacher_indices must be int64 or int32"),
    (dict(logprobs_shape=(3, 3)), "teacher_logprobs must have the shape of teacher_indices"),
    (dict(indices=[[0, 1], [2, 3]]), r"teacher_indices must have shape \(3,\) \+ \(K,\)"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(reduction="batchmean"), "reduction"),
    (dict(labels=torch.tensor([0, 1])), "labels must have shape"),
    (dict(labels=torch.tensor([0.0, 1, 2])), "labels must be int64"),
    (dict(weight=torch.ones(2)), "weight must have shape"),
    (dict(normalizer=0), "normalizer"),
    (dict(normalizer=4, reduction="sum"), "normalizer"),
    (dict(int_logits=True), "floating"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad,message", BAD_INPUTS, ids=lambda x: str(x)[:40])
def test_bad_input(device, bad, message):
    bad = dict(bad)
    z = torch.randn(3, 10, device=device)
    idx = torch.tensor(bad.pop("indices", [[0, 1], [2, 3], [4, 5]]), device=device)
    lp = torch.randn(*bad.pop("logprobs_shape", idx.shape), device=device)
    if bad.pop("int_logits", False):
        z = z.long()
    bad = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in bad.items()}
    with pytest.raises(ValueError, match=message):
        sparse_kd_loss(z, idx, lp, **bad)


def test_duplicates_check_can_be_turned_off():
    z = torch.randn(2, 10)
    idx = torch.tensor([[0, 1, -1, -1], [5, 6, 7, -1]])  # repeated padding is fine
    lp = torch.log_softmax(torch.randn(2, 4), -1)
    sparse_kd_loss(z, idx, lp)
    dup = torch.tensor([[0, 0, -1, -1], [5, 6, 7, -1]])
    with pytest.raises(ValueError, match="repeat"):
        sparse_kd_loss(z, dup, lp)
    assert torch.isfinite(sparse_kd_loss(z, dup, lp, check_duplicates=False))


def test_op_level_checks_name_arguments():
    z = torch.randn(3, 10)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]])
    lp = torch.randn(3, 2)
    with pytest.raises(ValueError, match="teacher_indices must be int64"):
        torch.ops.distillkit.sparse_kd_loss_forward(z, idx.int(), lp, None, 1.0, True, -100,
                                                    True, True)
    with pytest.raises(ValueError, match="teacher_indices must have as many rows"):
        torch.ops.distillkit.sparse_kd_loss_forward(z, idx[:2], lp[:2], None, 1.0, True, -100,
                                                    True, True)
    with pytest.raises(ValueError, match="both be fp64"):
        torch.ops.distillkit.sparse_kd_loss_forward(z, idx, lp.double(), None, 1.0, True, -100,
                                                    True, True)


@pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
def test_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        sparse_kd_loss(torch.randn(2, 3, device="cuda"), torch.zeros(2, 1, dtype=torch.long),
                       torch.zeros(2, 1))


# --- autograd machinery, compile, determinism ------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_gradcheck(device, renormalize):
    z, idx, lp = make_inputs(4, 7, 3, torch.float64, device, temperature=1.7)
    idx[1, 1] = -1
    labels = torch.tensor([0, 0, -100, 0], device=device)
    w = torch.rand(4, dtype=torch.float64, device=device)

    def f(z):
        return sparse_kd_loss(z, idx, lp, temperature=1.7, renormalize=renormalize,
                              labels=labels, weight=w, reduction="none")

    assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_opcheck(device, renormalize):
    z, idx, lp = make_inputs(5, 33, 4, device=device)
    idx[3] = -1
    y = torch.tensor([0, 3, -100, 32, 7], device=device)
    args = (z, idx, lp, y, 2.0, renormalize, -100, True, True)
    torch.library.opcheck(torch.ops.distillkit.sparse_kd_loss_forward, args)
    loss, stats = torch.ops.distillkit.sparse_kd_loss_forward(*args)
    torch.library.opcheck(torch.ops.distillkit.sparse_kd_loss_backward,
                          (torch.rand_like(loss), z.detach(), idx, lp, y, stats, 2.0,
                           renormalize, -100, True))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    z, idx, lp = make_inputs(6, 50, 5, device=device)
    labels = torch.tensor([0, 1, -100, 3, 4, 5], device=device)

    def f(z, idx, lp):
        return sparse_kd_loss(z, idx, lp, temperature=2.0, labels=labels)

    compiled = torch.compile(f, fullgraph=True)
    eager = f(z, idx, lp)
    out = compiled(z, idx, lp)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out, z), torch.autograd.grad(eager, z))


def test_deterministic_across_thread_counts():
    z, idx, lp = make_inputs(64, 3001, 16)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            loss = sparse_kd_loss(z, idx, lp, reduction="none")
            outs.append((loss, torch.autograd.grad(loss.sum(), z)[0]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# --- CUDA build and CUDA-vs-CPU ----------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("n,c,k", [(9, 1000, 8), (9, 32000, 32), (3, 128256, 32)], ids=str)
def test_cuda_matches_cpu(dtype, renormalize, n, c, k):
    z, idx, lp = make_inputs(n, c, k, dtype, lp_dtype=torch.float16 if dtype != torch.float64
                             else None)
    idx[1, k // 2:] = -1
    idx[2] = -1
    labels = torch.zeros(n, dtype=torch.long)
    labels[0] = -100
    kw = dict(temperature=2.0, renormalize=renormalize, reduction="none")
    loss = sparse_kd_loss(z, idx, lp, labels=labels, **kw)
    grad = torch.autograd.grad(loss, z, torch.ones_like(loss))[0]
    zc = z.detach().cuda().requires_grad_()
    closs = sparse_kd_loss(zc, idx.cuda(), lp.cuda(), labels=labels.cuda(), **kw)
    cgrad = torch.autograd.grad(closs, zc, torch.ones_like(closs))[0]
    torch.testing.assert_close(closs.cpu(), loss, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(cgrad.cpu().float(), grad.float(), rtol=rtol, atol=atol)
