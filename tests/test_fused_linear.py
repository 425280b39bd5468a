"""fused_linear_kd_loss equals the unfused matmul + kd_loss in loss and every gradient."""
import pytest
import torch

import distillkit
from distillkit import KDOptions, fused_linear_kd_loss, kd_loss
from distillkit.ops.options import LogitHead

from conftest import DEVICES, GRAD_TOL, LOSS_TOL


def setup(n, h, c, dtype=torch.float32, device="cpu", bias=True, teacher_hidden=False):
    torch.manual_seed(0)
    hid = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    w = (torch.randn(c, h, device=device) / h**0.5).to(dtype).requires_grad_()
    b = (torch.randn(c, device=device) * 0.1).to(dtype).requires_grad_() if bias else None
    if teacher_hidden:
        th = torch.randn(n, h + 3, device=device).to(dtype)
        tw = (torch.randn(c, h + 3, device=device) / h**0.5).to(dtype)
        teacher = dict(teacher_hidden=th, teacher_weight=tw)
        logits = th @ tw.t()
    else:
        logits = torch.randn(n, c, device=device).to(dtype) * 2
        teacher = dict(teacher_logits=logits)
    return hid, w, b, teacher, logits


def compare(n, h, c, chunk_rows, dtype=torch.float32, device="cpu", bias=True,
            teacher_hidden=False, **kw):
    hid, w, b, teacher, u = setup(n, h, c, dtype, device, bias, teacher_hidden)
    params = [p for p in (hid, w, b) if p is not None]
    tl = teacher.pop("teacher_logits", None)
    fused = fused_linear_kd_loss(hid, w, tl, student_bias=b, chunk_rows=chunk_rows, **teacher, **kw)
    fused_grads = torch.autograd.grad(fused * 1.7, params)
    z = hid @ w.t() if b is None else torch.addmm(b, hid, w.t())
    ref = kd_loss(z, u, **kw)
    ref_grads = torch.autograd.grad(ref * 1.7, params)
    return fused, ref, fused_grads, ref_grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,chunk_rows", [(37, 8), (5, 64), (64, 64), (33, 1)], ids=str)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_unfused_fp32(device, n, chunk_rows, divergence, reduction):
    labels = torch.randint(0, 50, (n,), device=device)
    labels[::4] = -100
    fused, ref, fg, rg = compare(n, 16, 50, chunk_rows, device=device, divergence=divergence,
                                 temperature=2.0, labels=labels, hard_weight=0.2,
                                 reduction=reduction, weight=torch.rand(n, device=device))
    torch.testing.assert_close(fused, ref)
    for a, b in zip(fg, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_as_hidden_and_no_bias(device):
    fused, ref, fg, rg = compare(29, 12, 40, 7, device=device, bias=False, teacher_hidden=True,
                                 divergence="jsd", beta=0.3)
    torch.testing.assert_close(fused, ref)
    for a, b in zip(fg, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_within_bf16_tolerance(device):
    """bf16 hidden/weights: logits rounded once by the matmul, loss in fp32; gradients
    agree with the unfused bf16 computation to bf16 precision, and the weight gradient
    (accumulated in fp32 across chunks) is no worse than the unfused one against fp64."""
    labels = torch.randint(0, 300, (96,), device=device)
    fused, ref, fg, rg = compare(96, 32, 300, 16, torch.bfloat16, device, labels=labels,
                                 hard_weight=0.1, temperature=2.0)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=2e-3, atol=2e-3)
    for a, b in zip(fg, rg):
        assert a.dtype == torch.bfloat16
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= 2e-2 * scale


def test_normalizer_and_3d_input():
    hid = torch.randn(2, 7, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    u = torch.randn(2, 7, 30)
    labels = torch.randint(0, 30, (2, 7))
    labels[1, 5:] = -100
    fused = fused_linear_kd_loss(hid, w, u, labels=labels, normalizer=40, chunk_rows=3)
    ref = kd_loss(hid @ w.t(), u, labels=labels, normalizer=40)
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(torch.autograd.grad(fused, (hid, w)), torch.autograd.grad(ref, (hid, w)))


def test_no_grad_evaluation():
    hid, w, b, teacher, _ = setup(10, 4, 9)
    with torch.no_grad():
        loss = fused_linear_kd_loss(hid, w, teacher["teacher_logits"], student_bias=b)
    assert loss.requires_grad is False and torch.isfinite(loss)


@pytest.mark.parametrize("bad,message", [
    (dict(reduction="none"), "reduction"),
    (dict(chunk_rows=0), "chunk_rows"),
    (dict(weight_shape=(9, 5)), "student_weight must have shape"),
    (dict(no_teacher=True), "exactly one of teacher_logits"),
    (dict(labels=torch.zeros(3, dtype=torch.int64)), "labels must have shape"),
    (dict(divergence="kl"), "divergence"),
])
def test_bad_input(bad, message):
    bad = dict(bad)
    hid = torch.randn(10, 4)
    w = torch.randn(*bad.pop("weight_shape", (9, 4)))
    teacher = None if bad.pop("no_teacher", False) else torch.randn(10, 9)
    with pytest.raises(ValueError, match=message):
        fused_linear_kd_loss(hid, w, teacher, **bad)


def test_exported():
    assert distillkit.fused_linear_kd_loss is fused_linear_kd_loss


# Each model's own logit transform (LogitHead: Cohere's scale, Gemma's soft cap), applied
# chunk by chunk, against a reference that materializes the transformed logits.
HEADS = {
    "none": None,
    "scale": LogitHead(scale=0.0625 * 8),
    "softcap": LogitHead(softcap=3.0),
    "both": LogitHead(scale=2.5, softcap=4.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("student_head,teacher_head",
                         [("softcap", "none"), ("none", "softcap"), ("scale", "both"),
                          ("both", "scale")])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_logit_heads_match_materialized(device, dtype, student_head, teacher_head, divergence):
    n, h, c = 37, 16, 50
    torch.manual_seed(0)
    hid = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    # Logits of a few units: the soft cap (3-4) bends them, so a missed slope shows.
    w = (torch.randn(c, h, device=device, dtype=dtype) * 3 / h**0.5).requires_grad_()
    b = (torch.randn(c, device=device, dtype=dtype) * 0.1).requires_grad_()
    th = torch.randn(n, h + 3, device=device, dtype=dtype)
    tw = torch.randn(c, h + 3, device=device, dtype=dtype) * 3 / h**0.5
    labels = torch.randint(0, c, (n,), device=device)
    labels[::5] = -100
    sh, tk = HEADS[student_head], HEADS[teacher_head]
    kw = dict(divergence=divergence, temperature=2.0, labels=labels, hard_weight=0.3)
    fused = fused_linear_kd_loss(hid, w, student_bias=b, teacher_hidden=th, teacher_weight=tw,
                                 student_head=sh, teacher_head=tk, chunk_rows=8, **kw)
    z = torch.addmm(b, hid, w.t())
    u = th @ tw.t()
    ref = kd_loss(sh.apply(z) if sh else z, tk.apply(u) if tk else u, **kw)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(fused, ref, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
    for got, want in zip(torch.autograd.grad(fused, (hid, w, b)),
                         torch.autograd.grad(ref, (hid, w, b))):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_softcap_slope_is_not_identity():
    """The cap changes the gradient (a fused path that forgot the tanh slope would pass a
    loss-only check): the same logits with and without the cap differ in dh."""
    hid = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(20, 4) * 3
    u = torch.randn(8, 20)
    capped = torch.autograd.grad(fused_linear_kd_loss(hid, w, u, student_head=LogitHead(softcap=2.0)), hid)[0]
    ref = torch.autograd.grad(kd_loss(LogitHead(softcap=2.0).apply(hid @ w.t()), u), hid)[0]
    plain = torch.autograd.grad(fused_linear_kd_loss(hid, w, u), hid)[0]
    torch.testing.assert_close(capped, ref)
    assert (capped - plain).abs().max() > 0.1 * plain.abs().max()


def test_logit_head_from_config():
    from transformers import CohereConfig, Gemma2Config, LlamaConfig
    assert LogitHead.from_config(LlamaConfig()) == LogitHead()
    assert LogitHead.from_config(Gemma2Config(final_logit_softcapping=30.0)) == LogitHead(softcap=30.0)
    assert LogitHead.from_config(CohereConfig(logit_scale=0.0625)) == LogitHead(scale=0.0625)


@pytest.mark.parametrize("bad,message", [
    (dict(scale=float("inf")), "scale"), (dict(scale="2"), "scale"),
    (dict(softcap=0.0), "softcap"), (dict(softcap=-1.0), "softcap"),
])
def test_logit_head_rejects(bad, message):
    with pytest.raises(ValueError, match=message):
        LogitHead(**bad)


def test_teacher_head_needs_teacher_hidden():
    with pytest.raises(ValueError, match="teacher_head"):
        fused_linear_kd_loss(torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 5),
                             teacher_head=LogitHead(softcap=2.0))
    with pytest.raises(ValueError, match="student_head must be a LogitHead"):
        fused_linear_kd_loss(torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 5),
                             student_head=dict(softcap=2.0))


# A teacher whose vocabulary is the student's plus padding rows (32000 vs 32064 in
# practice; 40 vs 48 here): teacher_vocab="truncate" drops its extra columns, which is
# the same as masking them to -inf before the teacher's softmax.
@pytest.mark.parametrize("teacher_as", ["logits", "hidden"])
def test_padded_teacher_vocab(teacher_as):
    n, h, c, pad = 29, 12, 40, 8
    hid = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, h, dtype=torch.float64, requires_grad=True)
    th = torch.randn(n, h, dtype=torch.float64)
    tw = torch.randn(c + pad, h, dtype=torch.float64)
    tb = torch.randn(c + pad, dtype=torch.float64)
    u = torch.addmm(tb, th, tw.t())
    teacher = (dict(teacher_logits=u) if teacher_as == "logits"
               else dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb))
    kw = dict(divergence="jsd", beta=0.3, temperature=1.5)
    fused = fused_linear_kd_loss(hid, w, chunk_rows=8, teacher_vocab="truncate", **teacher, **kw)
    masked = u.clone()
    masked[:, c:] = float("-inf")
    # The masked teacher's softmax puts no mass on the padding: its first c columns are
    # the truncated teacher's distribution.
    p_masked = torch.softmax(masked / 1.5, -1)
    assert p_masked[:, c:].max() == 0
    ref = kd_loss(hid @ w.t(), u[:, :c], **kw)
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.softmax(u[:, :c] / 1.5, -1), p_masked[:, :c])
    torch.testing.assert_close(torch.autograd.grad(fused, (hid, w)), torch.autograd.grad(ref, (hid, w)))
    with pytest.raises(ValueError, match=f"{c + pad} classes, the student {c}.*truncate"):
        fused_linear_kd_loss(hid, w, **teacher, **kw)


