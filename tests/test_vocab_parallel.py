"""vocab_parallel_kd_loss over 2 and 3 gloo processes equals kd_loss on the full logits.

One spawn per world size runs every case of the table: each rank takes its columns of
the same full tensors, computes the loss and backpropagates a fixed upstream gradient.
The tests then compare every rank's loss and the concatenated shard gradients with
single-process ``kd_loss`` (and ``kd_loss_ref`` under float64 autograd).
"""
import os

import pytest
import torch

import distillkit
from distillkit.parallel import vocab_parallel_kd_loss
from distillkit.reference import kd_loss_ref

from conftest import GRAD_TOL, LOSS_TOL, spawn_ranks

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16

# name: (shape (..., C), student dtype, teacher dtype, kd_loss kwargs, options), options:
#   labels (ignored rows included), weight, teacher_grad, pad (teacher and student −inf on
#   the last columns of every other row: a whole shard of −inf at C = 10 over 3 ranks),
#   skew (rank 0 holds one column), hole (row 0 of the student, or of the teacher for
#   reverse KL, −inf on the last 3 columns where the other has mass: an infinite loss).
CASES = {
    "fwd_T1_mean": ((6, 10), F64, F64, dict(), {}),
    "fwd_T2_hard_ignore_weight": ((7, 10), F64, F64, dict(temperature=2.0, hard_weight=0.3),
                                  {"labels", "weight"}),
    "fwd_teacher_grad_sum": ((5, 11), F64, F64, dict(temperature=0.7, reduction="sum"),
                             {"teacher_grad"}),
    "rev_T3_none": ((6, 10), F64, F64, dict(divergence="reverse_kl", temperature=3.0,
                                            reduction="none"), {"teacher_grad"}),
    "rev_hard_T1_no_t2": ((6, 13), F64, F64, dict(divergence="reverse_kl", hard_weight=0.5,
                                                  scale_by_t2=False), {"labels"}),
    "jsd_b03_T2_hard": ((7, 10), F64, F64, dict(divergence="jsd", beta=0.3, temperature=2.0,
                                                hard_weight=0.4),
                        {"labels", "weight", "teacher_grad"}),
    "jsd_b08_none_3d": ((2, 3, 12), F64, F64, dict(divergence="jsd", beta=0.8,
                                                   reduction="none"), {"teacher_grad"}),
    "jsd_b0_is_fwd": ((4, 10), F64, F64, dict(divergence="jsd", beta=0.0), {}),
    "jsd_b1_is_rev": ((4, 10), F64, F64, dict(divergence="jsd", beta=1.0), {"teacher_grad"}),
    "normalizer_3d": ((2, 4, 10), F64, F64, dict(temperature=1.5, hard_weight=0.2,
                                                 normalizer=11.0), {"labels"}),
    "ignore_index_is_a_class": ((6, 10), F64, F64, dict(hard_weight=0.5, ignore_index=3),
                                {"labels"}),
    "pad_fwd": ((6, 10), F64, F64, dict(temperature=2.0), {"pad", "teacher_grad"}),
    "pad_rev": ((6, 10), F64, F64, dict(divergence="reverse_kl"), {"pad"}),
    "pad_jsd": ((6, 10), F64, F64, dict(divergence="jsd", beta=0.5, hard_weight=0.1),
                {"pad", "labels"}),
    "hole_fwd": ((4, 10), F64, F64, dict(), {"hole"}),
    "hole_rev": ((4, 10), F64, F64, dict(divergence="reverse_kl", reduction="none"), {"hole"}),
    "skew_jsd": ((5, 9), F64, F64, dict(divergence="jsd", beta=0.6), {"skew", "teacher_grad"}),
    "wide_fp32_fwd": ((4, 700), F32, F32, dict(temperature=2.0, hard_weight=0.5), {"labels"}),
    "wide_fp32_jsd": ((4, 700), F32, F32, dict(divergence="jsd", beta=0.4), {"teacher_grad"}),
    "bf16_student_fp32_teacher": ((5, 64), BF16, F32, dict(divergence="reverse_kl",
                                                           temperature=2.0), {}),
}


