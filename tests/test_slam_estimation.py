"""SLaMEstimator: our PAV against scikit-learn, the α and k rules, edge cases, bad input."""
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

from conftest import DEVICES
from distillkit.losses.functional import slam_loss
from distillkit.methods.slam import (SLaMEstimator, SLaMFlipWarning, alpha_floor, flip_point,
                                     isotonic_predict, isotonic_regression, teacher_margin)
from distillkit.ops.reference import slam_loss_ref

EPS = 1e-3


def sklearn_fit(x, y, weight=None):
    return IsotonicRegression(out_of_bounds="clip").fit(x, y, sample_weight=weight)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("binary", [False, True], ids=["real-y", "binary-y"])
def test_pav_matches_sklearn(n, ties, weighted, binary):
    rng = np.random.default_rng(n + 10 * ties + 100 * weighted + 1000 * binary)
    # Ties: few distinct x, so most points share theirs with others.
    x = rng.integers(0, max(1, n // 5), n).astype(float) if ties else rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-x))).astype(float) if binary else x + rng.normal(size=n)
    weight = rng.uniform(0.1, 3.0, n) if weighted else None
    thresholds, values = isotonic_regression(torch.tensor(x), torch.tensor(y),
                                             None if weight is None else torch.tensor(weight))
    assert thresholds.dtype == values.dtype == torch.float64
    assert torch.equal(thresholds, torch.tensor(np.unique(x)))
    assert bool((values[1:] >= values[:-1]).all())
    reference = sklearn_fit(x, y, weight)
    # At the data, between them and beyond both ends (clipped to the end values).
    grid = np.concatenate([x, np.linspace(x.min() - 1, x.max() + 1, 101)])
    got = isotonic_predict(torch.tensor(grid), thresholds, values)
    np.testing.assert_allclose(got.numpy(), reference.predict(grid), rtol=1e-12, atol=1e-12)


def test_pav_pools_violators_by_weight():
    # y = 3, 1 with weights 1, 3 pool to (3 + 3) / 4 = 1.5; the last point stays.
    _, values = isotonic_regression(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 1.0, 2.0]),
                                    torch.tensor([1.0, 3.0, 1.0]))
    assert values.tolist() == [1.5, 1.5, 2.0]


def probs_with_label_ranks(ranks, num_classes, labels=None, top=0.6):
    """(n, C) probabilities whose row i ranks class labels[i] at 0-based position ranks[i].

    Distinct probabilities (top, then decreasing), so no ties; the classes are
    permuted by the label so the label sits where the rank says.
    """
    n = len(ranks)
    labels = torch.zeros(n, dtype=torch.int64) if labels is None else labels
    halves = torch.tensor([2.0 ** -j for j in range(num_classes - 1)], dtype=torch.float64)
    levels = torch.cat([torch.tensor([top], dtype=torch.float64), (1 - top) * halves / halves.sum()])
    assert bool((levels[1:] < levels[:-1]).all()), "top too small for distinct ranks"
    probs = torch.empty(n, num_classes, dtype=torch.float64)
    for i, (r, y) in enumerate(zip(ranks, labels.tolist())):
        order = [c for c in range(num_classes) if c != y]
        order.insert(r, y)  # order[j] is the class at position j
        probs[i, order] = levels
    return probs, labels


@pytest.mark.parametrize(
    "tau, expected",
    [(0.5, 2), (0.8, 2), (0.85, 3), (0.9, 3), (0.95, 6), (1.0, 6)],
)
def test_global_k_is_smallest_reaching_tau(tau, expected):
    # Top-1 accuracy 0.6, top-2 0.8, top-3 0.9, top-6 1.0.
    ranks = [0] * 6 + [1] * 2 + [2] + [5]
    probs, labels = probs_with_label_ranks(ranks, 10)
    est = SLaMEstimator(tau=tau).fit(probs, labels)
    _, k = est.transform(probs)
    assert k.tolist() == [expected] * len(ranks)


