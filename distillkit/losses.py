"""nn.Module losses over distillkit.functional."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from .functional import kd_loss

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """Module form of :func:`distillkit.kd_loss`; the constructor takes its keyword
    arguments, ``forward(student_logits, teacher_logits, labels=None, weight=None,
    normalizer=None)`` the per-batch ones."""

    def __init__(self, *, temperature: float = 1.0, divergence: str = "forward_kl",
                 beta: float = 0.5, hard_weight: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", scale_by_t2: bool = True):
        super().__init__()
        self.temperature = temperature
        self.divergence = divergence
        self.beta = beta
        self.hard_weight = hard_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.scale_by_t2 = scale_by_t2

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                labels: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                normalizer: Optional[Union[float, Tensor]] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, temperature=self.temperature,
                       divergence=self.divergence, beta=self.beta, labels=labels,
                       hard_weight=self.hard_weight, ignore_index=self.ignore_index,
                       weight=weight, reduction=self.reduction, normalizer=normalizer,
                       scale_by_t2=self.scale_by_t2)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, "
                f"beta={self.beta}, hard_weight={self.hard_weight}, "
                f"reduction={self.reduction!r}, scale_by_t2={self.scale_by_t2}")
