"""Helpers for trainers on a teacher-labelled unlabeled pool (SLaM, weighted distillation).

Distillation with unlabeled examples (docs/math.md §9.1, §9.2) has three data sets: the
*pool* the student trains on (inputs only; the teacher labels it once), a small
labelled *validation* set V that measures how noisy the teacher is, and any
evaluation data. Predictions over whole data sets come back on the CPU, in data
set order, where the trainers keep per-example state.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from distillkit.trainers.runtime import check_items

__all__ = ["predict_logits", "dataset_labels", "label_with_teacher"]

_PREDICT_BATCH = 256


@torch.no_grad()
def predict_logits(model: nn.Module, data: Dataset, device: Union[str, torch.device]) -> Tensor:
    """Logits (N, C) of ``model`` on every item's ``"input"``, in order, float32 on the CPU.

    Puts ``model`` in eval mode (no dropout) and leaves it there; uses no RNG.
    Under DDP every rank predicts the whole data set (identical models give
    identical results, and no rank waits on a gather).
    """
    model.eval()
    loader = DataLoader(data, batch_size=_PREDICT_BATCH, generator=torch.Generator())
    return torch.cat([model(batch["input"].to(device)).float().cpu() for batch in loader])


def dataset_labels(data: Dataset) -> Tensor:
    """The ``"label"`` of every item of ``data``, (N,) int64."""
    return torch.as_tensor([int(item["label"]) for item in data], dtype=torch.int64)


def label_with_teacher(teacher: nn.Module, pool: Dataset, val_data: Dataset,
                       device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """Freeze ``teacher`` on ``device``; return its logits on the pool and on V, and V's labels.

    Shapes (N, C), (V, C) and (V,), on the CPU.
    """
    if teacher is None:
        raise ValueError("teacher must be given: it labels the pool")
    check_items("train_data", pool, ("input",))
    check_items("val_data", val_data, ("input", "label"))
    teacher.to(device).eval().requires_grad_(False)
    return (predict_logits(teacher, pool, device), predict_logits(teacher, val_data, device),
            dataset_labels(val_data))
