"""Inputs that changed since the forward, raw backward calls with inconsistent saved
statistics, shapes or indices, and integer statistics beyond 2^24 classes (issue 11):
every case is a ValueError naming the argument, never a crash or an out-of-bounds
write. (On CUDA the same checks run in the kernels, see tests/cuda_emulated/cases.py
and distillkit.ops.check_errors.)"""
import pytest
import torch

from conftest import DEVICES, NEEDS_CUDA

import distillkit
from distillkit import kd_loss, slam_loss, sparse_kd_loss
from distillkit.ops import KD_STATS, SLAM_STATS, check_errors

ops = torch.ops.distillkit


def sparse_inputs(n=4, c=50, k=5):
    z = torch.randn(n, c, requires_grad=True)
    idx = torch.stack([torch.randperm(c)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k), 1)
    return z, idx, lp


@pytest.mark.parametrize("bad", [10**9, 50, -2, -(2**62)])
def test_sparse_indices_edited_through_numpy_after_forward(bad):
    z, idx, lp = sparse_inputs()
    loss = sparse_kd_loss(z, idx, lp)
    version = idx._version
    idx.numpy()[1, 2] = bad  # numpy writes do not bump the version counter
    assert idx._version == version
    with pytest.raises(ValueError, match=rf"teacher_indices must be in \[0, 50\) or -1 for "
                                         rf"padding \(teacher_indices\[1, 2\] = {bad}\)"):
        loss.backward()


def test_sparse_indices_edited_to_other_valid_classes_do_not_crash():
    z, idx, lp = sparse_inputs()
    loss = sparse_kd_loss(z, idx, lp)
    idx.numpy()[:] = idx.numpy()[:, :1]  # every entry the same, valid, class
    loss.backward()
    assert z.grad.shape == z.shape and torch.isfinite(z.grad).all()


def test_raw_sparse_backward_checks_what_it_dereferences():
    z, idx, lp = sparse_inputs()
    z = z.detach()
    loss, stats = ops.sparse_kd_loss_forward(z, idx, lp, None, 1.0, True, -100, True, True)
    g = torch.ones(4)
    args = (1.0, True, -100, True)
    bad = idx.clone()
    bad[3, 4] = 51
    with pytest.raises(ValueError, match=r"teacher_indices\[3, 4\] = 51"):
        ops.sparse_kd_loss_backward(g, z, bad, lp, None, stats, *args)
    with pytest.raises(ValueError, match="teacher_logprobs must have the shape of teacher_indices"):
        ops.sparse_kd_loss_backward(g, z, idx[:, :3], lp, None, stats, *args)
    with pytest.raises(ValueError, match=r"stats must have shape \(4, 6\)"):
        ops.sparse_kd_loss_backward(g, z, idx, lp, None, stats[:, :2], *args)
    with pytest.raises(ValueError, match=r"grad_loss must have shape \(4,\)"):
        ops.sparse_kd_loss_backward(g[:3], z, idx, lp, None, stats, *args)
    with pytest.raises(ValueError, match="labels must have shape"):
        ops.sparse_kd_loss_backward(g, z, idx, lp, torch.zeros(3, dtype=torch.long), stats, *args)
    # Garbage statistics are numbers, not indices: a wrong gradient at worst.
    out = ops.sparse_kd_loss_backward(g, z, idx, lp, None, torch.full_like(stats, 1e30), *args)
    assert out.shape == z.shape


