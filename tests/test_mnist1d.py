"""MNIST-1D benchmark: generated splits, the 1-D CNNs, and the three experiments' --quick runs on it."""
import csv

import pytest
import torch

from distillkit.__main__ import main
from distillkit.data.mnist1d import LABELLED, POOL, TEST, VAL, cnn1d, mnist1d_arrays, mnist1d_splits


def test_splits_are_disjoint_nested_and_seeded():
    splits, pool_x, pool_y = mnist1d_splits(0, labelled=300, pool=200)
    assert (len(splits.test), len(splits.val), len(splits.train), len(pool_x)) == (TEST, VAL, 300, 200)
    assert splits.num_features == 40 and splits.num_classes == 10
    rows = torch.cat([splits.test.tensors["input"], splits.val.tensors["input"],
                      splits.train.tensors["input"], pool_x])
    assert len(torch.unique(rows, dim=0)) == len(rows)  # no example in two splits
    # A smaller labelled set is a prefix of a larger one (same seed), so sizes are paired.
    bigger, _, _ = mnist1d_splits(0, labelled=LABELLED, pool=200)
    assert torch.equal(bigger.train.tensors["input"][:300], splits.train.tensors["input"])
    assert torch.equal(bigger.test.tensors["label"], splits.test.tensors["label"])
    other, _, _ = mnist1d_splits(1, labelled=300, pool=200)
    assert not torch.equal(other.test.tensors["input"], splits.test.tensors["input"])
    # Balanced classes from the generator, labels in range.
    _, y = mnist1d_arrays(TEST + VAL + LABELLED + POOL)
    assert torch.bincount(y).tolist() == [len(y) // 10] * 10
    # Every caller gets the same rows, whatever pool it asks for.
    no_pool, _, _ = mnist1d_splits(0, labelled=300, pool=0)
    assert torch.equal(no_pool.test.tensors["input"], splits.test.tensors["input"])
    assert pool_y.min() >= 0 and pool_y.max() <= 9


def test_splits_reject_bad_sizes():
    with pytest.raises(ValueError, match="labelled must be in"):
        mnist1d_splits(0, labelled=0)
    with pytest.raises(ValueError, match=r"pool must be in \[0, 12000\]"):
        mnist1d_splits(0, pool=-1)
    with pytest.raises(ValueError, match=r"pool must be in \[0, 12000\]"):
        mnist1d_splits(0, pool=12001)
    with pytest.raises(ValueError, match="num_samples must be >= 10"):
        mnist1d_arrays(5)


@pytest.mark.parametrize("channels, convs", [(4, 1), (16, 2), (32, 3)])
def test_cnn1d_maps_signals_to_logits(channels, convs):
    torch.manual_seed(0)
    model = cnn1d(channels, convs, 8)
    x = torch.randn(5, 40, requires_grad=True)
    logits = model(x)
    assert logits.shape == (5, 10)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="channels, convs and hidden must be >= 1"):
        cnn1d(0, 1, 8)


def test_unlabeled_quick_on_mnist1d(tmp_path):
    out = tmp_path / "unlabeled"
    assert main(["experiment", "unlabeled", "--dataset", "mnist1d", "--quick", "--no-progress",
                 "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "\n| 600 | 500 | " in table
    (row,) = list(csv.DictReader(open(out / "results.csv")))
    row = {k: float(v) for k, v in row.items()}
    for key in ("vanilla", "weighted_sum", "slam", "slam_guard"):
        assert row[f"{key}_fixed"] + row[f"{key}_kept"] <= 1
        assert row[f"{key}_kept"] <= row["teacher_pool"]
    # The same teacher and V for every SLaM run: the same share below the (1/2) flip;
    # the guard floors the unnormalized α at (k + 1)/(k + 2) >= 3/4.
    assert row["slam_below_flip"] == row["slam_guard_below_flip"] == row["slam_hard_below_flip"]
    assert row["slam_guard_alpha"] >= max(0.75, row["slam_alpha"])
    # Both normalizations estimate from the same first student (same init and batches).
    assert row["weighted_sum_w_mean"] == row["weighted_batch_w_mean"]
    assert (out / "unlabeled.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("experiment, rows, settings", [
    ("kdzero", ("| no distillation (CE) |", "| vanilla KD (T = 4) |", "| searched #1 |"),
     "mnist1d (split seed 0); teacher CNN"),
    ("l2t", ("| cross entropy |", "| L2T-DLN |", "| SGD (lr "),
     "mnist1d (split seed 0: 1000 train / 500 val / 3000 test); student MLP 40-32-10"),
])
def test_labelled_experiments_quick_on_mnist1d(tmp_path, experiment, rows, settings):
    assert main(["experiment", experiment, "--dataset", "mnist1d", "--quick", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    results = (tmp_path / "results.md").read_text()
    for row in rows:
        assert row in results
    assert settings in results