def test_k_is_at_least_two_and_ranks_break_ties_by_class_index():
    # All top-1 right: the rule gives k = 1, clamped to 2.
    probs, labels = probs_with_label_ranks([0] * 5, 4)
    assert SLaMEstimator().fit(probs, labels).k_values_.tolist() == [2]
    # Label 2 tied with classes 0 and 1 at the top: it ranks third (lower index first),
    # so top-3 is the first set holding it; argmax (class 0) counts as wrong for α.
    tied = torch.tensor([[0.3, 0.3, 0.3, 0.1]]).repeat(10, 1)
    est = SLaMEstimator(tau=1.0, guard=None).fit(tied, torch.full((10,), 2))
    assert est.k_values_.tolist() == [3]
    assert est.transform(tied)[0].tolist() == pytest.approx([EPS] * 10)


def test_per_bin_k():
    # 16 rows: two bins of 8 by margin. Low margins (top = 0.4): labels ranked 0..3;
    # high margins (top = 0.9): all right.
    low_ranks = [0, 0, 1, 1, 2, 2, 3, 3]
    low, low_labels = probs_with_label_ranks(low_ranks, 5, top=0.4)
    high, high_labels = probs_with_label_ranks([0] * 8, 5, top=0.9)
    probs, labels = torch.cat([high, low]), torch.cat([high_labels, low_labels])
    est = SLaMEstimator(tau=0.75, per_bin_k=True).fit(probs, labels)
    assert len(est.k_values_) == math.ceil(0.5 * math.sqrt(16))
    assert est.k_values_.tolist() == [3, 2]  # 6/8 low rows have rank < 3
    low_margin, high_margin = teacher_margin(low)[0], teacher_margin(high)[0]
    assert est.k_edges_.tolist() == pytest.approx([(low_margin + high_margin).item() / 2])
    # Global k for the same data: 12/16 = 0.75 is reached at k = 2.
    assert SLaMEstimator(tau=0.75).fit(probs, labels).k_values_.tolist() == [2]
    # Pool rows take their margin's bin, including margins beyond V's range.
    pool = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2], [1.0, 0, 0, 0, 0],
                         [0.26, 0.25, 0.25, 0.24, 0.0], [0.99, 0.01, 0, 0, 0]])
    assert est.transform(pool)[1].tolist() == [3, 2, 3, 2]


def test_alpha_is_clipped_isotonic_fit_of_correctness():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 10, generator=g) * 3
    probs = torch.softmax(logits, 1)
    labels = torch.where(torch.rand(300, generator=g) < 0.7, probs.argmax(1),
                         torch.randint(0, 10, (300,), generator=g))
    est = SLaMEstimator(guard=None).fit(probs, labels)
    pool = torch.softmax(torch.randn(50, 10, generator=g) * 3, 1)
    alpha, _ = est.transform(pool)
    margin = teacher_margin(probs).numpy()
    reference = sklearn_fit(margin, (probs.argmax(1) == labels).double().numpy())
    expected = np.clip(reference.predict(teacher_margin(pool).numpy()), EPS, 1 - EPS)
    np.testing.assert_allclose(alpha.numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("correct, expected", [(True, 1 - EPS), (False, EPS)],
                         ids=["all-correct", "all-wrong"])
def test_all_correct_or_all_wrong_validation_sets(correct, expected):
    probs, labels = probs_with_label_ranks([0 if correct else 1] * 20, 3)
    est = SLaMEstimator(guard=None).fit(probs, labels)
    pool = torch.softmax(torch.randn(30, 3) * 5, 1)
    alpha, k = est.transform(pool)
    assert alpha.tolist() == pytest.approx([expected] * 30)
    assert k.tolist() == [2] * 30


def test_out_of_range_margins_take_the_end_values():
    # V's margins span [0.2, 0.6]: wrong at the bottom, right at the top.
    probs = torch.tensor([[0.6, 0.4, 0.0], [0.7, 0.3, 0.0], [0.8, 0.2, 0.0]])
    est = SLaMEstimator(eps=0.0, guard=None).fit(probs, torch.tensor([1, 0, 0]))
    pool = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.65, 0.35, 0.0]])
    alpha, _ = est.transform(pool)
    assert alpha.tolist() == pytest.approx([0.0, 1.0, 0.5])