def test_raw_kd_backward_checks_shapes_and_labels():
    z, u = torch.randn(5, 30), torch.randn(5, 30)
    y = torch.randint(0, 30, (5,))
    scalars = (2.0, "forward_kl", 0.5, 0.5, -100, True)
    loss, stats = ops.kd_loss_forward(z, u, y, *scalars)
    g = torch.ones(5)
    with pytest.raises(ValueError, match=rf"stats must have shape \(5, {KD_STATS.cols}\)"):
        ops.kd_loss_backward(g, z, u, y, stats[:4], *scalars, True)
    with pytest.raises(ValueError, match="stats must be"):
        ops.kd_loss_backward(g, z, u, y, stats.double(), *scalars, True)
    with pytest.raises(ValueError, match="teacher_logits must have the same last dimension"):
        ops.kd_loss_backward(g, z, u[:, :29], y, stats, *scalars, True)
    bad = y.clone()
    bad[2] = 30
    with pytest.raises(ValueError, match=r"labels must be in \[0, 30\) or equal ignore_index=-100 "
                                         r"\(labels\[2\] = 30\)"):
        ops.kd_loss_backward(g, z, u, bad, stats, *scalars, True)
    gz, gu = ops.kd_loss_backward(g, z, u, y, torch.full_like(stats, float("nan")), *scalars, True)
    assert gz.shape == z.shape and gu.shape == u.shape


def slam_inputs(n=4, c=40):
    z = torch.randn(n, c)
    t = torch.softmax(torch.randn(n, c), 1)
    return z, t, torch.full((n,), 0.6), torch.full((n,), 3, dtype=torch.long)


def int_bits(value, dtype=torch.float32):
    it = torch.int64 if dtype == torch.float64 else torch.int32
    return torch.tensor([value], dtype=it).view(dtype)[0]


@pytest.mark.parametrize("bad", [40, -1, 2**30])
def test_raw_slam_backward_rejects_a_saved_argmax_that_names_no_class(bad):
    z, t, alpha, k = slam_inputs()
    loss, stats = ops.slam_loss_forward(z, t, alpha, k, False, True)
    stats[1, SLAM_STATS.teacher_argmax] = int_bits(bad)
    with pytest.raises(ValueError, match=rf"stats\[1, {SLAM_STATS.teacher_argmax}\] names class "
                                         rf"{bad}, not in \[0, 40\)"):
        ops.slam_loss_backward(torch.ones(4), z, t, alpha, k, stats, False, True)


@pytest.mark.parametrize("normalized", [False, True])
def test_raw_slam_backward_with_edited_k_alpha_or_ties(normalized):
    z, t, alpha, k = slam_inputs()
    loss, stats = ops.slam_loss_forward(z, t, alpha, k, normalized, False)
    g = torch.ones(4)
    bad_k = k.clone()
    bad_k[2] = 41
    with pytest.raises(ValueError, match=r"k must be in \[\d, 40\].*\(k\[2\] = 41\)"):
        ops.slam_loss_backward(g, z, t, alpha, bad_k, stats, normalized, False)
    bad_alpha = alpha.clone()
    bad_alpha[0] = 0.0
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\] \(alpha\[0\] = 0\)"):
        ops.slam_loss_backward(g, z, t, bad_alpha, k, stats, normalized, False)
    for ties in (-5, 0, 10**6):
        st = stats.clone()
        st[:, SLAM_STATS.ties] = int_bits(ties)
        assert ops.slam_loss_backward(g, z, t, alpha, k, st, normalized, False).shape == z.shape
    with pytest.raises(ValueError, match=rf"stats must be a \(4, {SLAM_STATS.cols}\)"):
        ops.slam_loss_backward(g, z, t, alpha, k, stats[:, :5], normalized, False)


def test_raw_distance_backward_checks_shapes():
    s, t = torch.randn(2, 7, 3), torch.randn(2, 7, 3)
    rows, stats = ops.correlation_distance_forward(s, t, True)
    with pytest.raises(ValueError, match=r"stats must be a \(2, 3, 5\)"):
        ops.correlation_distance_backward(torch.ones(2, 3), s, t, stats[:, :2], True, True)
    with pytest.raises(ValueError, match=r"grad_rows must be a \(2, 3\)"):
        ops.correlation_distance_backward(torch.ones(3, 2), s, t, stats, True, True)
    with pytest.raises(ValueError, match="teacher must have the shape of student"):
        ops.correlation_distance_backward(torch.ones(2, 3), s, t[:, :6], stats, True, True)
    with pytest.raises(ValueError, match="teacher must have the shape of student"):
        ops.pointwise_distance_backward(torch.tensor(1.0), s, t[:1], "l2", True)