def test_kd_loss_padded_teacher_vocab():
    z = torch.randn(2, 5, 40, requires_grad=True)
    u = torch.randn(2, 5, 48)
    got = kd_loss(z, u, teacher_vocab="truncate", temperature=2.0)
    want = kd_loss(z, u[..., :40].contiguous(), temperature=2.0)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, z), torch.autograd.grad(want, z))


@pytest.mark.parametrize("student,teacher,vocab", [(40, 48, "exact"), (48, 40, "truncate"),
                                                   (48, 40, "exact")])
def test_other_vocab_mismatches_name_both_sizes(student, teacher, vocab):
    with pytest.raises(ValueError, match=f"teacher has {teacher} classes, the student {student}"):
        kd_loss(torch.randn(3, student), torch.randn(3, teacher), teacher_vocab=vocab)
    with pytest.raises(ValueError, match=f"teacher has {teacher} classes, the student {student}"):
        fused_linear_kd_loss(torch.randn(3, 4), torch.randn(student, 4), torch.randn(3, teacher),
                             teacher_vocab=vocab)
    with pytest.raises(ValueError, match=f"teacher has {teacher} classes, the student {student}"):
        fused_linear_kd_loss(torch.randn(3, 4), torch.randn(student, 4), teacher_vocab=vocab,
                             teacher_hidden=torch.randn(3, 4), teacher_weight=torch.randn(teacher, 4))


