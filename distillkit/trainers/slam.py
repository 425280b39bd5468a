r"""SLaM: distillation with unlabeled examples through student-label mixing (docs/math.md §5, §9.1)."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from distillkit.data import WithTensors
from distillkit.losses.functional import slam_loss
from distillkit.methods.slam import SLaMEstimator
from distillkit.trainers.kd import Batch, KDTrainer
from distillkit.trainers.pool import label_with_teacher

__all__ = ["SLaMTrainer"]


class SLaMTrainer(KDTrainer):
    r"""Trains ``student`` on a teacher-labelled unlabeled pool with :func:`distillkit.slam_loss`.

    At construction the teacher labels the pool once, :math:`t = \mathrm{softmax}(u/T)`,
    and its probabilities on the labelled validation set V (same T) fit a
    :class:`distillkit.methods.slam.SLaMEstimator`, which gives every pool row its α(x) and
    k(x). Training then minimises, per batch, the mean over rows of

    .. math::
        -\sum_i t_i \log\bigl(\alpha f_i + (1-\alpha)\, c\, M_i (1 - f_i)\bigr),
        \qquad f = \mathrm{softmax}(z),

    with M the teacher's top-k set (``hard=True`` keeps only the i = argmax t term,
    ``normalized=True`` takes c = 1/(k − 1), else c = 1). At inference the student's
    plain f is used; the teacher is not needed after labelling, and the trainer
    keeps no reference to it (``self.teacher`` is ``None``).

    Args:
        student: the model to train, inputs (B, ...) to logits (B, C).
        train_data: the pool, a data set of dicts with ``"input"``; any ``"label"``
            is ignored (it is unlabeled by assumption). A ``"weight"`` tensor
            multiplies each row's loss.
        teacher: maps inputs to logits (B, C); frozen, moved to ``device``.
        val_data: V, a non-empty data set of dicts with ``"input"`` and ``"label"``.
        temperature: T > 0 of the teacher's soft labels.
        estimator: an unfitted :class:`~distillkit.methods.slam.SLaMEstimator` carrying the
            ε, τ, k-binning and flip-guard choices; default
            ``SLaMEstimator(normalized=normalized)``, whose guard floors α above the
            mix's flip point (1/2, or 1/k normalized; our guard, not the paper's).
            ``SLaMEstimator(normalized=normalized, guard=None)`` is the paper's exact
            mixing. Its ``normalized`` must equal the trainer's.
        normalized, hard: passed to :func:`distillkit.slam_loss`.
        device: where the teacher labels and the student trains.
        **kwargs: :class:`KDTrainer`'s ``eval_data``, ``optimizer``, ``epochs``,
            ``batch_size``, ``seed``, ``progress``.

    Every DDP rank labels the whole pool and fits the same estimator (the teacher
    and V are the same everywhere), then trains on its shard as in
    :class:`KDTrainer`. Resuming rebuilds the labels from the teacher, which is
    deterministic in eval mode.

    Attributes:
        estimator: the fitted estimator.
        teacher_probs: (N, C) float32 soft labels of the pool (CPU).
        alpha, k: (N,) float32 and int64 per pool row (CPU).
    """

    def __init__(
        self,
        student: nn.Module,
        train_data: Dataset,
        *,
        teacher: nn.Module,
        val_data: Dataset,
        temperature: float = 1.0,
        estimator: Optional[SLaMEstimator] = None,
        normalized: bool = False,
        hard: bool = False,
        device: Union[str, torch.device] = "cpu",
        **kwargs,
    ):
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number (got {temperature})")
        if "loss" in kwargs:
            raise ValueError("loss (a KDConfig) does not apply: SLaMTrainer trains with slam_loss")
        estimator = estimator if estimator is not None else SLaMEstimator(normalized=normalized)
        if estimator.normalized != normalized:
            raise ValueError(f"estimator.normalized ({estimator.normalized}) must equal "
                             f"normalized ({normalized}): the flip point depends on the mix")
        device = torch.device(device)
        pool_logits, val_logits, val_labels = label_with_teacher(teacher, train_data, val_data,
                                                                 device)
        self.teacher_probs: Tensor = torch.softmax(pool_logits / temperature, dim=1)
        self.estimator = estimator.fit(
            torch.softmax(val_logits / temperature, dim=1), val_labels)
        self.alpha, self.k = self.estimator.transform(self.teacher_probs)
        self.temperature = temperature
        self.normalized = normalized
        self.hard = hard
        pool = WithTensors(train_data, teacher_probs=self.teacher_probs, alpha=self.alpha,
                           k=self.k)
        super().__init__(student, pool, device=device, **kwargs)

    def train_keys(self) -> Tuple[str, ...]:
        return ("input",)  # the rest comes with the teacher's labels of the pool

    def compute_loss(self, batch: Batch) -> Tensor:
        """Mean SLaM loss of the batch against its precomputed soft labels, α and k."""
        return slam_loss(self.model(batch["input"]), batch["teacher_probs"], batch["alpha"],
                         batch["k"], normalized=self.normalized, hard=self.hard,
                         weight=batch.get("weight"))