def test_raw_coordinate_lstm_backward_checks_shapes():
    P, H = 6, 4
    w_ih, w_hh, b = [torch.randn(4 * H, 2)], [torch.randn(4 * H, H)], [torch.randn(4 * H)]
    hw, hb = torch.randn(1, H), torch.randn(1)
    grad, h, c = torch.randn(P), torch.randn(P, H), torch.randn(P, H)
    args = (w_ih, w_hh, b, hw, hb, 10.0, 0.1)
    ops.coordinate_lstm_backward(torch.ones(P), None, None, grad, h, c, *args)
    with pytest.raises(ValueError, match="grad_params_out must have the shape of"):
        ops.coordinate_lstm_backward(torch.ones(P + 1), None, None, grad, h, c, *args)
    with pytest.raises(ValueError, match="must have the shape of h"):
        ops.coordinate_lstm_backward(torch.ones(P), torch.ones(P, H + 1), None, grad, h, c, *args)
    with pytest.raises(ValueError, match="h must"):
        ops.coordinate_lstm_backward(torch.ones(P), None, None, grad, h[:, :3], c, *args)
    with pytest.raises(ValueError, match="w_ih"):
        ops.coordinate_lstm_backward(torch.ones(P), None, None, grad, h, c,
                                     [torch.randn(4 * H, 3)], w_hh, b, hw, hb, 10.0, 0.1)


def test_check_errors_is_a_no_op_on_cpu():
    check_errors(torch.device("cpu"))
    with pytest.raises(ValueError, match="labels must be in"):
        kd_loss(torch.randn(3, 5), torch.randn(3, 5), labels=torch.tensor([0, 5, 1]),
                hard_weight=0.5)
    check_errors(torch.device("cpu"))  # the CPU raised at the call: nothing is pending


# --- integer statistics beyond 2^24 classes (stats_layout.h's int_stat) -------------

BIG_C = 2**24 + 3  # 2^24 + 1 is the first integer an fp32 cannot hold


def test_slam_argmax_is_exact_beyond_2_24_classes():
    z = torch.zeros(1, BIG_C)
    t = torch.zeros(1, BIG_C)
    yhat = 2**24 + 1
    t[0, yhat], t[0, 0] = 0.75, 0.25
    alpha, k = torch.tensor([0.5]), torch.tensor([1])
    loss, stats = ops.slam_loss_forward(z, t, alpha, k, False, True)
    assert int(stats[0, SLAM_STATS.teacher_argmax].view(torch.int32)) == yhat
    grad = ops.slam_loss_backward(torch.ones(1), z, t, alpha, k, stats, False, True)
    # h is -f a / q at yhat only (q = alpha f + (1 - alpha)(1 - f), a = 2 alpha - 1 = 0 here,
    # so h = 0) and dz = h - f S with S = h: dz is -f S everywhere, the same at yhat and at
    # its fp32 rounding 2^24 unless the member is misplaced. With alpha = 0.75, a != 0:
    alpha = torch.tensor([0.75])
    loss, stats = ops.slam_loss_forward(z, t, alpha, k, False, True)
    grad = ops.slam_loss_backward(torch.ones(1), z, t, alpha, k, stats, False, True)
    f = 1.0 / BIG_C
    a, q = 0.75 - 0.25, 0.75 * f + 0.25 * (1 - f)
    h = -f * a / q
    assert grad[0, yhat].item() == pytest.approx(h - f * h, rel=1e-5)
    assert grad[0, 2**24].item() == pytest.approx(-f * h, rel=1e-5)
    del grad


