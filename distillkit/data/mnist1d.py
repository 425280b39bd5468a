"""MNIST-1D (Greydanus, 2020) generated in memory, and the 1-D CNNs the experiments train on it.

The data come from the ``mnist1d`` package's generator,
``mnist1d.data.make_dataset(get_dataset_args())`` with only ``num_samples`` changed
(never its downloading loader): ten digit templates, each padded, sheared, scaled,
translated and noised into a length-40 signal. The generator's own seed (42) fixes the
examples; experiments draw their splits from them with their own seeds.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor, nn

from distillkit.data import DictDataset, Splits

__all__ = ["mnist1d_arrays", "mnist1d_splits", "cnn1d", "LENGTH", "NUM_CLASSES", "TEST", "VAL",
           "LABELLED", "POOL"]

LENGTH = 40
NUM_CLASSES = 10
# The benchmark's layout: rows of one seeded permutation of the generated set.
TEST, VAL, LABELLED, POOL = 3000, 500, 2000, 12000


@functools.lru_cache(maxsize=2)
def mnist1d_arrays(num_samples: int) -> Tuple[Tensor, Tensor]:
    """``num_samples`` MNIST-1D examples (rounded down to a multiple of 10, balanced classes).

    Returns ``(x, y)``: x (N, 40) float32 and y (N,) int64, in the generator's
    (shuffled) order, the package's train and test parts joined. Deterministic; cached.
    """
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10 (got {num_samples})")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    data = make_dataset(args)
    x = torch.cat([torch.as_tensor(data["x"]), torch.as_tensor(data["x_test"])]).float()
    y = torch.cat([torch.as_tensor(data["y"]), torch.as_tensor(data["y_test"])]).long()
    return x, y


def mnist1d_splits(seed: int, labelled: int = LABELLED,
                   pool: int = POOL) -> Tuple[Splits, Tensor, Tensor]:
    """The MNIST-1D benchmark's splits for ``seed``, and its unlabeled pool.

    Always the same ``TEST + VAL + LABELLED + POOL`` = 17 500 generated examples
    (:func:`mnist1d_arrays`; the generator's output depends on how many it makes, so
    every caller asks for the same number), permuted by ``seed``; the first ``TEST`` rows
    are the test split, the next ``VAL`` the validation split, the next ``LABELLED`` the
    labelled block, whose first ``labelled`` rows are ``train``, and the first ``pool``
    (≤ ``POOL``) of the rest the pool. Sizes nest: a smaller ``labelled`` or ``pool`` is a
    prefix of a larger one, and every experiment sees the same rows for the same seed. Returns ``(Splits, pool_x
    (pool, 40) float32, pool_y (pool,) int64)``; the pool's labels are for diagnostics.
    """
    if not 1 <= labelled <= LABELLED:
        raise ValueError(f"labelled must be in [1, {LABELLED}] (got {labelled})")
    if not 0 <= pool <= POOL:
        raise ValueError(f"pool must be in [0, {POOL}] (got {pool})")
    x, y = mnist1d_arrays(TEST + VAL + LABELLED + POOL)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    a, b, c = TEST, TEST + VAL, TEST + VAL + LABELLED

    def split(lo: int, hi: int) -> DictDataset:
        return DictDataset(input=x[lo:hi], label=y[lo:hi])

    splits = Splits(split(b, b + labelled), split(a, b), split(0, a), num_features=LENGTH,
                    num_classes=NUM_CLASSES)
    return splits, x[c:c + pool], y[c:c + pool]


class _Flatten1d(nn.Module):
    """(B, L) signals to (B, 1, L) for Conv1d."""

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


def cnn1d(channels: int, convs: int, hidden: int, num_classes: int = NUM_CLASSES,
          length: int = LENGTH) -> nn.Sequential:
    """A 1-D CNN: (B, length) signals to (B, num_classes) logits.

    ``convs`` blocks of Conv1d(kernel 5, padding 2) + ReLU, each after the first with
    stride 2 (so the length halves), ``channels`` wide; then a ReLU MLP head
    flatten → ``hidden`` → ``num_classes``. Weights from PyTorch's default init (torch's
    global RNG: seed it first).
    """
    if channels < 1 or convs < 1 or hidden < 1:
        raise ValueError(f"channels, convs and hidden must be >= 1 (got {channels}, {convs}, "
                         f"{hidden})")
    layers = [_Flatten1d()]
    width, size = 1, length
    for i in range(convs):
        stride = 1 if i == 0 else 2
        layers += [nn.Conv1d(width, channels, 5, stride=stride, padding=2), nn.ReLU()]
        width, size = channels, (size + 2 * 2 - 5) // stride + 1
    layers += [nn.Flatten(), nn.Linear(width * size, hidden), nn.ReLU(),
               nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)