def test_single_example_validation_set():
    probs, labels = probs_with_label_ranks([3], 6)
    est = SLaMEstimator(per_bin_k=True, guard=None).fit(probs, labels)
    alpha, k = est.transform(torch.softmax(torch.randn(4, 6), 1))
    assert alpha.tolist() == pytest.approx([EPS] * 4)
    assert k.tolist() == [4] * 4  # top-4 is the first set holding the label


def test_two_classes():
    probs = torch.softmax(torch.randn(50, 2), 1)
    labels = torch.randint(0, 2, (50,))
    for per_bin_k in (False, True):
        _, k = SLaMEstimator(per_bin_k=per_bin_k).fit(probs, labels).transform(probs)
        assert k.tolist() == [2] * 50


@pytest.mark.parametrize("dtype, alpha_dtype", [(torch.float32, torch.float32),
                                                (torch.float64, torch.float64),
                                                (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("n", [0, 1, 33])
@pytest.mark.parametrize("device", DEVICES)
def test_transform_shapes_and_dtypes(dtype, alpha_dtype, n, device):
    est = SLaMEstimator(per_bin_k=True).fit(torch.softmax(torch.randn(40, 7), 1).to(device),
                                            torch.randint(0, 7, (40,)).to(device))
    alpha, k = est.transform(torch.softmax(torch.randn(n, 7), 1).to(device, dtype))
    assert alpha.device.type == k.device.type == device
    assert alpha.shape == k.shape == (n,)
    assert alpha.dtype == alpha_dtype and k.dtype == torch.int64
    assert bool(((alpha >= EPS) & (alpha <= 1 - EPS)).all())
    assert bool(((k >= 2) & (k <= 7)).all())


def test_estimator_output_feeds_slam_loss():
    from distillkit import slam_loss

    probs = torch.softmax(torch.randn(64, 10), 1)
    est = SLaMEstimator(per_bin_k=True).fit(probs, torch.randint(0, 10, (64,)))
    alpha, k = est.transform(probs)
    loss = slam_loss(torch.randn(64, 10), probs, alpha, k, normalized=True)
    assert torch.isfinite(loss)


GOOD_PROBS = torch.full((4, 3), 1 / 3)
GOOD_LABELS = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (GOOD_PROBS[0], GOOD_LABELS, "teacher_probs_val must be a 2-D"),
        (GOOD_PROBS[:0], GOOD_LABELS[:0], "teacher_probs_val needs at least 1 row"),
        (GOOD_PROBS[:, :1], GOOD_LABELS, "teacher_probs_val needs at least 1 row and 2 classes"),
        (GOOD_PROBS.long(), GOOD_LABELS, "teacher_probs_val must be a finite floating"),
        (GOOD_PROBS.clone().fill_(float("nan")), GOOD_LABELS, "teacher_probs_val must be a finite"),
        (GOOD_PROBS, GOOD_LABELS[:3], r"labels_val must be a \(4,\) tensor"),
        (GOOD_PROBS, GOOD_LABELS.float(), "labels_val must have an integer dtype"),
        (GOOD_PROBS, torch.tensor([0, 1, 3, 0]), r"labels_val must be in \[0, 3\)"),
        (GOOD_PROBS, torch.tensor([0, -1, 2, 0]), r"labels_val must be in \[0, 3\)"),
    ],
)
def test_fit_rejects_bad_input(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        SLaMEstimator().fit(probs, labels)


def test_transform_rejects_bad_input():
    with pytest.raises(RuntimeError, match="fit"):
        SLaMEstimator().transform(GOOD_PROBS)
    est = SLaMEstimator().fit(GOOD_PROBS, GOOD_LABELS)
    with pytest.raises(ValueError, match=r"teacher_probs must be a 2-D \(N, 3\)"):
        est.transform(torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="teacher_probs must be floating point"):
        est.transform(torch.ones(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("kwargs, match", [(dict(eps=0.5), "eps"), (dict(eps=-0.1), "eps"),
                                           (dict(tau=0.0), "tau"), (dict(tau=1.5), "tau"),
                                           (dict(guard=1.0), "guard"), (dict(guard=math.inf), "guard"),
                                           (dict(guard="on"), "guard"),
                                           (dict(normalized=1), "normalized"),
                                           (dict(warn_below=1.5), "warn_below")])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SLaMEstimator(**kwargs)


@pytest.mark.parametrize(
    "x, y, weight, match",
    [
        ([], [], None, "x must have at least one element"),
        ([[0.0]], [[0.0]], None, "x must be 1-D"),
        ([0.0, 1.0], [0.0], None, "y must have the shape of x"),
        ([0.0, float("inf")], [0.0, 1.0], None, "x must be finite"),
        ([0.0, 1.0], [0.0, 1.0], [1.0, 0.0], "weight must be positive"),
        ([0.0, 1.0], [0.0, 1.0], [1.0], "weight must have the shape of x"),
    ],
)
def test_isotonic_regression_rejects_bad_input(x, y, weight, match):
    with pytest.raises(ValueError, match=match):
        isotonic_regression(torch.tensor(x), torch.tensor(y),
                            None if weight is None else torch.tensor(weight))


# ---- the flip point and the guard ------------------------------------------------------

# One row, C = 6, k = 3: the teacher puts 0.9 on its top-3 set {0, 1, 2} and 0.1 on the rest.
ROW_T = torch.tensor([[0.4, 0.3, 0.2, 0.04, 0.03, 0.03]], dtype=torch.float64)


def row_optimum(alpha: float, normalized: bool) -> torch.Tensor:
    """The student distribution minimising one row's SLaM loss (LBFGS on its logits).

    The optimum can sit on the simplex's boundary (f → 0 on a set), where logits run
    off to −inf; the mass on each set converges all the same.
    """
    z = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=1000, tolerance_grad=1e-14,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = slam_loss_ref(z, ROW_T, alpha, 3, normalized=normalized)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(z.detach(), 1)[0]


@pytest.mark.parametrize("normalized", [False, True], ids=["unnormalized", "normalized"])
def test_flip_point_and_floor(normalized):
    k = torch.tensor([2, 3, 5, 10])
    flip = flip_point(k, normalized)
    expected = 1 / k.double() if normalized else torch.full((4,), 0.5, dtype=torch.float64)
    assert torch.equal(flip, expected)
    # dq_i/df_i = a = α − (1 − α)c changes sign at the flip.
    c = 1 / (k.double() - 1) if normalized else torch.ones(4, dtype=torch.float64)
    for alpha, sign in ((flip - 1e-3, -1), (flip + 1e-3, 1)):
        assert (torch.sign(alpha - (1 - alpha) * c) == sign).all()
    # At the floor the inflation 1 + k b / a equals R, and the floor tends to the flip as R grows.
    for r in (1.5, 2.0, 10.0):
        floor = alpha_floor(k, normalized, r)
        a, b = floor - (1 - floor) * c, (1 - floor) * c
        torch.testing.assert_close(1 + k * b / a, torch.full((4,), r, dtype=torch.float64))
    assert bool((alpha_floor(k, normalized, 1e9) - flip).abs().max() < 1e-8)
    # The two mixes coincide at k = 2.
    assert alpha_floor(k[:1], True, 2.0).item() == pytest.approx(alpha_floor(k[:1], False, 2.0).item())


@pytest.mark.parametrize("normalized", [False, True], ids=["unnormalized", "normalized"])
def test_row_optimum_with_and_without_the_guard(normalized):
    flip = 1 / 3 if normalized else 0.5
    # The paper's mixing below the flip: the optimum abandons the teacher's top-3 set.
    assert row_optimum(0.6 * flip, normalized)[:3].sum() < 1e-3
    # Just above the flip it still leaves most of the mass outside (R is huge there).
    assert row_optimum(flip + 0.05, normalized)[:3].sum() < 0.5
    # The guard floors an all-wrong V's α (ε) at a_min(3) for R = 2; the optimum is then
    # the closed form f = R t off the top-k, R t − b/a on it: 0.8 of the mass stays inside.
    est = SLaMEstimator(normalized=normalized, guard=2.0, warn_below=1.0)
    est.fit(ROW_T.repeat(4, 1), torch.tensor([1, 2, 1, 2]))  # all wrong, all in the top-3
    alpha, k = est.transform(ROW_T)
    floor = 2 / 3 if normalized else 0.8
    assert k.tolist() == [3] and alpha.item() == pytest.approx(floor)
    c = 0.5 if normalized else 1.0
    a, b = alpha.item() - (1 - alpha.item()) * c, (1 - alpha.item()) * c
    expected = 2 * ROW_T[0] - torch.tensor([b / a] * 3 + [0.0] * 3, dtype=torch.float64)
    got = row_optimum(alpha.item(), normalized)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert got[:3].sum() == pytest.approx(0.8, abs=1e-6)


@pytest.mark.parametrize("normalized", [False, True], ids=["unnormalized", "normalized"])
def test_guard_floors_alpha_and_reports_share_below_flip(normalized):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(400, 10, generator=g) * 2, 1)
    labels = torch.where(torch.rand(400, generator=g) < 0.4, probs.argmax(1),
                         torch.randint(0, 10, (400,), generator=g))
    pool = torch.softmax(torch.randn(300, 10, generator=g) * 2, 1)
    exact = SLaMEstimator(normalized=normalized, guard=None, warn_below=1.0).fit(probs, labels)
    raw, k = exact.transform(pool)
    flip = flip_point(k, normalized)
    share = (raw.double() < flip).double().mean().item()
    assert 0 < share < 1 and exact.below_flip_ == pytest.approx(share)
    val_alpha, val_k = exact.transform(probs)
    assert exact.val_below_flip_ == pytest.approx(
        (val_alpha.double() < flip_point(val_k, normalized)).double().mean().item())
    guarded_est = SLaMEstimator(normalized=normalized, guard=3.0, warn_below=1.0).fit(probs, labels)
    guarded, guarded_k = guarded_est.transform(pool)
    assert torch.equal(guarded_k, k) and guarded_est.below_flip_ == pytest.approx(share)
    floor = alpha_floor(k, normalized, 3.0).float()
    torch.testing.assert_close(guarded, torch.maximum(raw, floor))
    assert bool((guarded > flip).all())


def test_large_share_below_flip_warns():
    probs, labels = probs_with_label_ranks([1] * 20, 3)  # all wrong: α = ε everywhere
    est = SLaMEstimator(guard=None).fit(probs, labels)
    with pytest.warns(SLaMFlipWarning, match="100% of rows have alpha below the flip point "
                                             "of the unnormalized"):
        est.transform(probs)
    quiet = SLaMEstimator(guard=None, warn_below=1.0).fit(probs, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.transform(probs)
    assert quiet.below_flip_ == 1.0


def test_guarded_alpha_feeds_slam_loss():
    probs, labels = probs_with_label_ranks([1] * 20, 3)
    alpha, k = SLaMEstimator(warn_below=1.0).fit(probs, labels).transform(probs)
    logits = torch.randn(20, 3, dtype=torch.float32, requires_grad=True)
    torch.testing.assert_close(slam_loss(logits, probs, alpha, k),
                               slam_loss_ref(logits, probs, alpha, k))