def test_slam_tie_count_is_exact_beyond_2_24_classes():
    # A uniform teacher and k = 2^24 + 1: every entry ties at the threshold and the
    # first 2^24 + 1 indices are the members, the last of them index 2^24.
    z = torch.zeros(1, BIG_C)
    t = torch.full((1, BIG_C), 1.0 / BIG_C)
    alpha, k = torch.tensor([0.75]), torch.tensor([2**24 + 1])
    loss, stats = ops.slam_loss_forward(z, t, alpha, k, False, False)
    assert int(stats[0, SLAM_STATS.ties].view(torch.int32)) == 2**24 + 1
    grad = ops.slam_loss_backward(torch.ones(1), z, t, alpha, k, stats, False, False)
    member, outside = grad[0, 2**24].item(), grad[0, 2**24 + 1].item()
    f = tt = 1.0 / BIG_C
    q = 0.75 * f + 0.25 * (1 - f)
    s = stats[0, SLAM_STATS.h_sum].item()
    assert member == pytest.approx(-tt * f * 0.5 / q - f * s, rel=1e-4)
    assert outside == pytest.approx(-tt - f * s, rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_check_labels_raises_kd_losss_message_with_the_given_bound(device):
    # check_labels (vocab-parallel KD's global check): kd_loss's label message, the bound
    # given rather than a tensor's width; ignore_index and every label below it pass.
    y = torch.tensor([0, 5, -100, 11], device=device)
    ops.check_labels(y, 12, -100)
    check_errors(y.device)
    for bad, i, v in [(12, 3, 12), (-1, 1, -1)]:
        y_bad = y.clone()
        y_bad[i] = bad
        with pytest.raises(ValueError, match=rf"labels must be in \[0, 12\) or equal "
                                             rf"ignore_index=-100 \(labels\[{i}\] = {v}\)"):
            ops.check_labels(y_bad, 12, -100)
            check_errors(y.device)  # CUDA: the kernel's record raises here
    with pytest.raises(ValueError, match="labels must be int64"):
        ops.check_labels(y.int(), 12, -100)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ops.check_labels(y, 0, -100)
    torch.library.opcheck(torch.ops.distillkit.check_labels, (y, 12, -100))


# --- CUDA: the same errors, without a host sync ---------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
@pytest.mark.parametrize("case", ["kd_label", "sparse_index", "sparse_duplicate", "slam_k",
                                  "sparse_edited_before_backward"])
def test_cuda_bad_values_raise_later_without_a_sync(case):
    dev = "cuda"
    z = torch.randn(4, 50, device=dev, requires_grad=True)
    idx = torch.stack([torch.randperm(50)[:5] for _ in range(4)]).to(dev)
    lp = torch.log_softmax(torch.randn(4, 5, device=dev), 1)
    messages = {"kd_label": r"labels\[1\] = 50", "sparse_index": r"teacher_indices\[1, 2\] = 99",
                "sparse_duplicate": "must not repeat a class", "slam_k": r"k\[1\] = 51",
                "sparse_edited_before_backward": r"teacher_indices\[1, 2\] = -7"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the ops raises
    try:
        if case == "kd_label":
            y = torch.zeros(4, dtype=torch.long, device=dev)
            y[1] = 50
            kd_loss(z, torch.randn(4, 50, device=dev), labels=y, hard_weight=0.5, reduction="sum")
        elif case in ("sparse_index", "sparse_duplicate"):
            bad = idx.clone()
            bad[1, 2] = 99 if case == "sparse_index" else bad[1, 0]
            sparse_kd_loss(z, bad, lp, reduction="sum")
        elif case == "slam_k":
            t = torch.softmax(torch.randn(4, 50, device=dev), 1)
            k = torch.full((4,), 2, dtype=torch.long, device=dev)
            k[1] = 51
            slam_loss(z, t, torch.full((4,), 0.5, device=dev), k, reduction="sum")
        else:
            loss = sparse_kd_loss(z, idx, lp, reduction="sum")
            idx.data[1, 2] = -7  # an edit the version counter does not see, as numpy's
            torch.autograd.grad(loss, z)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(ValueError, match=messages[case]):
        check_errors()
    check_errors()  # raised once, then cleared