def test_teacher_vocab_option_is_validated():
    with pytest.raises(ValueError, match="teacher_vocab"):
        KDOptions(teacher_vocab="pad")


def test_under_bf16_autocast():
    """fp32 parameters under CPU bf16 autocast (HF Trainer's bf16=True): the matmuls run in
    bf16 as the unfused model's would, the gradients come back in fp32, and both agree with
    the unfused autocast computation to bf16 precision."""
    hid = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    u = torch.randn(40, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear_kd_loss(hid, w, u, chunk_rows=8, student_head=LogitHead(softcap=3.0))
        ref = kd_loss(LogitHead(softcap=3.0).apply(hid @ w.t()), u)
    got, want = torch.autograd.grad(fused, (hid, w)), torch.autograd.grad(ref, (hid, w))
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


# matmul_into: the weight gradient's GEMM, out (+)= a @ b with an fp32 out for bf16/fp16
# operands. Products of bf16 (fp16) values are exact in fp32 (8 (11) significant bits
# each), so against the fp64 product the only error is the fp32 summation of K (+1 when
# accumulating) terms: at most gamma_K = K u / (1 - K u) times Σ |a||b| (+ |out|), u = 2^-24.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32),
                                             (torch.float32, torch.float32),
                                             (torch.float64, torch.float64),
                                             (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "strided"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_into_within_summation_bound(device, dtype, out_dtype, layout, accumulate):
    torch.manual_seed(0)
    m, k, n = 67, 300, 40
    a = torch.randn(k, m, device=device).to(dtype).t() if layout == "tn" else \
        torch.randn(m, 2 * k, device=device).to(dtype)[:, ::2] if layout == "strided" else \
        torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype).t() if layout == "nt" else \
        torch.randn(k, n, device=device).to(dtype)
    out = torch.randn(m, n, device=device).to(out_dtype)
    start = out.clone()
    distillkit.ops.matmul_into(out, a, b, accumulate)
    exact = a.double() @ b.double() + (start.double() if accumulate else 0)
    terms = k + int(accumulate)
    u = torch.finfo(torch.float32 if out_dtype != torch.float64 else torch.float64).eps / 2
    bound = terms * u / (1 - terms * u) * (a.double().abs() @ b.double().abs()
                                          + (start.double().abs() if accumulate else 0))
    if out_dtype == torch.bfloat16:  # same dtype: one more rounding, of the result
        bound = bound + exact.abs() * torch.finfo(out_dtype).eps
    assert out.dtype == out_dtype
    assert ((out.double() - exact).abs() <= bound).all()


def test_matmul_into_rejects_bad_arguments():
    a, b = torch.randn(4, 3).bfloat16(), torch.randn(3, 5).bfloat16()
    with pytest.raises(ValueError, match="out must have shape"):
        distillkit.ops.matmul_into(torch.empty(4, 4), a, b, False)
    with pytest.raises(ValueError, match="out must have the operands' dtype, or be fp32"):
        distillkit.ops.matmul_into(torch.empty(4, 5, dtype=torch.float64), a, b, False)
    with pytest.raises(ValueError, match="same dtype"):
        distillkit.ops.matmul_into(torch.empty(4, 5), a, b.float(), False)
    with pytest.raises(ValueError, match="agree in K"):
        distillkit.ops.matmul_into(torch.empty(4, 5), a, b[:2], False)


def test_matmul_into_and_empty_cached_on_meta():
    """The composite kernels (every backend without its own: CUDA, Meta) trace shapes."""
    out = torch.ops.distillkit.empty_cached(torch.empty(0, device="meta"), [6, 5], torch.float32)
    assert out.device.type == "meta" and out.shape == (6, 5) and out.dtype == torch.float32
    distillkit.ops.matmul_into(out, torch.empty(6, 3, device="meta", dtype=torch.bfloat16),
                               torch.empty(3, 5, device="meta", dtype=torch.bfloat16), True)


def test_empty_cached_blocks_are_reused():
    """A freed block of at least 1 MiB stays in the CPU output cache and serves the next
    request of its size: the fused loop's buffers stay resident from step to step."""
    distillkit.empty_cpu_cache()
    t = distillkit.ops.empty_cached(torch.empty(0), (512, 1024), torch.float32)
    assert t.shape == (512, 1024) and t.dtype == torch.float32 and t.is_contiguous()
    ptr = t.data_ptr()
    del t
    assert distillkit.cpu_cache_bytes() >= 512 * 1024 * 4
    assert distillkit.ops.empty_cached(torch.empty(0), (1024, 512), torch.float32).data_ptr() == ptr
    with pytest.raises(ValueError, match="size must be non-negative"):
        distillkit.ops.empty_cached(torch.empty(0), (-1, 3), torch.float32)


@pytest.mark.parametrize("n,chunk_rows", [(40, 16), (40, 40)], ids=str)
def test_bf16_weight_gradient_summed_in_fp32(n, chunk_rows):
    """bf16 weights: the weight gradient summed over chunks in fp32, rounded to bf16 once,
    is the fp64 gradient of the same bf16 logits to within bf16 rounding (one ulp), plus
    the fp32 summation bound, for one chunk or several."""
    hid, w, _, teacher, u = setup(n, 24, 70, torch.bfloat16, bias=False)
    fused = fused_linear_kd_loss(hid, w, u, chunk_rows=chunk_rows, temperature=2.0)
    (gw,) = torch.autograd.grad(fused, (w,))
    z = (hid.detach() @ w.detach().t()).double().requires_grad_()  # the logits fused formed
    ref = kd_loss(z, u.double(), temperature=2.0)
    (dz,) = torch.autograd.grad(ref, (z,))
    exact = dz.t() @ hid.detach().double()
    # dz is rounded to bf16 by the kernel: half an ulp of each element, relative.
    err_dz = torch.finfo(torch.bfloat16).eps / 2 * (dz.abs().t() @ hid.detach().double().abs())
    bound = exact.abs() * torch.finfo(torch.bfloat16).eps + 2 * err_dz + 1e-12
    assert gw.dtype == torch.bfloat16
    assert ((gw.double() - exact).abs() <= bound).all()


def test_retained_graph_gives_the_same_gradients_twice():
    """The gradients are formed in the forward; a backward that keeps the graph scales a
    copy, so a second one (retain_graph=True) sees them unchanged, while the last one
    scales them in place (then the graph is freed, as autograd's own second-backward
    error says)."""
    hid, w, b, teacher, _ = setup(10, 4, 9)
    loss = fused_linear_kd_loss(hid, w, teacher["teacher_logits"], student_bias=b)
    first = torch.autograd.grad(loss * 3, (hid, w, b), retain_graph=True)
    second = torch.autograd.grad(loss * 3, (hid, w, b))
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, (hid, w, b))
