"""Small data and models for demos and tests: scikit-learn's digits and MLPs.

Everything is in memory and deterministic given a seed; nothing is downloaded
(the digits ship with scikit-learn).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

__all__ = ["BatchCycler", "DictDataset", "WithTensors", "Splits", "load_digits_splits", "mlp", "count_parameters"]


class DictDataset(Dataset):
    """Examples as dicts of equal-length tensors.

    Item ``i`` is ``{name: tensor[i] for each tensor} | {"index": i}``, so the
    default collate turns a batch into ``{name: (B, ...) tensor, "index": (B,) int64}``.
    The trainers read ``"input"`` and ``"label"``; any other per-example tensor
    (teacher logits or probabilities, importance weights) rides along unchanged,
    and ``"index"`` lets a trainer find an example's row in pool-sized state.
    """

    def __init__(self, **tensors: Tensor):
        if not tensors:
            raise ValueError("DictDataset needs at least one tensor")
        if "index" in tensors:
            raise ValueError("'index' is reserved: DictDataset adds it to every item")
        lengths = {name: len(t) for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"DictDataset tensors must have equal first dimensions (got {lengths})"
            )
        self.tensors: Dict[str, Tensor] = dict(tensors)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        item = {name: t[i] for name, t in self.tensors.items()}
        item["index"] = i
        return item

    def with_tensors(self, **extra: Tensor) -> "DictDataset":
        """A new dataset with ``extra`` per-example tensors added (or replaced)."""
        return DictDataset(**{**self.tensors, **extra})


class WithTensors(Dataset):
    """Any dict-item data set with per-example tensors added: item ``i`` is ``base[i] | {name: t[i]}``.

    For per-example state that a trainer computes about a data set it did not
    build (teacher soft labels, SLaM's α and k, importance weights). The tensors
    are indexed when an item is fetched, so updating one in place (refreshed
    weights) changes what the next batches see. Their names must not already be
    keys of ``base``'s items.
    """

    def __init__(self, base: Dataset, **tensors: Tensor):
        wrong = {name: len(t) for name, t in tensors.items() if len(t) != len(base)}
        if wrong:
            raise ValueError(f"WithTensors tensors must have len(base) = {len(base)} rows "
                             f"(got {wrong})")
        clash = set(tensors) & set(base[0]) if len(base) else set()
        if clash:
            raise ValueError(f"WithTensors names {sorted(clash)} are already keys of base's items")
        self.base = base
        self.tensors: Dict[str, Tensor] = dict(tensors)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return {**self.base[i], **{name: t[i] for name, t in self.tensors.items()}}


@dataclass(frozen=True)
class Splits:
    """Train / validation / test splits of one classification data set."""

    train: DictDataset
    val: DictDataset
    test: DictDataset
    num_features: int
    num_classes: int


def load_digits_splits(
    seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.25
) -> Splits:
    """scikit-learn's 8×8 digits (1797 examples, 64 features, 10 classes), split and standardized.

    The split is stratified by class and depends only on ``seed``. Features are
    standardized with the training split's mean and standard deviation (pixels
    that are constant in training, such as the corners, are only centred).
    Each split is a :class:`DictDataset` with ``"input"`` (n, 64) float32 and
    ``"label"`` (n,) int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            "val_fraction and test_fraction must be > 0 and sum to < 1 "
            f"(got {val_fraction} and {test_fraction})"
        )
    x, y = load_digits(return_X_y=True)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=y[rest], random_state=seed
    )
    mean = x[train].mean(0)
    std = x[train].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std

    def split(rows: np.ndarray) -> DictDataset:
        return DictDataset(
            input=torch.as_tensor(x[rows], dtype=torch.float32),
            label=torch.as_tensor(y[rows], dtype=torch.int64),
        )

    return Splits(split(train), split(val), split(test), num_features=x.shape[1], num_classes=10)


def mlp(
    in_features: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.0
) -> nn.Sequential:
    """A ReLU MLP ``in_features → hidden[0] → … → num_classes``, dropout after each ReLU.

    Input (N, in_features), output (N, num_classes) unnormalized logits. Weights
    come from PyTorch's default init, i.e. from torch's global RNG: seed it first.
    """
    layers = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters())


class BatchCycler:
    """Endless batches of ``batch_size`` rows: epoch after epoch, each a fresh permutation
    from a private generator seeded with ``seed`` (so the order depends only on the seed).
    The last, short batch of an epoch is dropped."""

    def __init__(self, inputs: Tensor, labels: Tensor, batch_size: int, seed: int):
        if not 1 <= batch_size <= len(inputs):
            raise ValueError(f"batch_size must be in [1, {len(inputs)}] (got {batch_size})")
        self.inputs, self.labels, self.batch_size = inputs, labels, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: List[Tensor] = []

    def __next__(self) -> Tuple[Tensor, Tensor]:
        if not self.order:
            perm = torch.randperm(len(self.inputs), generator=self.generator)
            self.order = list(perm[:len(perm) - len(perm) % self.batch_size].split(self.batch_size))
        rows = self.order.pop(0)
        return self.inputs[rows], self.labels[rows]

    def __iter__(self):
        return self
