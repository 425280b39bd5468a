"""Empty inputs (issue 11): N = 0 rows give a defined result (0 for "sum" and for
"mean", an empty tensor for "none", empty gradients); C = 0 classes and K = 0 kept
entries are the op's own ValueError naming the argument, whatever N."""
import pytest
import torch

import distillkit
from distillkit import forward_corrected_loss, kd_loss, slam_loss, sparse_kd_loss
from distillkit.losses.functional import distance

ops = torch.ops.distillkit


def kd(n, c, reduction):
    z = torch.randn(n, c, requires_grad=True)
    return z, kd_loss(z, torch.randn(n, c), reduction=reduction)


def sparse(n, c, reduction, k=2):
    z = torch.randn(n, c, requires_grad=True)
    return z, sparse_kd_loss(z, torch.zeros(n, k, dtype=torch.long), torch.zeros(n, k),
                             reduction=reduction)


def slam(n, c, reduction):
    z = torch.randn(n, c, requires_grad=True)
    t = torch.full((n, c), 1.0 / max(c, 1))
    return z, slam_loss(z, t, 0.5, 1, reduction=reduction)


def corrected(n, c, reduction):
    z = torch.randn(n, c, requires_grad=True)
    return z, forward_corrected_loss(z, torch.zeros(n, dtype=torch.long), torch.eye(c), reduction)


def dist(op):
    def run(n, c, reduction):
        z = torch.randn(n, c, requires_grad=True)
        return z, distance(z, torch.randn(n, c), op, reduction=reduction)
    return run


def fused(n, c, reduction):
    h = torch.randn(n, 4, requires_grad=True)
    return h, distillkit.fused_linear_kd_loss(h, torch.randn(c, 4), teacher_logits=torch.randn(n, c),
                                              reduction=reduction)


ROW_OPS = {"kd_loss": kd, "sparse_kd_loss": sparse, "slam_loss": slam,
           "forward_corrected_loss": corrected, "distance_kl": dist("kl"),
           "distance_l2": dist("l2"), "distance_cosine": dist("cosine"),
           "distance_pearson": dist("pearson"), "fused_linear_kd_loss": fused}


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("name", sorted(ROW_OPS))
def test_zero_rows(name, reduction):
    if name == "fused_linear_kd_loss" and reduction == "none":
        pytest.skip("fused_linear_kd_loss has no per-row reduction")
    x, loss = ROW_OPS[name](0, 5, reduction)
    if reduction == "none":
        assert loss.shape[0] == 0
        loss = loss.sum()
    else:
        assert loss.shape == () and loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("n", [0, 3])
@pytest.mark.parametrize("name", ["kd_loss", "sparse_kd_loss", "slam_loss",
                                  "forward_corrected_loss", "distance_kl"])
def test_zero_classes_is_a_named_error(name, n):
    # distance() checks its dim before the op does, in its own words.
    message = ("student must have at least one element along dim -1" if name == "distance_kl"
               else "student_logits must have at least one class")
    with pytest.raises(ValueError, match=message):
        ROW_OPS[name](n, 0, "mean")


@pytest.mark.parametrize("n", [0, 3])
def test_zero_kept_entries_is_a_named_error(n):
    with pytest.raises(ValueError, match="teacher_indices must have at least one kept class"):
        sparse(n, 5, "mean", k=0)


@pytest.mark.parametrize("n", [0, 3])
def test_raw_ops_reject_zero_classes(n):
    z = torch.randn(n, 0)
    with pytest.raises(ValueError, match="student_logits must have at least one class"):
        ops.kd_loss_forward(z, z, None, 1.0, "forward_kl", 0.5, 0.0, -100, True)
    with pytest.raises(ValueError, match="student_logits must have at least one class"):
        ops.sparse_kd_loss_forward(z, torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1),
                                   None, 1.0, True, -100, True, True)
    with pytest.raises(ValueError, match="student_logits must have at least one class"):
        ops.slam_loss_forward(z, z, torch.ones(n), torch.ones(n, dtype=torch.long), False, False)


def test_zero_coordinates_of_the_lstm_step():
    H = 4
    grad = torch.randn(0, requires_grad=True)
    out, h, c = distillkit.ops.coordinate_lstm_step(
        grad, torch.randn(0), torch.randn(0, H), torch.randn(0, H), [torch.randn(4 * H, 2)],
        [torch.randn(4 * H, H)], [torch.randn(4 * H)], torch.randn(1, H), torch.randn(1))
    assert out.shape == (0,) and h.shape == (0, H)
    (g,) = torch.autograd.grad(out.sum() + h.sum(), grad)
    assert g.shape == (0,)


# --- forward_corrected_loss where exp(z - max z) underflows ---------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [205.0, 800.0])
def test_forward_corrected_loss_far_below_the_max(dtype, gap):
    # With the identity transition the loss is the cross entropy, here about `gap`:
    # exp(-gap) underflows fp32 (and fp64 at 800), which gave inf.
    z = torch.randn(4, 6, dtype=dtype)
    z[:, 0] = gap
    y = torch.tensor([1, 2, 3, 0])
    zz = z.clone().requires_grad_()
    loss = forward_corrected_loss(zz, y, torch.eye(6, dtype=dtype))
    zc = z.clone().requires_grad_()
    ce = torch.nn.functional.cross_entropy(zc.double(), y)
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(loss)
    assert abs(loss.item() - ce.item()) <= 8 * eps * ce.item()
    loss.backward()
    ce.backward()
    torch.testing.assert_close(zz.grad.double(), zc.grad.double(), rtol=0, atol=8 * eps)


def test_forward_corrected_loss_mixing_transition_far_below_the_max():
    # A transition that mixes: the reference in fp64 log space, built explicitly.
    c = 5
    tr = torch.full((c, c), 0.05) + 0.75 * torch.eye(c)
    z = torch.randn(3, c)
    z[:, 0] = 300.0
    tr[0, 1:] = 0.0
    tr[0, 0] = 1.0  # the max class never turns into the others
    y = torch.tensor([1, 2, 0])
    loss = forward_corrected_loss(z, y, tr, "none")
    z64 = z.double()
    log_noisy = torch.logsumexp(z64[:, :, None] + torch.log(tr.double())[None], 1) \
        - torch.logsumexp(z64, 1, keepdim=True)
    ref = -log_noisy.gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(loss.double(), ref, rtol=16 * torch.finfo(torch.float32).eps, atol=0)
