"""fused_linear_kd_loss equals the unfused matmul + kd_loss in loss and every gradient."""
import pytest
import torch

import distillkit
from distillkit import fused_linear_kd_loss, kd_loss

from conftest import DEVICES


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
