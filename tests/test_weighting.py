"""estimate_weights (ESTIMATEWEIGHTS, docs/math.md §9.2) against a brute-force kNN, ties, |V| = 0, the k_nn cap."""
import math

import pytest
import torch

from conftest import DEVICES
from distillkit.methods.weighting import estimate_weights


def brute_force(teacher, student, val_teacher, val_student, val_labels, rule="distortion",
                k_nn=None, distortion="ignore"):
    """The definition, one pool row and one validation point at a time, in Python floats."""
    v = len(val_labels)
    k = min(k_nn or math.ceil(0.5 * math.sqrt(v)), v)
    wrong = [float(val_teacher[j].argmax() != val_labels[j]) for j in range(v)]
    # (p, distortion) per validation point: (0, 1) when right; t_y / max t when wrong (ours).
    dist_v = [1.0 if not wrong[j] else (val_teacher[j, val_labels[j]] / val_teacher[j].max()).item()
              for j in range(v)]
    keys = [(val_teacher[j].max().item(), val_student[j].max().item()) for j in range(v)]
    weights = []
    for i in range(len(teacher)):
        x = (teacher[i].max().item(), student[i].max().item())
        dist = [((x[0] - a) ** 2 + (x[1] - b) ** 2, j) for j, (a, b) in enumerate(keys)]
        nearest = [j for _, j in sorted(dist)[:k]]
        p_hat = sum(wrong[j] for j in nearest) / k
        w = max(0.0, 1 - 2 * p_hat) if rule == "distortion" else 1 - p_hat
        if distortion == "scale":
            w *= sum(dist_v[j] for j in nearest) / k
        weights.append(w)
    return torch.tensor(weights, dtype=torch.float64)


def random_probs(n, c, g, scale=2.0):
    return torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * scale, 1)


def grid_probs(n, g):
    """Two-class rows whose confidence is a multiple of 1/8: many exact ties in distance."""
    top = 0.5 + torch.randint(0, 5, (n,), generator=g).double() / 8
    return torch.stack([top, 1 - top], 1)


@pytest.mark.parametrize("distortion", ["ignore", "scale"])
@pytest.mark.parametrize("rule", ["distortion", "accuracy"])
@pytest.mark.parametrize("v", [1, 5, 37, 200])
@pytest.mark.parametrize("make", ["random", "grid"])
def test_matches_brute_force(rule, v, make, distortion):
    g = torch.Generator().manual_seed(v)
    probs = (lambda n: random_probs(n, 6, g)) if make == "random" else (lambda n: grid_probs(n, g))
    teacher, student, val_teacher, val_student = probs(50), probs(50), probs(v), probs(v)
    val_labels = torch.randint(0, val_teacher.shape[1], (v,), generator=g)
    got = estimate_weights(teacher, student, val_teacher, val_student, val_labels, rule=rule,
                           distortion=distortion)
    want = brute_force(teacher, student, val_teacher, val_student, val_labels, rule,
                       distortion=distortion)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_ties_go_to_the_lower_validation_index():
    # Three identical validation points; only the first has a wrong teacher.
    val = torch.tensor([[0.75, 0.25]] * 3, dtype=torch.float64)
    labels = torch.tensor([1, 0, 0])
    pool = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64)
    w = estimate_weights(pool, pool, val, val, labels, k_nn=1)
    assert w.tolist() == [0.0, 0.0]
    # Reversed, the first (nearest by index) is right.
    w = estimate_weights(pool, pool, val, val, labels.flip(0), k_nn=1)
    assert w.tolist() == [1.0, 1.0]


def test_equidistant_neighbours_are_taken_by_index():
    # Pool at confidence (0.75, 0.75); validation points at 0.625 and 0.875 on both
    # axes are equally far. With k_nn = 2 the two lowest indices count.
    val_conf = torch.tensor([[0.875, 0.875], [0.625, 0.625], [0.875, 0.625], [0.625, 0.875]],
                            dtype=torch.float64)
    val_t = torch.stack([val_conf[:, 0], 1 - val_conf[:, 0]], 1)
    val_s = torch.stack([val_conf[:, 1], 1 - val_conf[:, 1]], 1)
    pool = torch.tensor([[0.75, 0.25]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])  # the teacher (argmax 0) is wrong on indices 1, 2, 3
    w = estimate_weights(pool, pool, val_t, val_s, labels, k_nn=2, rule="accuracy")
    assert w.tolist() == [0.5]  # neighbours 0 (right) and 1 (wrong)