def make_case(name):
    """The full tensors of a case: the same on every rank and in the test process."""
    shape, s_dtype, t_dtype, kwargs, options = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    z = 2 * torch.randn(shape, generator=gen, dtype=F64)
    u = 2 * torch.randn(shape, generator=gen, dtype=F64)
    if "pad" in options:
        z[::2, 7:] = u[::2, 7:] = float("-inf")
    if "hole" in options:
        (u if kwargs.get("divergence") == "reverse_kl" else z)[0, 7:] = float("-inf")
    lead, num_classes = shape[:-1], shape[-1]
    kwargs = dict(kwargs)
    if "labels" in options:
        labels = torch.randint(num_classes, lead, generator=gen)
        if "pad" in options:
            labels[::2] = labels[::2] % 7
        labels.view(-1)[1::3] = kwargs.get("ignore_index", -100)
        kwargs["labels"] = labels
    if "weight" in options:
        kwargs["weight"] = torch.rand(lead, generator=gen, dtype=F64)
    out_shape = lead if kwargs.get("reduction") == "none" else ()
    grad_out = torch.rand(out_shape, generator=gen, dtype=F64) + 0.5
    return z.to(s_dtype), u.to(t_dtype), kwargs, grad_out


def shard_bounds(name, num_classes, world):
    if "skew" in CASES[name][4]:
        sizes = [1] + [len(c) for c in torch.arange(num_classes - 1).tensor_split(world - 1)]
    else:
        sizes = [len(c) for c in torch.arange(num_classes).tensor_split(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def worker(rank, world, out_dir):
    results = {}
    for name in CASES:
        z, u, kwargs, grad_out = make_case(name)
        lo, hi = shard_bounds(name, z.shape[-1], world)[rank]
        zs = z[..., lo:hi].clone().requires_grad_()
        us = u[..., lo:hi].clone().requires_grad_("teacher_grad" in CASES[name][4])
        loss = vocab_parallel_kd_loss(zs, us, **kwargs)
        loss.backward(grad_out.to(loss.dtype))
        results[name] = (loss.detach(), zs.grad, us.grad)
    # Bad input raises on every rank alike (checked after the shapes are gathered),
    # instead of leaving the others waiting in a collective.
    z = torch.zeros(2, 3)
    # kd_loss's message for a label, with the global bound.
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {3 * world}\) or equal "
                                         rf"ignore_index=-100 \(labels\[1\] = {3 * world}\)"):
        vocab_parallel_kd_loss(z, z, labels=torch.tensor([0, 3 * world]), hard_weight=0.5)
    with pytest.raises(ValueError, match="same number of rows"):
        vocab_parallel_kd_loss(z[:1 + rank], z[:1 + rank])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    spawn_ranks(worker, world, str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def single_process(name, fn):
    """(loss, grad_student, grad_teacher) of fn on the full tensors."""
    z, u, kwargs, grad_out = make_case(name)
    z.requires_grad_()
    u.requires_grad_("teacher_grad" in CASES[name][4])
    loss = fn(z, u, **kwargs)
    loss.backward(grad_out.to(loss.dtype))
    return loss.detach(), z.grad, u.grad


@pytest.mark.parametrize("name", list(CASES))
def test_matches_kd_loss(ranks, name):
    loss, grad_z, grad_u = single_process(name, distillkit.kd_loss)
    ref_loss, ref_z, ref_u = single_process(
        name, lambda z, u, **kw: kd_loss_ref(z.double(), u.double(), **kw))
    got = [r[name] for r in ranks]
    # Every rank combines the same gathered numbers in the same order.
    for other in got[1:]:
        assert torch.equal(other[0], got[0][0])
    s_dtype, t_dtype = CASES[name][1], CASES[name][2]
    torch.testing.assert_close(got[0][0], loss, rtol=LOSS_TOL[s_dtype][0], atol=LOSS_TOL[s_dtype][1])
    torch.testing.assert_close(got[0][0].double(), ref_loss, rtol=LOSS_TOL[s_dtype][0],
                               atol=LOSS_TOL[s_dtype][1])
    pairs = [(torch.cat([g[1] for g in got], -1), grad_z, ref_z, s_dtype)]
    if "teacher_grad" in CASES[name][4]:
        pairs.append((torch.cat([g[2] for g in got], -1), grad_u, ref_u, t_dtype))
    else:
        assert all(g[2] is None for g in got)
    for grad, want, ref, dtype in pairs:
        # The reference runs in fp64; autograd hands its gradient back in the input dtype.
        # An infinite row (hole_*) has −inf / NaN gradients, in kd_loss as here.
        assert grad.dtype == want.dtype == ref.dtype
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(grad, want, rtol=rtol, atol=atol, equal_nan=True)
        torch.testing.assert_close(grad, ref, rtol=rtol, atol=atol, equal_nan=True)


def test_padded_teacher_vocab_is_rejected():
    """Padding rows sit at the end of the global vocabulary, not of every shard: a
    per-shard truncation would be wrong, so the option is refused (before any collective)."""
    with pytest.raises(ValueError, match="teacher_vocab must be 'exact'"):
        vocab_parallel_kd_loss(torch.randn(3, 4), torch.randn(3, 6), teacher_vocab="truncate")