def test_distortion_of_the_correct_branch_is_one():
    # A teacher right on all of V: every point is (p, distortion) = (0, 1), so "scale"
    # changes nothing and w ≡ 1.
    g = torch.Generator().manual_seed(4)
    pool, val = random_probs(30, 4, g), random_probs(12, 4, g)
    labels = val.argmax(1)
    for distortion in ("ignore", "scale"):
        w = estimate_weights(pool, pool, val, val, labels, distortion=distortion)
        assert w.tolist() == [1.0] * 30


def test_distortion_scales_by_the_true_class_share():
    # One validation point, wrong: its distortion is t_y / max t = 0.2 / 0.8.
    val = torch.tensor([[0.8, 0.2]], dtype=torch.float64)
    pool = torch.tensor([[0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([1])
    assert estimate_weights(pool, pool, val, val, labels, rule="accuracy").tolist() == [0.0]
    half = torch.tensor([[0.8, 0.2], [0.9, 0.1]], dtype=torch.float64)  # wrong, right
    w = estimate_weights(pool, pool, half, half, torch.tensor([1, 0]), k_nn=2, rule="accuracy",
                         distortion="scale")
    assert w.tolist() == [pytest.approx(0.5 * (0.25 + 1.0) / 2)]


def test_empty_validation_set_gives_ones():
    pool = torch.softmax(torch.randn(7, 4), 1)
    w = estimate_weights(pool, pool, pool[:0], pool[:0], torch.zeros(0, dtype=torch.int64))
    assert w.dtype == torch.float32 and w.tolist() == [1.0] * 7


def test_k_nn_is_capped_at_the_validation_size():
    g = torch.Generator().manual_seed(0)
    pool, val = random_probs(20, 3, g), random_probs(5, 3, g)
    labels = torch.tensor([0, 1, 2, 0, 1])
    w = estimate_weights(pool, pool, val, val, labels, k_nn=100, rule="accuracy")
    accuracy = (val.argmax(1) == labels).double().mean()
    torch.testing.assert_close(w, accuracy.expand(20), rtol=0, atol=1e-15)


def test_default_k_nn_is_half_root_of_validation_size():
    g = torch.Generator().manual_seed(1)
    pool, val = random_probs(30, 4, g), random_probs(17, 4, g)  # ⌈½√17⌉ = 3
    labels = torch.randint(0, 4, (17,), generator=g)
    assert torch.equal(estimate_weights(pool, pool, val, val, labels),
                       estimate_weights(pool, pool, val, val, labels, k_nn=3))
    assert not torch.equal(estimate_weights(pool, pool, val, val, labels),
                           estimate_weights(pool, pool, val, val, labels, k_nn=2))


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_chunking_does_not_change_the_result(chunk_rows):
    g = torch.Generator().manual_seed(2)
    pool, student, val = random_probs(64, 5, g), random_probs(64, 5, g), random_probs(40, 5, g)
    labels = torch.randint(0, 5, (40,), generator=g)
    args = (pool, student, val, val, labels)
    assert torch.equal(estimate_weights(*args, chunk_rows=chunk_rows), estimate_weights(*args))


@pytest.mark.parametrize("dtype, expected", [(torch.float32, torch.float32),
                                             (torch.float64, torch.float64),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("device", DEVICES)
def test_output_dtype_device_and_range(dtype, expected, device):
    g = torch.Generator().manual_seed(3)
    pool, val = random_probs(25, 3, g).to(device, dtype), random_probs(9, 3, g).to(device, dtype)
    w = estimate_weights(pool, pool, val, val, torch.randint(0, 3, (9,), generator=g).to(device))
    assert w.dtype == expected and w.shape == (25,) and w.device.type == device
    assert bool(((w >= 0) & (w <= 1)).all())


P = torch.full((4, 3), 1 / 3)
Y = torch.zeros(4, dtype=torch.int64)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((P, P, P, P, Y), dict(rule="clip"), "rule must be one of"),
        ((P, P, P, P, Y), dict(distortion="multiply"), "distortion must be one of"),
        ((P[0], P, P, P, Y), {}, "teacher_probs must be a 2-D"),
        ((P, P[:3], P, P, Y), {}, "student_probs must have 4 rows"),
        ((P, P, P.long(), P, Y), {}, "val_teacher_probs must be a 2-D floating"),
        ((P, P, P, P[:2], Y), {}, "val_student_probs must have 4 rows"),
        ((P, P, P[:, :2], P, Y), {}, "val_teacher_probs must have as many classes"),
        ((P, P, P, P, Y[:3]), {}, r"val_labels must be a \(4,\) integer"),
        ((P, P, P, P, Y.float()), {}, r"val_labels must be a \(4,\) integer"),
        ((P, P, P, P, Y), dict(k_nn=0), "k_nn must be >= 1"),
        ((P, P, P, P, Y), dict(chunk_rows=0), "chunk_rows must be >= 1"),
    ],
)
def test_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_weights(*args, **kwargs)
